"""Generation benchmark (not a test): the engine against `model.generate` on the same prompts.

    .venv/bin/python benchmarks/generation_throughput.py [--prompts 32] [--new 128] [--repeats 3]

A 40M-parameter Mistral config built locally (8 layers, hidden 512, FFN 1408, 8 heads / 4 KV
heads, vocab 16,384; random weights with trained-looking norm gains), fp32 on CPU, 1 thread,
32 prompts of 9 to 96 tokens, 128 new tokens. Both sides run the same model on the same
prompts; `model.generate` gets the left-padded batch with its mask. Three cases:

- greedy and sampled (T = 0.7, top-p = 0.9), every row running to 128 tokens (random weights
  rarely emit EOS; the engine's loop stop is off, as `model.generate` has none): the same
  work on both sides, so the ratio is the per-step cost of each;
- sampled with rows that end: the head gets a bias on EOS (~1/48 per token), so completions
  have varied lengths as a trained model's do; the engine drops finished rows from its batch,
  `model.generate` keeps computing them.

Variants alternate within each repetition and the fastest run of each counts. Rates are
generated tokens per second of this process's CPU time (`time.process_time`, one thread):
the build machine is shared, and wall time there measures the neighbours as much as the
code; wall-clock rates are printed too.

Measured 2026-11-30 on the shared 2-core build machine (load ~10), torch 2.13 CPU,
transformers 5.24, defaults (3 repetitions):

    greedy             engine  389.3 tok/s (4096 tokens)   generate  357.6 tok/s (4096 tokens)   ratio 1.09x
    sampled            engine  266.5 tok/s (4096 tokens)   generate  228.8 tok/s (4096 tokens)   ratio 1.17x
    sampled, rows end  engine  148.8 tok/s (1378 tokens)   generate  100.2 tok/s (1803 tokens)   ratio 1.48x

Where the engine's time goes (cProfile, greedy): the model's linears ~2/3, attention ~10%;
transformers' `DynamicLayer` spent ~7% re-concatenating the cache every step, which the
engine's growing buffers remove. Sampling costs more than greedy on both sides here because a
random model's next-token distribution is nearly flat: at T = 0.7 the nucleus at 0.9 holds
11,088-11,387 of 16,384 tokens (first token of four of the prompts), beyond the engine's top-64
window, so every row falls back to a full sort (as `model.generate`'s top-p always does). A
peaked distribution has its nucleus inside the top 64 and needs the partial sort only (the
tests' sharpened model: 35 tokens).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SHAPE = dict(layers=8, hidden=512, ffn=1408, heads=8, kv_heads=4, head_dim=64, vocab=16384)


def build():
    import transformers as tf

    import tinymodels
    from cascadec.runtime.data.tokenizer import train_bpe

    config = tinymodels.hf_config("mistral", **SHAPE)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.8 * torch.randn(p.shape, generator=g))
    tokenizer = train_bpe([tinymodels.TEXT], 512)  # only decodes; ids above its vocab decode to ''
    return model, tokenizer


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 97, (n,), generator=g).tolist()
    return [torch.randint(3, SHAPE["vocab"], (k,), generator=g).tolist() for k in lengths]


def run_engine(model, tokenizer, batch, sampling) -> int:
    from cascadec.runtime.rollout.generate import engine

    out = engine(model, tokenizer, batch_size=len(batch)).generate(batch, sampling, seed=0)
    return sum(len(c.ids) for c in out)


def run_hf(model, batch, sampling) -> int:
    width = max(map(len, batch))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    kw = dict(do_sample=False) if sampling.temperature == 0 else \
        dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens,
                             pad_token_id=0, eos_token_id=2, **kw)
    new = out[:, width:]
    # rows that ended are padded after their EOS: count up to and including the EOS
    ended = (new == 2).int().cumsum(-1)
    return int(((ended == 0) | ((ended == 1) & (new == 2))).sum())


def ending(model, batch, temperature: float, p_eos: float = 1 / 48):
    """A copy of ``model`` whose head has a bias on EOS, so each token ends a row with
    probability ~``p_eos`` at ``temperature``: completions of varied length, as a trained
    model's are."""
    import copy

    model = copy.deepcopy(model)
    head = model.lm_head
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(head.weight)
        model.lm_head.bias.zero_()
        logits = torch.cat([model(input_ids=torch.tensor([p])).logits[0, -8:] for p in batch[:8]])
        rest = torch.logsumexp(torch.cat([logits[:, :2], logits[:, 3:]], 1) / temperature, -1).mean()
        model.lm_head.bias[2] = temperature * float(torch.log(torch.tensor(p_eos / (1 - p_eos))) + rest)
    return model


def main() -> None:
    from cascadec.runtime.rollout.generate import Sampling

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = build()
    batch = prompts(args.prompts)
    params = sum(p.numel() for p in model.parameters())
    print(f"model {params / 1e6:.1f}M params, {len(batch)} prompts of {min(map(len, batch))}-"
          f"{max(map(len, batch))} tokens, {args.new} new tokens, {args.threads} thread(s)")
    sampled = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=args.new, stop_on_loop=False)
    cases = {"greedy": (model, Sampling(temperature=0, max_new_tokens=args.new, stop_on_loop=False)),
             "sampled": (model, sampled),
             "sampled, rows end": (ending(model, batch, sampled.temperature), sampled)}
    run_engine(model, tokenizer, batch[:2], Sampling(max_new_tokens=2))  # warm-up (lazy imports)
    for case, (m, sampling) in cases.items():
        best = {"engine": (float("inf"), float("inf"), 0), "generate": (float("inf"), float("inf"), 0)}
        for _ in range(args.repeats):
            for name in best:
                cpu, wall = time.process_time(), time.perf_counter()
                tokens = run_engine(m, tokenizer, batch, sampling) if name == "engine" else run_hf(m, batch, sampling)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                best[name] = min(best[name], (cpu, wall, tokens))
        rate = {name: (tokens / cpu, tokens / wall, tokens) for name, (cpu, wall, tokens) in best.items()}
        line = "   ".join(f"{name} {r[0]:6.1f} tok/s ({r[2]:4d} tokens; wall {r[1]:6.1f} tok/s)"
                           for name, r in rate.items())
        print(f"{case:18s} {line}   ratio {rate['engine'][0] / rate['generate'][0]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
