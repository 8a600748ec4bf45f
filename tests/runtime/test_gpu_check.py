"""`benchmarks/gpu_check.py` is run on machines with a GPU, rarely: its smoke mode runs every
section here, on the CPU at tiny shapes, so the script cannot rot between those runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--steps", "2",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["smoke"] is True and r["device"] == "cpu"
    assert r["distill"]["tokens_per_s"] > 0 and r["distill"]["saved_dtype"] == "bfloat16"
    assert r["kd_memory"]["loss_chunked"] == pytest.approx(r["kd_memory"]["loss_naive"], rel=0.05)
    assert r["eval"]["tokens"] == (1024 // 64) * 63
    assert r["calibrate"]["same_layers"] is True
    assert r["fsdp"]["reload_equal"] is True and r["fsdp"]["strategy"] == "fsdp"
    assert r["fsdp"]["step_checkpoints"] == ["step-00000002"]  # a DCP step checkpoint (the last step saves the model)
    assert "| FSDP2, world size 1 | reload equal True" in run.stdout
