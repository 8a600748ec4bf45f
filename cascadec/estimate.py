"""The cost model of one stage: FLOPs (with attention), memory per device (with its breakdown)
and device-hours. Pure arithmetic on shapes and resolved settings; no I/O, no torch.

The formulas, their assumptions and what they leave out are written in `docs/plan.md`
("Estimates"); `tests/test_estimate.py` checks one long-context stage by hand against that page.
Memory follows what the runtime does (`runtime/training/train.py`, `runtime/training/kd.py`): fp32 master weights
with AdamW, bf16 autocast, a teacher replicated on every device, the KD loss in token chunks.
"""

from __future__ import annotations

from .shapes import Shape

TRAINING = ("bootstrap", "control", "distill", "sft", "dpo", "odpo", "grpo")
# Forward passes' worth of work per token: training = forward + backward (2x); dpo adds the
# reference forward; odpo/grpo add generation and the reference or old-policy forward (an upper
# bound); every other stage is one forward.
PASSES = {"dpo": 4, "odpo": 5, "grpo": 5, **{k: 3 for k in ("bootstrap", "control", "distill", "sft")}}
STATE_BYTES = {"weights": 4, "grads": 4, "optimizer": 8}  # fp32 master weights, fp32 grads, Adam m and v
TEACHER_LOGITS_CHUNK = 1024  # tokens per head matmul in `runtime/stages/teacher_logits.py`
EVAL_TOKENS = 16384  # tokens per device per forward of the eval stage (its `micro_batch` in sequences)


def eval_batch(seq_len: int) -> int:
    """Sequences per forward of an eval stage: about EVAL_TOKENS tokens, at least one sequence."""
    return max(1, EVAL_TOKENS // seq_len)


def attention_width(s: Shape) -> int:
    """d_attn: the query width, heads x head_dim (GQA shares K/V, not the score computation)."""
    return s.heads * s.head_dim


def attention_flops_per_token(s: Shape | None, seq_len: int) -> int:
    """Causal attention, forward: token i scores i keys (QKᵀ) and mixes i values (PV), 2·d_attn·i
    FLOPs each per layer; averaged over a sequence of length L that is 2·layers·d_attn·(L+1)."""
    return 0 if s is None else 2 * s.layers * attention_width(s) * (seq_len + 1)


def flops(kind: str, *, n: int, shape: Shape | None, tokens: int, seq_len: int,
          n_teacher: int = 0, teacher: Shape | None = None) -> tuple[int, int]:
    """(total FLOPs, of which attention) over ``tokens``: the student's forward (2·N + attention)
    times its passes, plus one teacher forward when a teacher runs online."""
    passes = PASSES.get(kind, 1)
    att = attention_flops_per_token(shape, seq_len)
    att_teacher = attention_flops_per_token(teacher, seq_len) if n_teacher else 0
    total = (passes * (2 * n + att) + 2 * n_teacher + att_teacher) * tokens
    return total, (passes * att + att_teacher) * tokens


def layer_activation_bytes(s: Shape, act_bytes: int) -> int:
    """Bytes one layer saves for backward, per token: the input and output of both norms (4·hidden),
    q and the attention output (2·d_attn), k and v (2·d_kv), and the MLP's gate, up, activation
    and product (4·ffn; squared-ReLU MLPs: input and output, 2·ffn). Flash/SDPA attention keeps no
    [L x L] scores."""
    mlp = 2 if s.family == "nemotron" else 4
    return act_bytes * (4 * s.hidden + 2 * attention_width(s) + 2 * s.kv_heads * s.head_dim + mlp * s.ffn)


def memory(kind: str, *, shape: Shape | None, n: int, micro_batch: int, seq_len: int, devices: int, strategy: str,
           precision: str, checkpointing: bool, chunk_tokens: int = 1024, teacher: Shape | None = None,
           n_teacher: int = 0) -> dict:
    """Bytes per device by part: weights, grads, optimizer, activations, teacher, logits."""
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    parts = dict.fromkeys(("weights", "grads", "optimizer", "activations", "teacher", "logits"), 0)
    if shape is None or kind in ("prune", "export", "report"):
        parts["weights"] = 2 * n  # the bf16 checkpoint; streamed, or not a model stage: no working set
        return parts
    tokens = micro_batch * seq_len
    per_layer = layer_activation_bytes(shape, act_bytes)
    final_hidden = act_bytes * shape.hidden * tokens
    if kind in TRAINING:
        shard = devices if strategy in ("fsdp", "deepspeed") else 1
        for part, b in STATE_BYTES.items():
            parts[part] = b * n / shard
        if checkpointing:  # each layer's input is kept; one layer is recomputed at a time
            parts["activations"] = tokens * (shape.layers * act_bytes * shape.hidden + per_layer) + final_hidden
        else:
            parts["activations"] = tokens * shape.layers * per_layer + final_hidden
        chunk = min(chunk_tokens, tokens)
        has_teacher = n_teacher > 0 or teacher is not None
        # one chunk: student logits, teacher logits and teacher probabilities in fp32 and the
        # gradient's bf16 copy (no teacher: logits and log-softmax); saved: d hidden and d head (fp32)
        per_logit = 14 if has_teacher else 10
        parts["logits"] = per_logit * chunk * shape.vocab + act_bytes * tokens * shape.hidden + 4 * shape.vocab * shape.hidden
        if n_teacher:
            t_bytes = 2 if precision == "bf16" else 4  # `runtime/stages/distill.py`: bf16 teacher only under bf16
            parts["teacher"] = t_bytes * n_teacher + tokens * (layer_activation_bytes(teacher, act_bytes)
                                                               + act_bytes * teacher.hidden)
        return parts
    # forward-only stages: weights, one layer's working set, and the logits the stage computes
    parts["weights"] = act_bytes * n
    parts["activations"] = tokens * per_layer + final_hidden
    logit_rows = min(TEACHER_LOGITS_CHUNK if kind == "teacher-logits" else chunk_tokens, tokens)
    parts["logits"] = (act_bytes + 4) * logit_rows * shape.vocab if kind != "calibrate" else 0
    return parts


def device_hours(total_flops: float, peak_tflops: float, mfu: float) -> float:
    return total_flops / (peak_tflops * 1e12 * mfu) / 3600


def state_floor(kind: str, *, n: int, n_teacher: int, devices: int, precision: str) -> float:
    """Bytes per device that no runtime option can avoid: the weights (and, training, fp32 grads
    and Adam state) and the teacher's weights, spread evenly over every device of the stage."""
    per_param = sum(STATE_BYTES.values()) if kind in TRAINING else (2 if precision in ("bf16", "fp16") else 4)
    teacher = (2 if precision == "bf16" else 4) * n_teacher
    return (per_param * n + teacher) / devices
