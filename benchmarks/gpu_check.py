"""GPU check (not a test): the runtime's real-scale paths on one CUDA device, in minutes.

    python benchmarks/gpu_check.py [--out DIR] [--steps 12]      # one GPU, ~5 minutes
    python benchmarks/gpu_check.py --smoke                         # CPU, tiny shapes: the script itself

Builds a ~1.1B-parameter teacher and a ~0.45B student (Mistral architecture, vocab 131,072,
random bf16 weights; the numbers here are about speed and memory, not quality) and measures:

(a) `distill`: the real stage (`train()` through the Accelerator, bf16, chunked forward-KL) at
    4,096 tokens per sequence: tokens/s, MFU, peak device memory.
(b) KD loss memory: one forward+backward of the loss at vocab 131,072 x 4,096 tokens, chunked
    against the naive full-logit `F.kl_div` (peak allocated bytes above the inputs).
(c) `eval`: the real stage in bf16 (chunked cross-entropy): tokens/s, peak memory.
(d) `calibrate` on the bf16 teacher on the device against fp32 on the same device: the scores'
    largest relative difference, and whether the layers each criterion would drop agree.
(e) FSDP2 at world size 1: a short `strategy: fsdp` distill with step checkpoints, the final
    Hugging Face checkpoint reloaded with `from_pretrained` and compared with the trained weights.

Writes `gpu_check.json` and prints a Markdown table for the README. Every section runs in its own
subprocess so one failure (or OOM) does not hide the others, and peaks do not leak between them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

FULL = {
    "teacher": dict(layers=12, hidden=2048, ffn=6144, heads=16, kv_heads=4, head_dim=128, vocab=131_072),
    "student": dict(layers=12, hidden=1024, ffn=4096, heads=8, kv_heads=2, head_dim=128, vocab=131_072),
    "seq_len": 4096, "micro_batch": 1, "global_batch": 4, "eval_tokens": 65_536, "chunk_tokens": 1024,
    "calibration": dict(samples=32, seq_len=2048, batch_size=4),
}
SMOKE = {
    "teacher": dict(layers=4, hidden=64, ffn=128, heads=4, kv_heads=2, head_dim=16, vocab=4096),
    "student": dict(layers=2, hidden=32, ffn=64, heads=2, kv_heads=1, head_dim=16, vocab=4096),
    "seq_len": 64, "micro_batch": 1, "global_batch": 2, "eval_tokens": 1024, "chunk_tokens": 32,
    "calibration": dict(samples=8, seq_len=64, batch_size=4),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0, "L40S": 362.0, "A10G": 125.0}
STDLIB = {"kind": "builtin", "builtin": "stdlib"}
HELDOUT = {"kind": "builtin", "builtin": "stdlib", "split": "heldout"}


def params(s: dict) -> int:
    """Parameters of an untied Mistral shape (embeddings, attention, SwiGLU, norms, head)."""
    h, f, q, kv = s["hidden"], s["ffn"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    layer = h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h
    return 2 * s["vocab"] * h + s["layers"] * layer + h


def build(work: Path, cfg: dict) -> dict[str, Path]:
    """Random checkpoints in bf16, norm gains not 1, sharing one byte-level BPE tokenizer."""
    import torch
    import transformers as tf
    from tinymodels import hf_config, tokenizer

    tok = tokenizer(256 + 64)
    out = {}
    for seed, name in enumerate(("teacher", "student"), 1):
        path = work / name
        torch.manual_seed(seed)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = tf.AutoModelForCausalLM.from_config(hf_config("mistral", **cfg[name]), dtype=torch.bfloat16)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("norm.weight"):
                    p.copy_(1 + 0.3 * torch.randn_like(p))
        model.config.max_position_embeddings = max(4096, cfg["seq_len"])
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = path
        del model
    return out


def distill_stage(cfg: dict, steps: int, *, strategy: str = "none", every: int = 0) -> dict:
    return {"id": "gpu-check/distill", "kind": "distill", "hash": "gpu-check",
            "launch": {"devices": 1, "nodes": 1, "launcher": "local", "strategy": strategy},
            "config": {
                "phase": "short", "seq_len": cfg["seq_len"], "global_batch": cfg["global_batch"],
                "micro_batch": cfg["micro_batch"], "steps": steps,
                "tokens": steps * cfg["seq_len"] * cfg["global_batch"], "data": {"name": "stdlib", "offset": 0},
                "loss": {"kind": "forward_kl", "temperature": 1.0, "top_k": None, "ce_weight": 0.0,
                         "chunk_tokens": cfg["chunk_tokens"]},
                "optimizer": {"name": "adamw", "lr": 1e-4, "min_lr": 1e-5, "betas": [0.9, 0.95], "eps": 1e-8,
                              "weight_decay": 0.1, "grad_clip": 1.0},
                "schedule": {"kind": "cosine", "warmup_steps": 1}, "rope": None,
                "checkpoint": {"every_steps": every, "keep": 2}, "seed": 0, "precision": "bf16",
                "activation_checkpointing": True}}


def context(work: Path, stage: dict, inputs: dict, data: dict):
    from cascadec.runtime.context import StageContext

    (work / "out").mkdir(parents=True, exist_ok=True)
    return StageContext(stage=stage, inputs=inputs, data=data, out=work / "out", scratch=work / "scratch",
                        cache=work.parent / "tokens", log=lambda m: print("   ", m, flush=True))


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _reset_peak():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def _peak_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


# ---------------------------------------------------------------------------------------------
# Sections: each returns a dict of figures


def section_distill(work: Path, models: dict, cfg: dict, steps: int) -> dict:
    from cascadec.runtime.stages import distill

    ctx = context(work / "distill", distill_stage(cfg, steps), dict(models), {"stdlib": STDLIB})
    _reset_peak()
    metrics = distill.run(ctx)
    tps = metrics["tokens_per_s"]
    n_s, n_t = params(cfg["student"]), params(cfg["teacher"])
    # model FLOPs per token: 3 passes of the student, 1 of the teacher, causal attention (docs/plan.md)
    attn = lambda s: 2 * s["layers"] * s["heads"] * s["head_dim"] * (cfg["seq_len"] + 1)  # noqa: E731
    flops = 3 * (2 * n_s + attn(cfg["student"])) + 2 * n_t + attn(cfg["teacher"])
    peak = _peak_tflops()
    written = json.loads((ctx.out / "model" / "config.json").read_text())
    return {"student_params": n_s, "teacher_params": n_t, "tokens_per_s": round(tps, 1),
            "mfu": round(flops * tps / (peak * 1e12), 4) if peak else None,
            "peak_gb": _peak_gb(), "final_loss": metrics.get("final_loss"),
            "saved_dtype": written.get("dtype") or written.get("torch_dtype")}


def section_kd_memory(cfg: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from cascadec.runtime.training.kd import LossSpec, Teacher, chunked_loss

    dev = _device()
    n, v, h = cfg["seq_len"], cfg["student"]["vocab"], cfg["student"]["hidden"]
    ht = cfg["teacher"]["hidden"]
    g = torch.Generator(device=dev).manual_seed(0)
    out = {}
    for variant in ("naive", "chunked"):
        hidden = torch.randn(n, h, generator=g, device=dev, dtype=torch.bfloat16).requires_grad_()
        weight = (torch.randn(v, h, generator=g, device=dev, dtype=torch.bfloat16) * 0.05).requires_grad_()
        t_hidden = torch.randn(n, ht, generator=g, device=dev, dtype=torch.bfloat16)
        t_weight = torch.randn(v, ht, generator=g, device=dev, dtype=torch.bfloat16) * 0.05
        labels = torch.zeros(n, dtype=torch.long, device=dev)
        _reset_peak()
        base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            if variant == "naive":
                s = (hidden @ weight.T).float()
                with torch.no_grad():
                    t = (t_hidden @ t_weight.T).float()
                loss = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                                reduction="none").sum(-1).mean()
            else:
                loss = chunked_loss(hidden, weight, labels, LossSpec(chunk_tokens=cfg["chunk_tokens"]),
                                    Teacher(hidden=t_hidden, weight=t_weight))
        loss.backward()
        peak = torch.cuda.max_memory_allocated() - base if dev.type == "cuda" else None
        out[variant] = {"loss": float(loss.detach()), "peak_bytes": peak}
        del hidden, weight, t_hidden, t_weight, loss
    naive, chunked = out["naive"]["peak_bytes"], out["chunked"]["peak_bytes"]
    return {"vocab": v, "tokens": n, "chunk_tokens": cfg["chunk_tokens"],
            "naive_gb": round(naive / 2**30, 2) if naive else None,
            "chunked_gb": round(chunked / 2**30, 2) if chunked else None,
            "ratio": round(chunked / naive, 3) if naive else None,
            "loss_naive": out["naive"]["loss"], "loss_chunked": out["chunked"]["loss"]}


def section_eval(work: Path, models: dict, cfg: dict) -> dict:
    from cascadec.runtime.stages import eval as eval_stage

    stage = {"id": "gpu-check/eval", "kind": "eval", "hash": "gpu-check",
             "launch": {"devices": 1, "nodes": 1, "launcher": "local", "strategy": "none"},
             "config": {"checkpoints": ["student"], "data": {"name": "heldout", "offset": 0},
                        "tokens": cfg["eval_tokens"], "seq_len": cfg["seq_len"], "precision": "bf16",
                        "micro_batch": max(1, 16384 // cfg["seq_len"]), "chunk_tokens": cfg["chunk_tokens"]}}
    ctx = context(work / "eval", stage, {"checkpoint:student": models["student"]}, {"heldout": HELDOUT})
    eval_stage.run(ctx)  # warm: tokenises the held-out split and loads kernels
    _reset_peak()
    start = time.perf_counter()
    eval_stage.run(ctx)
    seconds = time.perf_counter() - start
    result = json.loads((ctx.out / "eval.json").read_text())["checkpoints"]["student"]
    return {"tokens": result["tokens"], "loss": result["loss"], "tokens_per_s": round(result["tokens"] / seconds, 1),
            "peak_gb": _peak_gb()}


def section_calibrate(work: Path, models: dict, cfg: dict) -> dict:
    """bf16 weights on the device against the same weights upcast to fp32 on the device."""
    import torch
    import transformers as tf

    from cascadec.runtime.surgery.calibrate import calibrate

    fp32 = work / "teacher-fp32"
    tf.AutoModelForCausalLM.from_pretrained(models["teacher"], dtype=torch.float32).save_pretrained(fp32)
    tf.AutoTokenizer.from_pretrained(models["teacher"]).save_pretrained(fp32)
    c = cfg["calibration"]
    runs = {}
    for name, path in (("bf16", models["teacher"]), ("fp32", fp32)):
        _reset_peak()
        start = time.perf_counter()
        stats, summary = calibrate(path, source=STDLIB, samples=c["samples"], seq_len=c["seq_len"],
                                   batch_size=c["batch_size"], progress=False)
        runs[name] = {"stats": stats, "summary": summary, "seconds": time.perf_counter() - start, "peak": _peak_gb()}
    scores = ("norm_ratio", "block_influence")
    diff = max(float(((runs["bf16"]["stats"][k] - runs["fp32"]["stats"][k]).abs()
                      / runs["fp32"]["stats"][k].abs().clamp_min(1e-12)).max()) for k in scores)
    drop = max(1, cfg["teacher"]["layers"] // 4)
    order = {n: {k: torch.argsort(r["stats"][k].double())[:drop].sort().values.tolist() for k in scores}
             for n, r in runs.items()}
    return {"tokens": runs["bf16"]["summary"]["tokens"], "bf16_seconds": round(runs["bf16"]["seconds"], 2),
            "fp32_seconds": round(runs["fp32"]["seconds"], 2), "bf16_peak_gb": runs["bf16"]["peak"],
            "max_rel_score_diff": diff, "layers_dropped": drop, "same_layers": order["bf16"] == order["fp32"],
            "bf16_layers": order["bf16"], "fp32_layers": order["fp32"]}


def section_fsdp(work: Path, models: dict, cfg: dict) -> dict:
    """World size 1 under `strategy: fsdp`: step checkpoints, the final checkpoint reloaded."""
    import torch
    import transformers as tf
    from safetensors.torch import load_file

    from cascadec.runtime.stages import distill

    stage = distill_stage(cfg, 4, strategy="fsdp", every=2)
    ctx = context(work / "fsdp", stage, dict(models), {"stdlib": STDLIB})
    _reset_peak()
    start = time.perf_counter()
    metrics = distill.run(ctx)
    model = tf.AutoModelForCausalLM.from_pretrained(ctx.out / "model", dtype="auto")
    saved = {}
    for f in sorted((ctx.out / "model").glob("*.safetensors")):
        saved.update(load_file(str(f)))
    same = all(torch.equal(p.detach().cpu(), saved[n]) for n, p in model.named_parameters() if n in saved)
    checkpoints = sorted(p.name for p in (ctx.scratch / "checkpoints").glob("step-*"))
    return {"seconds": round(time.perf_counter() - start, 1), "peak_gb": _peak_gb(), "steps": metrics.get("steps"),
            "step_checkpoints": checkpoints, "reloaded": True, "reload_equal": same,
            "dtype": str(next(model.parameters()).dtype), "strategy": metrics.get("strategy"),
            "teacher_placement": metrics.get("teacher_placement"), "saved_dtype": metrics.get("dtype")}


SECTIONS = {"distill": section_distill, "kd_memory": section_kd_memory, "eval": section_eval,
            "calibrate": section_calibrate, "fsdp": section_fsdp}


def child(name: str, work: Path, cfg: dict, steps: int) -> dict:
    models = {"teacher": work / "teacher", "student": work / "student"}
    fn = SECTIONS[name]
    if name == "kd_memory":
        return fn(cfg)
    if name == "distill":
        return fn(work, models, cfg, steps)
    return fn(work, models, cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="where gpu_check.json goes")
    parser.add_argument("--steps", type=int, default=12, help="distill steps for (a)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device there is")
    parser.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run these sections only")
    parser.add_argument("--child", nargs=2, metavar=("SECTION", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = SMOKE if args.smoke else FULL
    if args.child:
        name, work = args.child
        print("RESULT " + json.dumps(child(name, Path(work), cfg, args.steps)), flush=True)
        return

    import torch

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {device}; torch {torch.__version__}; work {work}", flush=True)
    start = time.perf_counter()
    build(work, cfg)
    results = {"device": device, "torch": torch.__version__, "smoke": args.smoke,
               "build_seconds": round(time.perf_counter() - start, 1)}
    for name in args.only or list(SECTIONS):
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--child", name, str(work), "--steps", str(args.steps)]
        proc = subprocess.run(cmd + (["--smoke"] if args.smoke else []), capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode == 0 and lines:
            results[name] = {**json.loads(lines[-1][7:]), "wall_s": round(time.perf_counter() - t0, 1)}
        else:
            results[name] = {"error": (proc.stderr or proc.stdout).strip().splitlines()[-12:]}
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    sys.exit(0 if all("error" not in results[n] for n in args.only or SECTIONS) else 1)


def table(r: dict) -> str:
    def get(section, key):
        v = (r.get(section) or {}).get(key)
        return "error" if "error" in (r.get(section) or {}) else ("-" if v is None else v)

    rows = [
        ("distill, bf16, 4,096-token sequences", f"{get('distill', 'tokens_per_s')} tok/s, MFU {get('distill', 'mfu')}, "
         f"peak {get('distill', 'peak_gb')} GiB, saved {get('distill', 'saved_dtype')}"),
        ("KD loss memory (vocab 131,072 x 4,096)", f"chunked {get('kd_memory', 'chunked_gb')} GiB vs naive "
         f"{get('kd_memory', 'naive_gb')} GiB = {get('kd_memory', 'ratio')}x"),
        ("eval, bf16, chunked CE", f"{get('eval', 'tokens_per_s')} tok/s, peak {get('eval', 'peak_gb')} GiB"),
        ("calibrate, bf16 vs fp32", f"max score diff {get('calibrate', 'max_rel_score_diff')}, same layers "
         f"{get('calibrate', 'same_layers')}, {get('calibrate', 'bf16_seconds')} s"),
        ("FSDP2, world size 1", f"reload equal {get('fsdp', 'reload_equal')}, checkpoints "
         f"{get('fsdp', 'step_checkpoints')}, peak {get('fsdp', 'peak_gb')} GiB"),
    ]
    head = f"| check ({r['device']}) | result |\n| --- | --- |\n"
    return head + "\n".join(f"| {a} | {b} |" for a, b in rows)


if __name__ == "__main__":
    main()
