"""`cascadec prune` (prune_cmd.main) and the calibrate/prune stage functions: what users see."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import surgery_util as su
from cascadec.runtime.surgery import prune as prune_mod
from cascadec.runtime.surgery.prune_cmd import main
from cascadec.runtime.stages import calibrate as calibrate_stage
from cascadec.runtime.stages import prune as prune_stage
from cascadec.shapes import param_count

SUPPORTED = "llama, ministral, ministral3, mistral, mistral3, qwen2, qwen3"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    path = su.model(tmp, "mistral")
    su.text_source(tmp, repeat=8)
    return path


def calib(src: Path) -> list[str]:
    return ["--calibration", str(src.parent / "calibration.txt"), "--samples", "4", "--seq-len", "32"]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}") or p == out)


def test_prune_command_writes_a_loadable_model(src, tmp_path, capsys):
    out = tmp_path / "small"
    rc = main([str(src), str(out), "--layers", "3", "--hidden", "48", "--ffn", "96", "--kv-heads", "1",
               "--heads", "2", "--layer-method", "angular", "--tie-embeddings", *calib(src)])
    assert rc == 0, capsys.readouterr().err
    target = su.shape(src).replace(layers=3, hidden=48, ffn=96, heads=2, kv_heads=1, tied_embeddings=True)
    assert su.shape(out) == target and su.text_params(out) == param_count(target)
    report = json.loads((out / "prune_report.json").read_text())
    assert report["methods"] == {"layers": "angular", "hidden": "pca", "ffn": "activation", "heads": "query"}
    assert report["calibration"]["angular"]["block"] == 1
    assert leftovers(out) == ["small"]


CASES = [
    ("missing", lambda s, t: [str(t / "nope"), str(t / "out")],
     "error: {t}/nope/config.json not found; is {t}/nope a Hugging Face model directory?\n"
     "help: check the path; SRC_DIR must hold config.json and safetensors weights\n"),
    ("grows", lambda s, t: [str(s), str(t / "out"), "--layers", "8"],
     "error: target layers 8 is not between 1 and the source's 4\n"
     "help: pruning only shrinks a model; give a size no larger than the source's\n"),
    ("heads", lambda s, t: [str(s), str(t / "out"), "--heads", "3"],
     "error: 3 heads do not divide into 2 KV heads\nhelp: choose heads as a multiple of kv_heads\n"),
    ("regroup", lambda s, t: [str(s), str(t / "out"), "--kv-heads", "1"],
     "error: 4 query heads per KV head exceeds the source's 2\n"
     "help: GQA pruning drops KV groups or query heads within groups; it cannot regroup\n"),
    ("exists", lambda s, t: [str(s), str(t)],
     "error: {t} already exists\nhelp: choose a new OUT_DIR or remove the existing one\n"),
    ("no-calibration-file", lambda s, t: [str(s), str(t / "out"), "--ffn", "64", "--calibration", str(t / "x.txt")],
     "error: calibration file {t}/x.txt not found\n"
     "help: check the path; SRC_DIR must hold config.json and safetensors weights\n"),
    ("short-calibration", lambda s, t: [str(s), str(t / "out"), "--ffn", "64", "--calibration",
                                        str(s.parent / "calibration.txt"), "--samples", "1000"],
     None),
]


@pytest.mark.parametrize("name,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(src, tmp_path, capsys, name, argv, expected):
    rc = main(argv(src, tmp_path))
    err = capsys.readouterr().err
    assert rc == 1
    if expected is None:
        assert err.startswith("error: calibration text has ") and "\nhelp: give more calibration text" in err
    else:
        assert err == expected.format(t=tmp_path)
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


def test_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
    assert main([str(tmp_path / "gpt"), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == (
        f"error: unsupported model_type 'gpt2'; supported: {SUPPORTED}\n"
        "help: cascadec prunes Llama, Mistral, Ministral3, Qwen2, Qwen3 and Mistral 3 (text tower) checkpoints\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["--layers", "x"], ["--stage", "p"], ["--from-plan", "p", "--stage", "p", "--ffn", "8"]])
def test_usage_errors_exit_2(src, tmp_path, argv, capsys):
    assert main([str(src), str(tmp_path / "out"), *argv]) == 2
    assert "usage: cascadec prune" in capsys.readouterr().err


def test_failure_mid_prune_leaves_nothing(src, tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise FileNotFoundError("disk vanished")

    monkeypatch.setattr(prune_mod, "cut_layer", boom)
    assert main([str(src), str(tmp_path / "out"), "--ffn", "64", *calib(src)]) == 1
    assert leftovers(tmp_path / "out") == []


def plan(src: Path) -> dict:
    source = su.shape(src).axes()
    return {
        "data": {"calib": {"kind": "text", "paths": ["calibration.txt"], "field": "text"}},
        "stages": [
            {"id": "calibrate/child", "kind": "calibrate", "inputs": [{"role": "model", "model": "parent"}],
             "config": {"samples": 4, "seq_len": 32, "batch_size": 2, "data": {"name": "calib", "offset": 0},
                        "seed": 0, "scores": ["block_influence", "ffn_activation", "hidden_channel"],
                        "angular_block": None}},
            {"id": "prune/child", "kind": "prune",
             "inputs": [{"role": "model", "model": "parent"},
                        {"role": "stats", "stage": "calibrate/child", "path": "stages/calibrate/child"}],
             "config": {"source_shape": source, "target": {**source, "layers": 3, "hidden": 40, "ffn": 72},
                        "methods": {"layers": "block_influence", "hidden": "channel", "ffn": "activation",
                                    "heads": None}, "tie_embeddings": False}},
        ],
    }


def test_from_plan(src, tmp_path, capsys):
    plan_path = src.parent / "plan.json"
    plan_path.write_text(json.dumps(plan(src)))
    assert main([str(src), str(tmp_path / "out"), "--from-plan", str(plan_path), "--stage", "prune/child"]) == 0
    assert su.shape(tmp_path / "out") == su.shape(src).replace(layers=3, hidden=40, ffn=72)
    assert main([str(src), str(tmp_path / "o2"), "--from-plan", str(plan_path), "--stage", "prune/x"]) == 1
    assert capsys.readouterr().err.endswith("error: plan has no prune stage 'prune/x'\n"
                                            "help: prune stages in this plan: prune/child\n")


def test_stage_functions(src, tmp_path):
    p = plan(src)
    data = {"calib": {**p["data"]["calib"], "paths": [str(src.parent / "calibration.txt")]}}
    (tmp_path / "stats").mkdir()
    ctx = SimpleNamespace(stage=p["stages"][0], inputs={"model": src}, data=data, out=tmp_path / "stats", log=print)
    assert calibrate_stage.run(ctx) == {"tokens": 128}
    assert (tmp_path / "stats" / "stats.safetensors").is_file() and (tmp_path / "stats" / "summary.json").is_file()
    (tmp_path / "prune").mkdir()
    ctx = SimpleNamespace(stage=p["stages"][1], inputs={"model": src, "stats": tmp_path / "stats"}, data=data,
                          out=tmp_path / "prune", log=print)
    metrics = prune_stage.run(ctx)
    target = su.shape(src).replace(layers=3, hidden=40, ffn=72)
    assert metrics["params"] == param_count(target) == su.text_params(tmp_path / "prune" / "model")


def test_compare_cuts_with_every_criterion_and_writes_nothing(src, tmp_path, capsys):
    """--compare: one row per (layer criterion, hidden method), best first, each row's KL that of
    the real prune with those methods; nothing is left on disk."""
    before = sorted(p.name for p in src.parent.iterdir())
    capsys.readouterr()
    assert main([str(src), "--layers", "2", "--hidden", "48", "--compare", *calib(src)]) == 0
    out = capsys.readouterr().out.splitlines()
    small = param_count(su.shape(src).replace(layers=2, hidden=48))
    assert out[0] == f"4->2 layers, hidden 64->48, 188,992 -> {small:,} parameters; calibration text: 128 tokens, " \
                     f"source loss {out[0].rsplit('loss ', 1)[1]}"
    assert out[2].split() == ["layers", "hidden", "KL", "loss", "Δloss", "top-1", "dropped", "layers"]
    rows = [line.split(maxsplit=6) for line in out[3:9]]
    assert sorted((r[0], r[1]) for r in rows) == sorted(
        (layer, hidden) for layer in ("angular", "block_influence", "norm_ratio") for hidden in ("channel", "pca"))
    kls = [float(r[2]) for r in rows]
    assert kls == sorted(kls)
    best = rows[0]
    assert out[-1].startswith(f"closest to the source: --layer-method {best[0]} --hidden-method {best[1]} ")
    assert sorted(p.name for p in src.parent.iterdir()) == before
    main([str(src), str(tmp_path / "real"), "--layers", "2", "--hidden", "48", "--layer-method", best[0],
          "--hidden-method", best[1], *calib(src)])
    kl = json.loads((tmp_path / "real" / "prune_report.json").read_text())["reconstruction"]["kl"]
    assert f"{kl:.4f}" == best[2]


def test_compare_needs_a_depth_or_width_cut(src, capsys):
    assert main([str(src), "--ffn", "64", "--compare", *calib(src)]) == 1
    assert capsys.readouterr().err == ("error: --compare needs a target that changes layers or hidden\n"
                                       "help: give --layers N and/or --hidden N below the source's size\n")
