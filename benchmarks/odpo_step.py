"""Where an odpo step's time goes (not a test): the real `odpo` stage on a small Mistral on CPU.

    .venv/bin/python benchmarks/odpo_step.py [--steps 4] [--prompts-per-step 16] [--new-tokens 48]

Per step and process: generation (2 samples per prompt through the engine, KV cache), judging
(a Python callable here: `shorter` below; a model judge costs about one forward of the prompt
and both answers per pair, in both orders), the frozen reference's log-probs of both samples,
the policy's forward and backward (the update), and the rest (optimiser step, metrics, the
win rate on held-out prompts every `--win-every` steps). The stage measures the first four
itself (`generate_s`, `judge_s`, `reference_s`, `update_s` in its metrics); the rest is the wall
time minus them.

The policy's head is given an EOS logit of about +4 at every position, so samples end after
a couple of dozen tokens as an instruct model's do (a random model never ends: every pair would
tie on "both unterminated" and the judge would never be asked).

Measured 2026-11-30 (2-core CPU shared with five other jobs, one thread; 4 steps of 16 prompts,
up to 48 new tokens, mean 19; hidden 256 x 4 layers, vocab 320, fp32), seconds per step:

    generate 1.54 (26%) · judge 0.00 (callable) · reference 0.93 (16%) · update 2.80 (47%)
    · other 0.65 (11%) · total 5.91; generation 353 tokens/s

At this size and these short answers the policy's forward + backward dominates; generation's
share grows with the answer length (one forward per new token, against one forward for the
whole sequence in the reference and the update), which is why it dominates real runs, as
TRL's users report for GPU runs (posttrain.md §4.2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPE = dict(layers=4, hidden=256, ffn=768, heads=4, kv_heads=2, head_dim=64)
PARTS = ("generate_s", "judge_s", "reference_s", "update_s")


def shorter(prompts, a, b, **columns):
    """P(a ≻ b) = σ((len(b) − len(a)) / 8) over characters: the judge of this benchmark."""
    return [1.0 / (1.0 + math.exp((len(x) - len(y)) / 8.0)) for x, y in zip(a, b)]


def policy(path: Path, eos_logit: float) -> Path:
    from safetensors.torch import load_file, save_file
    from tinymodels import save_model

    save_model(path, "mistral", seed=0, **SHAPE)
    weights = load_file(str(path / "model.safetensors"))
    weights["model.embed_tokens.weight"][:, 0] = 1.0  # a constant channel the final norm keeps at ≈ √hidden
    weights["lm_head.weight"][2, 0] = eos_logit / SHAPE["hidden"] ** 0.5  # token 2 is EOS
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def stage(args) -> dict:
    return {"id": "bench/odpo", "kind": "odpo", "hash": "bench", "config": {
        "seq_len": 64 + args.new_tokens, "global_batch": args.prompts_per_step, "micro_batch": 4,
        "steps": args.steps, "beta": 0.1, "prompts": args.steps * args.prompts_per_step,
        "data": {"name": "prompts", "offset": 0, "shuffle": True},
        "generation": {"samples": 2, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": args.new_tokens},
        "judges": {"short": {"kind": "callable", "function": "odpo_step:shorter", "temperature": 1.0}},
        "strip_thinking": False, "win_rate": {"prompts": args.heldout, "every_steps": args.win_every},
        "optimizer": {"lr": 1e-4, "min_lr": 1e-5, "weight_decay": 0.0, "grad_clip": 1.0},
        "schedule": {"kind": "constant", "warmup_steps": 0}, "checkpoint": {"every_steps": 0},
        "seed": 0, "precision": "fp32"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--heldout", type=int, default=16)
    parser.add_argument("--win-every", type=int, default=2)
    parser.add_argument("--eos-logit", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from cascadec.runtime.context import StageContext
    from cascadec.runtime.stages import odpo

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = policy(work / "policy", args.eos_logit)
        (work / "prompts.jsonl").write_text("".join(
            json.dumps({"prompt": f"Write {i} words about the number {i * 7}."}) + "\n"
            for i in range(args.heldout + args.steps * args.prompts_per_step)))
        source = {"kind": "jsonl", "paths": [str(work / "prompts.jsonl")], "format": "prompts", "name": "prompts"}
        (work / "out").mkdir()
        ctx = StageContext(stage=stage(args), inputs={"policy": model}, data={"prompts": source}, out=work / "out",
                           scratch=work / "scratch", log=lambda line: None)
        started = time.perf_counter()
        metrics = odpo.run(ctx)
        wall = time.perf_counter() - started
        lines = [json.loads(x) for x in (work / "out" / "metrics.jsonl").read_text().splitlines()]

    steps = args.steps
    other = metrics["wall_s"] - sum(metrics[k] for k in PARTS)
    rows = [*((k.removesuffix("_s"), metrics[k]) for k in PARTS), ("other (optimiser, metrics, win rate)", other)]
    total = sum(v for _, v in rows)
    print(f"odpo step on CPU: {steps} steps x {args.prompts_per_step} prompts x 2 samples, up to {args.new_tokens} "
          f"new tokens; model {SHAPE}, {args.threads} thread(s)")
    print(f"{'part':<40} {'s/step':>8} {'share':>7}")
    for name, seconds in rows:
        print(f"{name:<40} {seconds / steps:>8.3f} {seconds / total:>7.1%}")
    print(f"{'total (stage loop)':<40} {total / steps:>8.3f}")
    trained = [r for r in lines if "loss" in r]
    print(f"mean completion length {sum(r['mean_length'] for r in trained) / len(trained):.1f} tokens, "
          f"unterminated {sum(r['unterminated_rate'] for r in trained) / len(trained):.0%}, "
          f"gen tok/s {sum(r['gen_tokens_per_s'] for r in trained) / len(trained):,.0f}; "
          f"stage wall incl. loading {wall:.1f}s")


if __name__ == "__main__":
    main()
