"""Estimates at long context and the fit check.

One long-context stage of the Ministral 3 plan is recomputed here by hand from the formulas in
docs/plan.md ("Estimates"), with the shapes written out as numbers, never by calling
`cascadec/estimate.py`. The fit check must fire on an over-budget stage (a warning, or an error
when no sharding could help) and stay silent on a fitting one.
"""

from __future__ import annotations

import json

import pytest

from compilerkit import REPO, cascadec, plan_json

GB = 1e9


@pytest.fixture(scope="module")
def long_8b() -> dict:
    plan = json.loads(plan_json(REPO / "specs" / "ministral3.yaml", "specs/ministral3.yaml"))
    return next(s for s in plan["stages"] if s["id"] == "distill/ministral-3-8b/long")


def test_long_context_stage_by_hand(long_8b):
    c, launch, e = long_8b["config"], long_8b["launch"], long_8b["estimate"]
    # the stage as the spec writes it
    assert (c["seq_len"], c["micro_batch"], c["precision"], c["activation_checkpointing"]) == (262144, 1, "bf16", True)
    assert (launch["devices"], launch["strategy"], c["loss"]["chunk_tokens"]) == (16, "fsdp", 1024)
    s, t, P, e_bytes = 262144, 262144, 16, 2
    # student: Ministral 3 8B; teacher: Mistral Small 3.1 (online)
    N, L, h, f, d_attn, d_kv, V = 8_489_553_920, 34, 4096, 14336, 32 * 128, 8 * 128, 131072
    N_T, L_T, h_T, f_T = 23_572_403_200, 40, 5120, 32768
    D = 4768 * 262144 * 16
    assert e["tokens"] == D == 19_998_441_472

    # FLOPs: 3 passes of (2N + 2·L·d_attn·(s+1)) for the student, one teacher forward
    attention = 3 * 2 * L * d_attn * (s + 1) + 2 * L_T * d_attn * (s + 1)
    assert e["attention_flops"] == attention * D
    assert e["flops"] == (6 * N + 2 * N_T) * D + attention * D
    assert e["flops"] / ((6 * N + 2 * N_T) * D) == pytest.approx(4.11, abs=0.005)  # attention: 3/4 of the stage
    assert e["device_hours"] == pytest.approx(e["flops"] / (989e12 * 0.4) / 3600, abs=1e-4)

    # memory per device, GB
    A = e_bytes * (4 * h + 2 * d_attn + 2 * d_kv + 4 * f)  # one layer's saved tensors per token
    A_T = e_bytes * (4 * h_T + 2 * d_attn + 2 * d_kv + 4 * f_T)
    assert (A, A_T) == (167_936, 323_584)
    by_hand = {
        "weights": 4 * N / P,
        "grads": 4 * N / P,
        "optimizer": 8 * N / P,
        "activations": t * (L * e_bytes * h + A + e_bytes * h),  # checkpointed: layer inputs + one layer
        "teacher": 2 * N_T + t * (A_T + e_bytes * h_T),
        "logits": 14 * 1024 * V + e_bytes * t * h + 4 * V * h,
    }
    assert e["memory"] == {k: round(v / GB, 4) for k, v in by_hand.items()}
    assert e["memory"] == {"weights": 2.1224, "grads": 2.1224, "optimizer": 4.2448, "activations": 119.1853,
                           "teacher": 134.6548, "logits": 6.174}
    assert e["memory_gb"] == round(sum(by_hand.values()) / GB, 4) == 268.5037
    assert e["device_memory_gb"] == 80  # one h100


def test_without_checkpointing_every_layer_keeps_its_activations(tmp_path):
    spec = (REPO / "specs" / "ministral3.yaml").read_text().replace("activation_checkpointing: true", "activation_checkpointing: false")
    (tmp_path / "m3.yaml").write_text(spec)
    run = cascadec("plan", str(tmp_path / "m3.yaml"), "--format", "json")
    assert run.code == 0, run.err
    stage = next(s for s in json.loads(run.out)["stages"] if s["id"] == "distill/ministral-3-8b/long")
    t, L, h, A = 262144, 34, 4096, 167_936
    assert stage["estimate"]["memory"]["activations"] == round(t * (L * A + 2 * h) / GB, 4) == 1498.9436


