"""Where a grpo step's time goes, and the engine's generation against `model.generate` (not a test).

    .venv/bin/python benchmarks/grpo_step.py [--steps 3] [--prompts-per-step 4] [--samples 8] [--new-tokens 48]

Runs the real `grpo` stage on a small Mistral on CPU with two stock rewards computed in worker
processes: `math_answer` (the records carry an answer; a random policy never finds it) and the
soft `length` penalty (which varies with the length, so groups are not constant and every step
updates). The stage measures generation (G samples per prompt through the engine, KV cache),
rewards (`rewards.score` in `--workers` processes) and the update (forward + backward of every
kept completion, in micro-batches) itself; "other" is the wall time minus them (optimiser step,
metrics). Then the same prompts are sampled once more by the engine and by Hugging Face's
`model.generate` (same model, temperature 1, the same batch, left-padded), and the generated
tokens per second of both are printed side by side.

The policy's head is given an EOS logit of about +4 at every position, so samples end after a
couple of dozen tokens (a random model never ends). Figures: see docs/runtime.md, "GRPO".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from odpo_step import SHAPE, policy  # noqa: E402  (one policy fixture for the post-training benchmarks)

PARTS = ("generate_s", "reward_s", "update_s")


def stage(args) -> dict:
    return {"id": "bench/grpo", "kind": "grpo", "hash": "bench", "config": {
        "seq_len": 64 + args.new_tokens, "global_batch": args.prompts_per_step, "micro_batch": 4,
        "steps": args.steps, "beta": 0.0, "prompts": args.steps * args.prompts_per_step,
        "data": {"name": "prompts", "offset": 0, "shuffle": True},
        "generation": {"samples": args.samples, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": args.new_tokens},
        "judges": {"math": {"kind": "math_answer", "weight": 0.9},
                   "length": {"kind": "length", "weight": 0.1, "max_tokens": args.new_tokens,
                              "cache_tokens": args.new_tokens // 2}},
        "preset": "magistral", "drop_constant_groups": False, "reward_workers": args.workers,
        "optimizer": {"lr": 1e-5, "min_lr": 1e-5, "weight_decay": 0.0, "grad_clip": 1.0},
        "schedule": {"kind": "constant", "warmup_steps": 0}, "checkpoint": {"every_steps": 0},
        "seed": 0, "precision": "fp32"}}


def against_generate(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """Generated tokens/s of the engine and of `model.generate` on the same prompts (one batch)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cascadec.runtime.rollout.generate import Sampling, engine

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ours = engine(model, tokenizer, batch_size=len(prompts))
    started = time.perf_counter()
    done = ours.generate(prompts, Sampling(temperature=1.0, max_new_tokens=new_tokens, stop_on_loop=False), seed=1)
    engine_rate = sum(len(c.ids) for c in done) / (time.perf_counter() - started)

    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(1)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=0, max_new_tokens=new_tokens, pad_token_id=pad, eos_token_id=2)
    seconds = time.perf_counter() - started
    new = out[:, width:]
    ended = (new == 2).int()
    lengths = torch.where(ended.any(1), ended.argmax(1) + 1, torch.full((len(prompts),), new.shape[1]))
    return engine_rate, float(lengths.sum()) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--eos-logit", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from cascadec.runtime.context import StageContext
    from cascadec.runtime.stages import grpo

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = policy(work / "policy", args.eos_logit)
        records = [{"prompt": f"What is {i} times 7? Put the answer in \\boxed{{}}.", "answer": str(i * 7)}
                   for i in range(args.steps * args.prompts_per_step * 4)]
        (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        source = {"kind": "jsonl", "paths": [str(work / "prompts.jsonl")], "format": "prompts", "name": "prompts"}
        (work / "out").mkdir()
        ctx = StageContext(stage=stage(args), inputs={"policy": model}, data={"prompts": source}, out=work / "out",
                           scratch=work / "scratch", log=lambda line: None)
        metrics = grpo.run(ctx)
        lines = [json.loads(x) for x in (work / "out" / "metrics.jsonl").read_text().splitlines()]
        trained = work / "out" / "model"  # the stage's output, with the chat template it trained on
        tokenizer = AutoTokenizer.from_pretrained(trained)
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
                   for r in records[:args.prompts_per_step] for _ in range(args.samples)]
        engine_rate, hf_rate = against_generate(trained, prompts, args.new_tokens)

    steps = args.steps
    other = metrics["wall_s"] - sum(metrics[k] for k in PARTS)
    rows = [*((k.removesuffix("_s"), metrics[k]) for k in PARTS), ("other (optimiser, metrics)", other)]
    total = sum(v for _, v in rows)
    print(f"grpo step on CPU: {steps} steps x {args.prompts_per_step} prompts x {args.samples} samples, up to "
          f"{args.new_tokens} new tokens, rewards in {args.workers} workers; model {SHAPE}, {args.threads} thread(s)")
    print(f"{'part':<32} {'s/step':>8} {'share':>7}")
    for name, seconds in rows:
        print(f"{name:<32} {seconds / steps:>8.3f} {seconds / total:>7.1%}")
    print(f"{'total (stage loop)':<32} {total / steps:>8.3f}")
    print(f"mean completion length {sum(r['mean_length'] for r in lines) / len(lines):.1f} tokens")
    print(f"generation, {len(prompts)} samples in one batch: engine {engine_rate:,.0f} tok/s, "
          f"model.generate {hf_rate:,.0f} tok/s ({engine_rate / hf_rate:.2f}x)")


if __name__ == "__main__":
    main()
