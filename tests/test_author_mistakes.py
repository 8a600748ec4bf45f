"""The table of what a new spec author gets wrong (issue 12), each with what cascadec must answer.

Every row edits one small, valid spec (BASE) and states the exact outcome: the located
diagnostics (line:col, severity, code, message, help) in the order they print, or a clean plan
and the values it must hold. No row may end in a traceback. Rows are grouped by the issue's
items: counts (1), context and RoPE (2), pruning defaults and the solver (5), root cause
first (8), and the smaller ones (9).
"""

from __future__ import annotations

import pytest
from compilerkit import cascadec

from cascadec import compile as compiler, source
from cascadec.diagnostics import CompileError
from cascadec.shapes import Shape, config_errors, param_count
from cascadec.spec import DEFAULT_METHODS

BASE = """\
cascadec: 1
family: demo
models:
  parent:
    source: {hub: org/parent}
    arch: {family: mistral, layers: 8, hidden: 512, ffn: 2048, heads: 8, kv_heads: 4, head_dim: 64, vocab: 1000, max_position_embeddings: 32768}
data: {web: {kind: jsonl, paths: ["data/*.jsonl"], field: text},
  chats: {kind: jsonl, paths: ["data/chat/*.jsonl"], format: chat}}
defaults:
  calibration: {data: web, samples: 64}
  batch: {global: 16, micro: 4}
children:
  - name: small
    prune_from: parent
    shape: {ffn: 1024}
    phases:
      - {name: short, teacher: parent, data: web, tokens: 1B, seq_len: 1024}
"""
SFT = """\
    variants:
      chat:
        - {name: sft, kind: sft, from: short, data: chats, tokens: 1B, seq_len: SEQ}
"""


def edit(*pairs: tuple[str, str], text: str = BASE) -> str:
    for old, new in pairs:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def outcome(text: str):
    """(rendered diagnostics, plan or None): one `L:C: severity[CODE]: message | help` line each."""
    try:
        result = compiler.compile_doc(source.parse(text, "spec.yaml"), {})
        diags, plan = result.warnings, result.plan
    except CompileError as e:
        diags, plan = e.diagnostics, None
    key = lambda d: (d.span.line if d.span else 0, d.span.col if d.span else 0, d.code)  # noqa: E731
    return [f"{d.span.line}:{d.span.col}: {d.severity}[{d.code}]: {d.message} | {d.help}"
            + (f" | notes: {'; '.join(d.notes)}" if d.notes else "") for d in sorted(diags, key=key)], plan


def stage(plan: dict, sid: str) -> dict:
    return next(s for s in plan["stages"] if s["id"] == sid)


def same_plan(a: dict, b: dict) -> bool:
    return {**a, "spec_sha256": ""} == {**b, "spec_sha256": ""}


BASE_PLAN = outcome(BASE)[1]
COUNT_HELP = "a count is a whole number: write an integer (3e12 is fine) or a suffixed count such as 250B or 3T"