FIT = """\
cascadec: 1
family: f
hardware: {device: h100}
defaults:
  resources: {devices: 8, strategy: fsdp, precision: bf16, activation_checkpointing: CKPT}
  batch: {global: 64, micro: 1}
models:
  parent:
    source: {hub: Qwen/Qwen3-8B}
    arch: {preset: qwen3-8b}
data:
  text: {kind: builtin, builtin: stdlib}
children:
  - name: child
    prune_from: parent
    shape: {layers: 30}
    pruning: {calibration: {data: text}}
    phases:
      - name: long
        teacher: parent
        data: text
        tokens: 10B
        seq_len: 32768
"""


def plan(tmp_path, text: str):
    (tmp_path / "f.yaml").write_text(text)
    return cascadec("plan", str(tmp_path / "f.yaml"))


def test_a_fitting_stage_passes_silently(tmp_path):
    run = plan(tmp_path, FIT.replace("CKPT", "true"))
    assert run.code == 0, run.err
    assert "CSC24" not in run.err


def test_an_over_budget_stage_warns_with_its_breakdown_and_the_fix(tmp_path):
    run = plan(tmp_path, FIT.replace("CKPT", "false"))
    assert run.code == 0, run.err  # a warning: the plan is still written
    assert "f.yaml:23:18: warning[CSC242]: 'distill/child/long' may not fit: about 189.9 GB per device, " \
           "more than the 80 GB budget" in run.err
    assert "= note: GB per device: weights 3.5 + grads 3.5 + optimizer 7.0 + activations 149.3 + teacher 21.6 + " \
           "logits 4.9 = 189.9 (fsdp over 8 devices divides weights, grads and optimizer state; the teacher is " \
           "replicated on every device)" in run.err
    assert "= help: set `resources.activation_checkpointing: true`" in run.err


def test_the_budget_is_resources_memory_gb_when_given(tmp_path):
    run = plan(tmp_path, FIT.replace("CKPT", "false").replace("precision: bf16,", "precision: bf16, memory_gb: 200,"))
    assert run.code == 0 and "CSC24" not in run.err, run.err
    run = plan(tmp_path, FIT.replace("CKPT", "true").replace("precision: bf16,", "precision: bf16, memory_gb: 40,"))
    assert "warning[CSC242]: 'distill/child/long' may not fit: about 53.9 GB per device, more than the 40 GB budget" \
        in run.err


def test_a_stage_no_sharding_could_fit_is_an_error(tmp_path):
    run = plan(tmp_path, FIT.replace("CKPT", "true").replace("devices: 8, strategy: fsdp", "devices: 1, strategy: none")
               .replace("qwen3-8b", "llama-3.1-70b").replace("layers: 30", "layers: 60"))
    assert run.code == 1
    # 16 bytes per parameter of a 53B child and the 70B teacher's bf16 weights, on one device
    assert "f.yaml:23:18: error[CSC241]: 'distill/child/long' cannot fit: its weights, gradients, optimizer state " \
           "and teacher weights alone need 996.2 GB per device even spread over its one device, more than the 80 GB " \
           "budget" in run.err
    assert "= help: raise `resources.devices` to at least 13 (with `strategy: fsdp`)" in run.err
    # calibration holds the whole 70B parent (bf16) on its device
    assert "f.yaml:17:14: error[CSC241]: 'calibrate/child' cannot fit: its weights alone need 141.1 GB per device " \
           "even spread over its one device" in run.err
    assert "= help: this stage holds the whole model on each device: use a smaller model" in run.err


def test_cpu_plans_have_no_budget(tmp_path):
    run = plan(tmp_path, FIT.replace("CKPT", "false").replace("device: h100", "device: cpu"))
    assert run.code == 0 and "CSC24" not in run.err, run.err
