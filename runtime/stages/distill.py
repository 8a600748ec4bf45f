"""The `distill` stage: train a student on a teacher's logits (online, or from a top-k cache).

Owns only what is particular to distillation (which models, where the teacher comes from);
the loop, the loss and the data are `training/train.py`, `training/kd.py` and `data/stream.py`.
"""

from __future__ import annotations

from transformers import AutoTokenizer

from ..context import StageContext
from ..training.fsdp import empty_on_this_rank
from ..training.models import load_model
from ..training.train import teacher_dtype, train


def run(ctx: StageContext) -> dict:
    """Load the student (with the phase's RoPE), then the teacher unless its logits are cached.

    The teacher keeps its own RoPE settings: it already serves the context it was trained for.
    """
    config = ctx.config
    student_dir = ctx.inputs["student"]
    student = load_model(student_dir, rope=config.get("rope"), empty=empty_on_this_rank(ctx.stage))
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    cached = ctx.inputs.get("teacher_logits")
    teacher = None if cached else load_model(ctx.inputs["teacher"], dtype=teacher_dtype(config),
                                             empty=empty_on_this_rank(ctx.stage, teacher=True))
    ctx.log(f"distill: {config.get('phase', '')} student {student_dir}, teacher "
            f"{'cached top-k logits ' + str(cached) if cached else ctx.inputs['teacher']}")
    metrics = train(ctx, student, tokenizer, student_dir, teacher=teacher,
                    teacher_dir=None if cached else ctx.inputs["teacher"], teacher_logits=cached)
    return {**metrics, "teacher": "cached" if cached else "online"}
