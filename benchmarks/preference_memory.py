"""Benchmark: peak memory and time of `sequence_logps` (forward + backward) against full logits.

A Mistral-vocabulary (131,072) decoder, small elsewhere so the LM head dominates as it does in a
DPO step; a batch of 4 sequences of 384 tokens whose last 192 are scored. Side by side, each in
its own subprocess (peak RSS = VmHWM): the chunked `sequence_logps`, the same sums through the
model's own full [B, T, V] logits and log-softmax, and a process that only builds the model and
runs the decoder (the floor both share). Times: the median of 3 forward + backward passes.

Run: .venv/bin/python benchmarks/preference_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys

SHAPE = dict(vocab_size=131072, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
B, T, SCORED, CHUNK = 4, 384, 192, 256

RUN = """
import json, statistics, sys, time
import torch, transformers as tf
from cascadec.runtime.training.preference import sequence_logps
torch.manual_seed(0)
shape, (B, T, SCORED, CHUNK), mode = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
model = tf.MistralForCausalLM(tf.MistralConfig(**shape))
ids = torch.randint(4, shape["vocab_size"], (B, T), generator=torch.Generator().manual_seed(1))
attention = torch.ones_like(ids)
mask = torch.zeros_like(ids)
mask[:, T - SCORED:] = 1

def chunked():
    return sequence_logps(model, ids, attention, mask, chunk_tokens=CHUNK)

def full():
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits[:, :-1].float(), -1)
    return (logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]).sum(-1)

def floor():
    return model.model(input_ids=ids, attention_mask=attention).last_hidden_state.float().sum((1, 2))

fn = {"chunked": chunked, "full": full, "floor": floor}[mode]
times, value = [], None
for _ in range(3):
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    out = fn()
    out.sum().backward()
    times.append(time.perf_counter() - t)
    value = out.detach().tolist()
hwm = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"hwm_mb": int(hwm) / 1024, "seconds": statistics.median(times), "value": value}))
"""


def measure(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN, json.dumps(SHAPE), json.dumps([B, T, SCORED, CHUNK]), mode],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    runs = {mode: measure(mode) for mode in ("floor", "chunked", "full")}
    logits_mb = B * T * SHAPE["vocab_size"] * 4 / 2**20
    print(f"vocab {SHAPE['vocab_size']}, batch {B} x {T} tokens, {SCORED} scored per row, chunk {CHUNK}; "
          f"one fp32 [B, T, V] logits tensor is {logits_mb:.0f} MB")
    floor = runs["floor"]["hwm_mb"]
    for mode in ("chunked", "full"):
        r = runs[mode]
        print(f"{mode:8s} peak RSS {r['hwm_mb']:7.0f} MB (+{r['hwm_mb'] - floor:6.0f} MB over the decoder alone), "
              f"forward+backward {r['seconds']:.2f} s")
    diff = max(abs(a - b) for a, b in zip(runs["chunked"]["value"], runs["full"]["value"]))
    print(f"extra memory: chunked / full = {(runs['chunked']['hwm_mb'] - floor) / (runs['full']['hwm_mb'] - floor):.2f}; "
          f"time: chunked / full = {runs['chunked']['seconds'] / runs['full']['seconds']:.2f}; "
          f"largest difference in the sums {diff:.2e} nats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