# (id, spec text, expected diagnostics); an empty list means a clean plan.
MISTAKES = [
    # -- 1. counts as floats --------------------------------------------------------------------
    ("tokens-fraction", edit(("tokens: 1B", "tokens: 2.5")),
     [f"17:59: error[CSC106]: children[0].phases[0].tokens is 2.5, which is not a whole number | {COUNT_HELP}"]),
    ("seq_len-fraction", edit(("seq_len: 1024", "seq_len: 1024.5")),
     ["17:72: error[CSC106]: children[0].phases[0].seq_len is 1024.5, which is not a whole number | "
      "write a whole number here"]),
    ("tokens-infinite", edit(("tokens: 1B", "tokens: 1e400")),
     ["17:59: error[CSC106]: children[0].phases[0].tokens is 1e400, which is too large to be a count | "
      "the largest count is 9,223,372,036,854,775,807 (2^63 - 1); check the exponent or the suffix"]),
    ("seq_len-nan", edit(("seq_len: 1024", "seq_len: .nan")),
     ["17:72: error[CSC106]: children[0].phases[0].seq_len is .nan, which is not a number | write a whole number here"]),
    ("tokens-negative", edit(("tokens: 1B", "tokens: -3e12")),
     ["17:59: error[CSC104]: children[0].phases[0].tokens is -3e12; it must be >= 0 | write a number >= 0"]),
    ("suffix-fraction", edit(("tokens: 1B", "tokens: 1.2345K")),
     ["17:59: error[CSC106]: children[0].phases[0].tokens is 1.2345K, which is 1,234.5, not a whole number | "
      "a count is a whole number: use fewer decimals or a smaller suffix (e.g. 1,234 or 1.234K)"]),
    ("samples-exponent", edit(("samples: 64", "samples: 6.4e1")), []),  # 64 exactly
    ("layers-fraction", edit(("layers: 8,", "layers: 7.5,")),
     ["6:37: error[CSC106]: models.parent.arch.layers is 7.5, which is not a whole number | write a whole number here"]),

    # -- 2. context and RoPE --------------------------------------------------------------------
    ("seq_len-beyond-context", edit(("seq_len: 1024", "seq_len: 131072")),
     ["17:32: warning[CSC233]: teacher 'parent' has 32,768 positions but 'small/short' trains on 131,072-token "
      "sequences | the teacher's logits past position 32,768 are extrapolated: use a teacher with a long enough "
      "context, lower seq_len to 32,768, or, if the teacher does handle it (rope scaling at inference), set its "
      "`max_position_embeddings`",
      "17:72: error[CSC231]: 'small/short' trains on 131,072-token sequences, but 'small/pruned' has 32,768 positions "
      "(max_position_embeddings) and no rope scaling is set | extend the context in this phase: add "
      "`max_position_embeddings: 131072` and `rope: {rope_type: yarn, factor: 4, original_max_position_embeddings: "
      "32768}`, or lower seq_len to 32,768"]),
    ("context-raised-without-rope",
     edit(("max_position_embeddings: 32768", "max_position_embeddings: 131072"),
          ("seq_len: 1024}", "seq_len: 1024}\n      - {name: long, teacher: parent, data: web, tokens: 1B, "
                             "seq_len: 65536, max_position_embeddings: 262144}")),
     ["18:103: warning[CSC232]: 'small/long' raises the context from 131,072 to 262,144 positions without rope "
      "scaling | add `rope: {rope_type: yarn, factor: 2, original_max_position_embeddings: 131072}` (Ministral 3: "
      "YaRN factor 16 from 16,384 to 262,144)"]),
    ("rope-factor-short", edit(("seq_len: 1024}", "seq_len: 32768}\n      - {name: long, data: web, tokens: 1B, "
                                "teacher: parent, seq_len: 32768, max_position_embeddings: 131072, rope: {rope_type: "
                                "yarn, factor: 2.0, original_max_position_embeddings: 32768}}")),
     ["18:143: warning[CSC232]: rope factor 2 extends 32,768 positions to 65,536, short of the 131,072 this phase "
      "writes | set `factor: 4` (max_position_embeddings / original_max_position_embeddings)"]),
    ("seq_len-beyond-written-context",
     edit(("seq_len: 1024}", "seq_len: 40000, max_position_embeddings: 32768, rope: {rope_type: yarn, factor: 1.0, "
                             "original_max_position_embeddings: 32768}}")),
     ["17:32: warning[CSC233]: teacher 'parent' has 32,768 positions but 'small/short' trains on 40,000-token "
      "sequences | the teacher's logits past position 32,768 are extrapolated: use a teacher with a long enough "
      "context, lower seq_len to 32,768, or, if the teacher does handle it (rope scaling at inference), set its "
      "`max_position_embeddings`",
      "17:72: error[CSC231]: 'small/short' trains on 40,000-token sequences, longer than the max_position_embeddings "
      "32,768 it writes | set `max_position_embeddings: 40000` or lower seq_len to 32,768"]),
    ("long-phase-legitimate", edit(("seq_len: 1024}", "seq_len: 1024}\n      - {name: long, teacher: parent, "
                                    "data: web, tokens: 1B, seq_len: 32768, max_position_embeddings: 131072, "
                                    "rope: {rope_type: yarn, factor: 4.0, original_max_position_embeddings: 32768}}")),
     []),
    ("sft-beyond-context", edit(("seq_len: 1024}\n", "seq_len: 1024}\n" + SFT.replace("SEQ", "65536"))),
     ["20:81: error[CSC231]: 'small/chat/sft' trains on 65,536-token sequences, but 'small/short' has 32,768 "
      "positions (max_position_embeddings) and no rope scaling is set | extend the context in a long-context phase "
      "first, or lower seq_len to 32,768"]),

    # -- 5. pruning defaults and the solver -------------------------------------------------------
    ("heads-without-method", edit(("shape: {ffn: 1024}", "shape: {ffn: 1024, heads: 4}")), []),
    ("heads-none-explicit", edit(("shape: {ffn: 1024}", "shape: {ffn: 1024, heads: 4}\n    pruning: {heads: none}")),
     ["16:22: error[CSC219]: child 'small' changes attention heads but `pruning.heads` is none | remove `heads: "
      "none` (the default prunes query heads within groups, or whole KV groups when kv_heads shrink), or keep the "
      "source's heads"]),
    ("params-unreachable", edit(("shape: {ffn: 1024}", "shape: {params: 5M, solve: {axes: [ffn]}}")),
     ["15:21: error[CSC213]: no shape of 'small' within 2% of 5,000,000 parameters (source has 32,489,984) | the "
      "smallest shape over ffn has 10,469,888 parameters: target at least 10,264,597, or allow more axes "
      "(`solve.axes`)"]),
    ("params-in-a-gap", edit(("shape: {ffn: 1024}", "shape: {params: 15M, solve: {axes: [layers]}}")),
     ["15:21: error[CSC213]: no shape of 'small' within 2% of 15,000,000 parameters (source has 32,489,984) | "
      "shapes over layers have 4,957,696 to 32,489,984 parameters, but none near the target: the nearest have "
      "12,824,064 and 16,757,248; target one of them, raise `solve.tolerance` to 0.118, or allow more axes "
      "(`solve.axes`)"]),
    ("llama-hidden-heads", edit(("family: mistral", "family: llama"), ("shape: {ffn: 1024}",
                                                                        "shape: {hidden: 320, heads: 6, kv_heads: 2}")),
     ["15:21: error[CSC230]: child 'small': hidden 320 is not a multiple of heads 6, which transformers requires of "
      "llama configs (the checkpoint could not be loaded) | choose hidden as a multiple of 6 (e.g. 318 or 324), or "
      "change heads"]),

    # -- 8. root cause first ----------------------------------------------------------------------
    ("duplicate-child-chain", BASE + "  - name: small\n    prune_from: small/short\n    shape: {ffn: 512}\n    phases:\n"
                                     "      - {name: short, teacher: parent, data: web, tokens: 1B, seq_len: 1024}\n",
     ["18:11: error[CSC205]: duplicate name 'small': it is already a child | models and children share one "
      "namespace; rename one of them"]),
    ("key-typo", edit(("seq_len: 1024", "seqlen: 1024")),
     ["17:63: error[CSC101]: unknown key 'seqlen' in children[0].phases[0] | did you mean 'seq_len'? allowed keys: "
      "batch, checkpoint, data, from, generation, loss, max_position_embeddings, name, optimizer, resources, rope, "
      "schedule, seed, seq_len, teacher, tokens"]),
    ("stage-cycle", edit(("teacher: parent", "teacher: tiny/short")) +
     "  - name: tiny\n    prune_from: small/short\n    shape: {ffn: 512}\n    phases:\n"
     "      - {name: short, teacher: parent, data: web, tokens: 1B, seq_len: 1024}\n",
     ["17:32: error[CSC206]: stage cycle: distill/small/short -> calibrate/tiny -> prune/tiny -> distill/tiny/short -> "
      "distill/small/short | a checkpoint cannot teach or seed its own ancestors"]),
    ("batch-over-devices", edit(("seq_len: 1024}", "seq_len: 1024, resources: {devices: 3}}")),
     ["17:99: error[CSC223]: 'small/short': global batch 16 is not a multiple of micro batch 4 x 3 devices | set "
      "`batch.global` to a multiple of 12, or change `batch.micro` or `resources.devices` | notes: batch.global = 16 "
      "is set at defaults.batch.global (line 11); batch.micro = 4 is set at defaults.batch.micro (line 11)"]),
    ("devices-over-nodes", edit(("seq_len: 1024}", "seq_len: 1024, resources: {devices: 4, nodes: 3}}")),
     ["17:109: error[CSC255]: 'small/short': 4 devices do not split evenly over 3 nodes | `resources.devices` "
      "counts all nodes together: set it to a multiple of 3 (e.g. 3 for 1 per node)"]),

    # -- 9. smaller --------------------------------------------------------------------------------
    ("budget-rounds-down-a-lot", edit(("tokens: 1B", "tokens: 20K")),
     ["17:59: warning[CSC234]: 'small/short' trains 16,384 of the 20,000 tokens asked (18.1% fewer): steps round "
      "down to whole batches of 16,384 | ask for a multiple of 16,384: 16,384 or 32,768 tokens"]),
    ("slurm-options", edit(("batch: {global: 16, micro: 4}", "batch: {global: 16, micro: 4}\n  resources: "
                            "{launcher: slurm, partition: gpu, account: proj-7, qos: high}")), []),
    ("slurm-bad-name", edit(("batch: {global: 16, micro: 4}", "batch: {global: 16, micro: 4}\n  resources: "
                             "{partition: 'gpu --wrap=x'}")),
     ["12:26: error[CSC104]: defaults.resources.partition is 'gpu --wrap=x', which is not a Slurm name | Slurm "
      "partition, account and qos names use letters, digits, '.', '_', '-' (and ',' between partitions)"]),
]


