"""Distillation benchmark (not a test): throughput against a bare-loop floor and against TRL's
GKDTrainer, and the KD loss's peak memory against the naive full-logit computation.

    .venv/bin/python benchmarks/distill_throughput.py [--steps 6] [--skip-memory] [--skip-trl]

(a) tokens/s of the `distill` stage (the real `train` loop: data reads, metrics, chunked loss)
    over a bare loop on the same models and batches: teacher forward + student forward/backward
    with full logits and `F.kl_div` + AdamW step. Target >= 0.9.
(b) peak memory of one KD loss forward+backward at vocab 131,072 and 4,096 tokens, chunked over
    naive. Method: each variant runs in a fresh subprocess; peak = ru_maxrss after the loss minus
    the RSS just before it (inputs already allocated). Large tensors come from mmap and go back
    to the OS when freed, so RSS tracks live tensors. Target <= 0.25.
(c) tokens/s of the `distill` stage over TRL's GKDTrainer (forward KL: lmbda=0, beta=0, no
    student sampling) on the same models and batches. Target >= 1.3. Skipped without trl.

Each throughput variant runs --repeats times (3), interleaved, and the fastest run counts: on a
shared machine the least-disturbed run is the best estimate of what the code costs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

TEACHER = dict(layers=4, hidden=256, ffn=512, heads=4, kv_heads=2, head_dim=64, vocab=16384)
STUDENT = dict(layers=2, hidden=128, ffn=256, heads=2, kv_heads=1, head_dim=64, vocab=16384)
SEQ_LEN, MICRO, GLOBAL = 256, 4, 8
MEMORY_VOCAB, MEMORY_TOKENS, MEMORY_HIDDEN = 131_072, 4_096, 64


def stage(steps: int) -> dict:
    return {"id": "bench/distill", "kind": "distill", "config": {
        "seq_len": SEQ_LEN, "global_batch": GLOBAL, "micro_batch": MICRO, "steps": steps,
        "tokens": steps * SEQ_LEN * GLOBAL, "data": {"name": "stdlib", "offset": 0},
        "loss": {"kind": "forward_kl", "temperature": 1.0, "chunk_tokens": 1024},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "weight_decay": 0.0, "grad_clip": None},
        "schedule": {"kind": "constant", "warmup_steps": 0}, "checkpoint": {"every_steps": 0},
        "seed": 0, "precision": "fp32"}}


# ---------------------------------------------------------------------------------------------
# (a) and (c): throughput


def run_ours(models: dict, steps: int, work: Path) -> float:
    from cascadec.runtime.context import StageContext
    from cascadec.runtime.stages import distill

    (work / "out").mkdir(parents=True)
    ctx = StageContext(stage=stage(steps), inputs=models, data={"stdlib": STDLIB}, out=work / "out",
                       scratch=work / "scratch", cache=CACHE, log=lambda m: None)
    return distill.run(ctx)["tokens_per_s"]


def batches(models: dict, steps: int) -> list[torch.Tensor]:
    """The exact micro-batches the stage reads, in order."""
    from transformers import AutoTokenizer

    from cascadec.runtime.data.stream import Window, micro_batches, open_stream

    window = Window.from_config(stage(steps)["config"])
    tok = AutoTokenizer.from_pretrained(models["student"])
    stream = open_stream(STDLIB, tok, models["student"], CACHE, window.tokens, log=lambda m: None)
    return [ids for s in range(steps) for ids, _ in micro_batches(stream, window, s, 0, 1, MICRO)]


def run_floor(models: dict, micro_batches: list[torch.Tensor]) -> float:
    """The bare loop: nothing but the work any distillation step must do, written naively."""
    from cascadec.runtime.training.models import load_model

    torch.manual_seed(0)
    student, teacher = load_model(models["student"]).train(), load_model(models["teacher"]).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    accum = GLOBAL // MICRO
    start = time.perf_counter()
    for i, ids in enumerate(micro_batches):
        with torch.no_grad():
            t = teacher(input_ids=ids).logits[:, :-1]
        s = student(input_ids=ids).logits[:, :-1]
        loss = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1).mean()
        (loss / accum).backward()
        if (i + 1) % accum == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return len(micro_batches) * MICRO * SEQ_LEN / (time.perf_counter() - start)


def run_trl(models: dict, micro_batches: list[torch.Tensor], steps: int, work: Path) -> float:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from cascadec.runtime.training.models import load_model

    rows = torch.cat(micro_batches)
    dataset = Dataset.from_dict({"input_ids": rows.tolist()})

    def collate(examples):
        ids = torch.tensor([e["input_ids"] for e in examples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "prompts": ids[:, :1]}

    args = GKDConfig(output_dir=str(work), max_steps=steps, per_device_train_batch_size=MICRO,
                     gradient_accumulation_steps=GLOBAL // MICRO, learning_rate=1e-3, weight_decay=0.0,
                     lr_scheduler_type="constant", max_grad_norm=0.0, lmbda=0.0, beta=0.0, temperature=1.0,
                     max_length=SEQ_LEN, report_to="none", save_strategy="no", logging_steps=10_000,
                     use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,  # as ours: no recompute
                     dataloader_num_workers=0, disable_tqdm=True, seed=0)
    tok = AutoTokenizer.from_pretrained(models["student"])
    trainer = GKDTrainer(model=load_model(models["student"]), teacher_model=load_model(models["teacher"]), args=args,
                         data_collator=collate, train_dataset=dataset, processing_class=tok)
    start = time.perf_counter()
    trainer.train()
    return steps * GLOBAL * SEQ_LEN / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# (b): memory, one variant per subprocess


def memory_child(variant: str) -> None:
    from cascadec.runtime.training.kd import LossSpec, Teacher, chunked_loss

    g = torch.Generator().manual_seed(0)
    n, v, h = MEMORY_TOKENS, MEMORY_VOCAB, MEMORY_HIDDEN
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.1).requires_grad_()
    t_hidden, t_weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.1
    labels = torch.zeros(n, dtype=torch.long)
    before = _rss()
    if variant == "naive":
        s = hidden @ weight.T
        with torch.no_grad():
            t = t_hidden @ t_weight.T
        loss = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1).mean()
    else:
        spec = LossSpec(chunk_tokens=int(variant.split("-")[1]))
        loss = chunked_loss(hidden, weight, labels, spec, Teacher(hidden=t_hidden, weight=t_weight))
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"variant": variant, "peak_bytes": peak, "loss": float(loss.detach())}))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure_memory(variant: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", variant], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per variant; the fastest counts")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child)

    from tinymodels import save_model

    global STDLIB, CACHE
    work = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    STDLIB, CACHE = {"kind": "builtin", "builtin": "stdlib"}, work / "cache"
    models = {"teacher": save_model(work / "teacher", seed=1, **TEACHER),
              "student": save_model(work / "student", seed=2, **STUDENT)}
    print(f"threads {torch.get_num_threads()}; teacher {TEACHER}; student {STUDENT}; "
          f"seq_len {SEQ_LEN}, micro {MICRO}, global {GLOBAL}, {args.steps} steps")
    data = batches(models, args.steps)
    have_trl = importlib.util.find_spec("trl") is not None and not args.skip_trl
    if not have_trl:
        print("(c) skipped: trl is not installed (pip install trl) or --skip-trl was given")
    results: dict[str, list[float]] = {"ours": [], "floor": [], "trl": []}
    for rep in range(args.repeats):
        results["floor"].append(run_floor(models, data))
        results["ours"].append(run_ours(models, args.steps, work / f"ours{rep}"))
        if have_trl:
            results["trl"].append(run_trl(models, data, args.steps, work / f"trl{rep}"))
    best = {k: max(v) for k, v in results.items() if v}
    print(json.dumps({k: [round(x) for x in v] for k, v in results.items()}))
    print(f"(a) distill stage {best['ours']:,.0f} tok/s / floor {best['floor']:,.0f} tok/s = "
          f"{best['ours'] / best['floor']:.3f}  (target >= 0.9)")
    if have_trl:
        print(f"(c) distill stage / TRL GKDTrainer {best['trl']:,.0f} tok/s = {best['ours'] / best['trl']:.3f}  "
              "(target >= 1.3)")
    if not args.skip_memory:
        naive = measure_memory("naive")
        print(f"(b) naive full-logit KD at vocab {MEMORY_VOCAB:,}, {MEMORY_TOKENS:,} tokens: "
              f"{naive['peak_bytes'] / 2**30:.2f} GiB peak")
        for chunk in (256, 512, 1024):
            ours = measure_memory(f"chunked-{chunk}")
            print(f"    chunked, chunk_tokens {chunk}: {ours['peak_bytes'] / 2**30:.3f} GiB = "
                  f"{ours['peak_bytes'] / naive['peak_bytes']:.3f} of naive (target <= 0.25); "
                  f"loss {ours['loss']:.6f} vs naive {naive['loss']:.6f}")


if __name__ == "__main__":
    main()
