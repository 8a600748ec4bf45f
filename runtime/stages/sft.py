"""The `sft` stage: supervised fine-tuning on chat conversations, optionally distilling a teacher.

Owns only what is particular to sft (which models, where the teacher comes from, the chat template
of the saved model); the loop is `training/train.py`, the packed rows `data/packing.py`, the loss
`training/kd.py`. docs/runtime.md ("SFT") is the user's view.

Loss: cross-entropy on the trained tokens (assistant content and end of turn; every token but the
padding with ``assistant_only: false``), or with ``loss.teacher`` the chunked KD loss
``(1 − ce_weight)·KD + ce_weight·CE`` on the same tokens, from an online teacher or the planned
top-k cache over the same packed rows.
"""

from __future__ import annotations

from pathlib import Path

from accelerate import PartialState
from transformers import AutoTokenizer

from ..context import StageContext
from ..data.chat import ensure_template
from ..training.fsdp import empty_on_this_rank
from ..training.models import load_model
from ..training.train import teacher_dtype, train


def run(ctx: StageContext) -> dict:
    config = ctx.config
    student_dir = ctx.inputs["student"]
    cached = ctx.inputs.get("teacher_logits")
    wants_teacher = bool((config.get("loss") or {}).get("teacher"))
    if wants_teacher and not cached and "teacher" not in ctx.inputs:
        raise ValueError(f"stage {ctx.stage.get('id')}: loss.teacher is set but the plan gives no `teacher` or "
                         "`teacher_logits` input; re-plan with `cascadec plan SPEC -o PLAN`")
    if not wants_teacher and (cached or "teacher" in ctx.inputs):
        raise ValueError(f"stage {ctx.stage.get('id')}: a teacher input without loss.teacher; re-plan the spec")
    student = load_model(student_dir, empty=empty_on_this_rank(ctx.stage))
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    teacher = None
    if wants_teacher and not cached:
        teacher = load_model(ctx.inputs["teacher"], dtype=teacher_dtype(config),
                             empty=empty_on_this_rank(ctx.stage, teacher=True))
    source = "cached top-k logits " + str(cached) if cached else ctx.inputs.get("teacher", "none (cross-entropy)")
    ctx.log(f"sft: student {student_dir}, teacher {source}, "
            f"loss on {'assistant tokens' if config.get('assistant_only', True) else 'all tokens'}")
    metrics = train(ctx, student, tokenizer, student_dir, teacher=teacher,
                    teacher_dir=ctx.inputs.get("teacher") if teacher is not None else None, teacher_logits=cached)
    # the saved model renders chats as it was trained on them: its template, or the default one written in
    written = PartialState().is_main_process and ensure_template(Path(ctx.out) / "model")
    template = "default (written)" if written else "the student's"
    return {**metrics, "teacher": "cached" if cached else ("online" if teacher is not None else "none"),
            "chat_template": template}
