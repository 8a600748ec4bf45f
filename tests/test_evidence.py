"""The evidence a family report rests on, as planned: the compute-matched control's token count
(summed over every training its child descends from, with the arithmetic in its notes) beside the
equal-tokens control, and the eval stages' context lengths. Numbers are worked out by hand here.
"""

from __future__ import annotations

import json

import yaml
from compilerkit import REPO, cascadec

ARCH = "{family: mistral, layers: 4, hidden: 256, ffn: 1024, heads: 4, kv_heads: 2, head_dim: 64, vocab: 1000}"

# Three levels; b is taught by a/long (so a/long is spent on b, and through b/short on c), and
# b/long is a phase nothing of c descends from.
THREE_LEVELS = f"""\
cascadec: 1
family: three
models:
  parent:
    source: {{hub: org/parent}}
    arch: {ARCH}
data:
  web: {{kind: jsonl, paths: ["web/*.jsonl"], field: text}}
  heldout: {{kind: jsonl, paths: ["heldout/*.jsonl"], field: text}}
defaults:
  calibration: {{data: web, samples: 8, seq_len: 256}}
  batch: {{global: 8, micro: 8}}
children:
  - name: a
    prune_from: parent
    shape: {{ffn: 768}}
    phases:
      - {{name: short, teacher: parent, data: web, tokens: 1M, seq_len: 256}}
      - {{name: long, teacher: parent, data: web, tokens: 300K, seq_len: 512}}
  - name: b
    prune_from: a/short
    shape: {{ffn: 512}}
    phases:
      - {{name: short, teacher: a/long, data: web, tokens: 500K, seq_len: 256}}
      - {{name: long, teacher: parent, data: web, tokens: 200K, seq_len: 512}}
  - name: c
    prune_from: b/short
    shape: {{ffn: 256}}
    control: compute-matched
    phases:
      - {{name: short, teacher: parent, data: web, tokens: 250K, seq_len: 256}}
eval:
  data: heldout
  tokens: 10K
  seq_len: [256, 1024, 4096]
"""


def _plan(tmp_path, text: str, name: str = "spec.yaml") -> dict:
    (tmp_path / name).write_text(text)
    run = cascadec("plan", str(tmp_path / name), "--format", "json")
    assert run.code == 0, run.err
    return {s["id"]: s for s in json.loads(run.out)["stages"]}


def _tiny() -> dict:
    run = cascadec("plan", "specs/tiny.yaml", "--format", "json")
    assert run.code == 0, run.err
    return {s["id"]: s for s in json.loads(run.out)["stages"]}


def test_tiny_c_compute_matched_control_counts_bootstrap_and_every_phase_it_descends_from():
    stages = _tiny()
    # 3M family budget; whole steps of 128 x 16 = 2,048 tokens (long: 512 x 4 = 2,048)
    boot, short, long = 732 * 2048, 175 * 2048, 43 * 2048  # 50%, 12%, 3% of 3M, rounded down
    assert (boot, short, long) == (1_499_136, 358_400, 88_064)
    assert stages["bootstrap/parent"]["config"]["tokens"] == boot
    # tiny-a/long and tiny-b/long are not counted: tiny-b is cut from tiny-a/short, tiny-c from tiny-b/short
    total = boot + short + short + short + long
    cm = stages["control/tiny-c/compute-matched"]
    assert cm["config"]["tokens"] == total == 2_662_400
    assert cm["config"]["steps"] == 1_300
    assert (cm["config"]["seq_len"], cm["config"]["global_batch"]) == (128, 16)
    assert cm["config"]["data"] == {"name": "stdlib-stream", "offset": 0, "shuffle": True}
    assert cm["notes"] == [
        "compute-matched: 2,662,400 tokens = bootstrap/parent 1,499,136 + distill/tiny-a/short 358,400 + "
        "distill/tiny-b/short 358,400 + distill/tiny-c/short 358,400 + distill/tiny-c/long 88,064; "
        "trains 1,300 whole steps of 2,048 tokens (seq_len 128 x batch 16) = 2,662,400"]
    assert cm["kind"] == "control" and cm["config"]["shape"] == stages["control/tiny-c/equal-tokens"]["config"]["shape"]
    # the equal-tokens control: the child's own two phases, read from its first phase's window
    eq = stages["control/tiny-c/equal-tokens"]["config"]
    assert eq["tokens"] == short + long == 446_464
    assert eq["data"]["offset"] == stages["distill/tiny-c/short"]["config"]["data"]["offset"] == boot + 2 * (short + long)
    assert [s for s in stages if s.startswith("control/")] == [
        "control/tiny-a/equal-tokens", "control/tiny-b/equal-tokens",
        "control/tiny-c/compute-matched", "control/tiny-c/equal-tokens"]
    names = stages["eval/tiny-c"]["config"]["checkpoints"]
    assert names[-2:] == ["tiny-c/control/equal-tokens", "tiny-c/control/compute-matched"]
    assert stages["eval/tiny-c"]["config"]["trained_context"]["tiny-c/control/compute-matched"] == 128