@pytest.mark.parametrize("text, expected", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_mistake_gets_its_located_diagnostic(text, expected):
    diags, plan = outcome(text)
    assert diags == expected
    assert (plan is None) == any("error[" in d for d in expected)


# -- what the clean rows must hold ---------------------------------------------------------------

@pytest.mark.parametrize("old, written, exact", [
    ("tokens: 1B", "tokens: 3e12", "tokens: 3T"), ("tokens: 1B", "tokens: 3.0e+12", "tokens: 3T"),
    ("tokens: 1B", "tokens: 1e10", "tokens: 10B"), ("tokens: 1B", "tokens: 1.5e9", "tokens: 1500000000"),
    ("seq_len: 1024", "seq_len: 1.024e3", "seq_len: 1024"), ("seq_len: 1024", "seq_len: 1024.0", "seq_len: 1024"),
    ("global: 16", "global: 1.6e1", "global: 16"), ("samples: 64", "samples: 6.4e1", "samples: 64"),
    ("tokens: 1B", "tokens: {assumed: 1e9, why: x}", "tokens: {assumed: 1B, why: x}"),
], ids=lambda v: v)
def test_an_exact_whole_float_is_the_count_it_writes(old, written, exact):
    """3e12 is 3T: the same plan (bar the spec's hash) as the integer spelling, with ints in it."""
    (diags_a, a), (diags_b, b) = outcome(edit((old, written))), outcome(edit((old, exact)))
    assert diags_a == diags_b and a is not None and same_plan(a, b)
    config = stage(a, "distill/small/short")["config"]
    assert type(config["tokens"]) is int and type(config["seq_len"]) is int and type(config["global_batch"]) is int


def test_a_count_is_read_from_its_text_not_through_a_float():
    """9.000000000000000001e18 is that integer; a float would drop the last 1."""
    text = edit(("tokens: 1B", "tokens: 9.000000000000000001e18"))
    spec = compiler.compile_doc(source.parse(text, "spec.yaml"), {}).spec
    assert spec.children[0].phases[0].tokens == 9_000_000_000_000_000_001 != int(9.000000000000000001e18)


def test_pruning_defaults_are_written_into_the_plan_with_provenance():
    plan = outcome(edit(("shape: {ffn: 1024}", "shape: {layers: 6, ffn: 1024, heads: 4}")))[1]
    prune = stage(plan, "prune/small")
    assert prune["config"]["methods"] == {"layers": DEFAULT_METHODS["layers"], "hidden": None,
                                          "ffn": DEFAULT_METHODS["ffn"], "heads": "query"}
    assert prune["provenance"] == {"config.methods.layers": "default", "config.methods.ffn": "default",
                                   "config.methods.heads": "default"}
    kv = stage(outcome(edit(("shape: {ffn: 1024}", "shape: {heads: 4, kv_heads: 2}")))[1], "prune/small")
    assert kv["config"]["methods"]["heads"] == "kv_groups"
    assert kv["provenance"]["config.methods.heads"] == "default: kv_groups, since kv_heads shrink"


def test_a_solved_shape_is_marked_and_width_first_keeps_depth():
    solve = "shape: {params: 20M, solve: {multiple_of: {hidden: 64, ffn: 64}ORDER}}"
    uniform = outcome(edit(("shape: {ffn: 1024}", solve.replace("ORDER", ""))))[1]
    width = outcome(edit(("shape: {ffn: 1024}", solve.replace("ORDER", ", order: width_first"))))[1]
    u, w = uniform["models"]["small"], width["models"]["small"]
    assert (u["shape"]["layers"], u["shape"]["hidden"], u["shape"]["ffn"], u["params"]) == (6, 448, 1856, 19_997_376)
    assert (w["shape"]["layers"], w["shape"]["hidden"], w["shape"]["ffn"], w["params"]) == (8, 384, 1600, 20_238_720)
    assert w["solved"]["order"] == "width_first" and u["solved"]["order"] == "uniform"
    assert w["solved"]["rule"].startswith("width before depth (Minitron)")
    assert u["solved"]["params"] == 20_000_000 and u["solved"]["candidates"] == 15 == w["solved"]["candidates"]
    assert u["solved"]["error"] == round(abs(u["params"] - 20_000_000) / 20_000_000, 6) <= 0.02
    assert len(u["solved"]["runners_up"]) == 3
    assert stage(uniform, "prune/small")["provenance"]["config.target"] == "solved:children[0].shape.params (uniform)"
    assert "solved" not in outcome(BASE)[1]["models"]["small"]


def test_the_solver_never_picks_a_shape_that_would_not_load():
    """A llama parent with 6 heads: hidden 320 (not a multiple of 6) is nearest the target, 384 is chosen."""
    text = edit(("family: mistral, layers: 8, hidden: 512, ffn: 2048, heads: 8, kv_heads: 4",
                 "family: llama, layers: 8, hidden: 576, ffn: 2048, heads: 6, kv_heads: 2"),
                ("shape: {ffn: 1024}", "shape: {params: 19M, solve: {axes: [hidden], multiple_of: {hidden: 64}, "
                                       "tolerance: 0.25}}"))
    plan = outcome(text)[1]
    solved = plan["models"]["small"]
    invalid = Shape(**{**solved["shape"], "hidden": 320})
    assert config_errors(invalid) and abs(param_count(invalid) - 19_000_000) < abs(solved["params"] - 19_000_000)
    assert solved["shape"]["hidden"] == 384
    assert solved["solved"]["candidates"] == 1  # 320, nearer the target, would not load


def test_steps_that_round_down_are_noted_with_the_exact_figure():
    plan = outcome(edit(("tokens: 1B", "tokens: 94B"), ("seq_len: 1024", "seq_len: 4096"),
                        ("global: 16, micro: 4", "global: 1152, micro: 4")))[1]
    assert stage(plan, "distill/small/short")["notes"] == [
        "asked 94,000,000,000 tokens; trains 93,999,071,232 (928,768 fewer, 0.001%): 19,921 whole steps of 4,718,592 "
        "tokens (seq_len 4,096 x batch 1,152); steps round down"]
    assert stage(plan, "distill/small/short")["config"]["tokens"] == 93_999_071_232
    assert "notes" not in stage(outcome(edit(("tokens: 1B", "tokens: 16384000")))[1], "distill/small/short")


def test_slurm_options_reach_the_plan_and_the_sbatch(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(edit(("batch: {global: 16, micro: 4}", "batch: {global: 16, micro: 4}\n  resources: "
                          "{launcher: slurm, partition: gpu, account: proj-7, qos: high}")))
    plan = outcome(spec.read_text())[1]
    assert stage(plan, "distill/small/short")["slurm"] == {"partition": "gpu", "account": "proj-7", "qos": "high"}
    run = cascadec("plan", str(spec), "--emit", str(tmp_path / "emit"))
    assert run.code == 0, run.err
    sbatch = (tmp_path / "emit" / "slurm" / "distill--small--short.sbatch").read_text()
    assert "#SBATCH --account=proj-7\n#SBATCH --partition=gpu\n#SBATCH --qos=high\n" in sbatch
    assert "--partition" not in (tmp_path / "emit" / "run.sh").read_text()


def test_the_sbatch_asks_for_the_estimate_with_a_margin_and_a_cap_and_requeues_on_sigusr1(tmp_path):
    """distill/small/short: 45.9238 device-hours on 16 devices = 2.87 h; x 1.5 = 4.31 -> 5 h; capped at 3 h."""
    for cap, limit in (("", "0-05:00:00"), (", max_hours: 3", "0-03:00:00")):
        spec = tmp_path / "spec.yaml"
        spec.write_text(edit(("batch: {global: 16, micro: 4}", "batch: {global: 256, micro: 4}\n  resources: "
                              f"{{launcher: slurm, nodes: 2, devices: 16, partition: gpu{cap}}}"), ("tokens: 1B", "tokens: 300B")))
        run = cascadec("plan", str(spec), "--emit", str(tmp_path / "emit"))
        assert run.code == 0, run.err
        sbatch = (tmp_path / "emit" / "slurm" / "distill--small--short.sbatch").read_text()
        assert ("#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node=8\n"
                f"#SBATCH --time={limit}\n#SBATCH --requeue\n#SBATCH --open-mode=append\n#SBATCH --signal=B:USR1@600\n"
                "#SBATCH --partition=gpu\nset -euo pipefail\n") in sbatch  # max_hours is no #SBATCH option
        assert "with srun, one `accelerate launch` per node (machine rank: SLURM_NODEID" in sbatch
        assert sbatch.endswith('exec cascadec run "$PLAN" --workdir "$WORKDIR" --only distill/small/short\n')
    calibrate = (tmp_path / "emit" / "slurm" / "calibrate--small.sbatch").read_text()
    assert "#SBATCH --time=0-01:00:00\n" in calibrate  # the least a job asks for


def test_a_cpu_family_asks_slurm_for_no_gpus(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(edit(("models:", "hardware: {device: cpu}\nmodels:")))
    assert cascadec("plan", str(spec), "--emit", str(tmp_path / "emit")).code == 0
    sbatch = (tmp_path / "emit" / "slurm" / "distill--small--short.sbatch").read_text()
    assert "--gpus-per-node" not in sbatch and "runs it on this node" in sbatch


def test_the_queue_is_not_hashed():
    slurm = outcome(edit(("batch: {global: 16, micro: 4}", "batch: {global: 16, micro: 4}\n  resources: "
                          "{partition: gpu}")))[1]
    assert [s["hash"] for s in slurm["stages"]] == [s["hash"] for s in BASE_PLAN["stages"]]


def test_a_plan_given_as_a_spec_says_so(tmp_path):
    saved = tmp_path / "plans" / "demo.plan.json"
    saved.parent.mkdir()
    (tmp_path / "demo.yaml").write_text(BASE)
    assert cascadec("plan", str(tmp_path / "demo.yaml"), "-o", str(saved)).code == 0
    run = cascadec("plan", str(saved))
    assert run.code == 1 and "Traceback" not in run.err
    line = saved.read_text().splitlines().index('  "cascadec_version": "0.1.0",') + 1
    assert run.err.splitlines()[0] == f"{saved}:{line}:3: error[CSC107]: this is a plan (cascadec's output), not a family spec"
    assert f"  = help: give the spec it was made from: {tmp_path / 'demo.yaml'}; `cascadec run`, `status` and " \
           "`diff` read plans" in run.err


@pytest.mark.parametrize("value", ["3e12", "3.0e+12", "1e10", "2.5", "1e400", ".nan", "-3e12"])
def test_no_count_ever_prints_a_traceback(tmp_path, value):
    spec = tmp_path / "spec.yaml"
    spec.write_text(edit(("tokens: 1B", f"tokens: {value}")))
    run = cascadec("validate", str(spec))
    assert "Traceback" not in run.err and run.code in (0, 1)