def test_three_levels_count_a_teachers_making_and_skip_phases_nothing_descends_from(tmp_path):
    stages = _plan(tmp_path, THREE_LEVELS)
    per_short, per_long = 256 * 8, 512 * 8
    a_short, a_long = 1_000_000 // per_short * per_short, 300_000 // per_long * per_long
    b_short, c_short = 500_000 // per_short * per_short, 250_000 // per_short * per_short
    assert (a_short, a_long, b_short, c_short) == (999_424, 299_008, 499_712, 249_856)
    cm = stages["control/c/compute-matched"]
    assert cm["config"]["tokens"] == a_short + a_long + b_short + c_short == 2_048_000  # the parent is external: 0
    assert cm["config"]["steps"] == 1_000
    assert cm["notes"] == [
        "compute-matched: 2,048,000 tokens = distill/a/short 999,424 + distill/a/long 299,008 + "
        "distill/b/short 499,712 + distill/c/short 249,856; trains 1,000 whole steps of 2,048 tokens "
        "(seq_len 256 x batch 8) = 2,048,000"]
    assert "control/c/equal-tokens" not in stages
    assert cm["provenance"]["config.tokens"] == (
        "compute-matched: the tokens of every training c/short descends from")


def test_eval_contexts_score_the_same_first_tokens_at_each_length(tmp_path):
    stages = _plan(tmp_path, THREE_LEVELS)
    cfg = stages["eval/c"]["config"]
    # 10,000 tokens cut to 8,192: the fewest whole sequences at every length are lcm(256, 1024, 4096) = 4,096 tokens
    assert (cfg["seq_len"], cfg["tokens"], cfg["micro_batch"]) == (256, 8_192, 64)  # the first length is the headline
    assert cfg["contexts"] == [{"seq_len": 256, "tokens": 8_192, "micro_batch": 64},
                               {"seq_len": 1024, "tokens": 8_192, "micro_batch": 16},
                               {"seq_len": 4096, "tokens": 8_192, "micro_batch": 4}]
    assert cfg["trained_context"] == {"c/pruned": 256, "c/short": 256, "c/control/compute-matched": 256}
    assert stages["eval/parent"]["config"]["trained_context"] == {"parent": None}  # an external model, no context given
    assert stages["eval/c"]["estimate"]["tokens"] == 8_192 * 3 * 3  # three lengths, three checkpoints
    tiny = _tiny()["eval/tiny-a"]["config"]
    assert tiny["tokens"] == 32_768
    assert tiny["contexts"] == [{"seq_len": 128, "tokens": 32_768, "micro_batch": 128},
                                {"seq_len": 512, "tokens": 32_768, "micro_batch": 32}]
    # the variants are grown from the long phase: they have seen 512 tokens of context
    assert tiny["trained_context"] == {"tiny-a/pruned": 128, "tiny-a/short": 128, "tiny-a/long": 512,
                                       **{f"tiny-a/{v}": 512 for v in ("instruct/sft", "instruct/odpo", "reasoning/sft",
                                                                       "reasoning/grpo", "reasoning/odpo")},
                                       "tiny-a/control/equal-tokens": 128}


def test_one_length_plans_what_it_always_did(tmp_path):
    spec = yaml.safe_load(THREE_LEVELS)
    spec["eval"]["seq_len"] = 256
    spec["children"][2]["control"] = True
    stages = _plan(tmp_path, yaml.safe_dump(spec, sort_keys=False))
    cfg = stages["eval/c"]["config"]
    assert "contexts" not in cfg and "trained_context" not in cfg
    assert (cfg["seq_len"], cfg["tokens"]) == (256, 10_000)
    assert [s for s in stages if s.startswith("control/")] == ["control/c/equal-tokens"]  # true = [equal-tokens]
    assert stages["control/c/equal-tokens"]["config"]["tokens"] == 249_856
