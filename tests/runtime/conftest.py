"""Shared fixtures for runtime tests: tiny teacher/student checkpoints, a jsonl corpus, stage contexts."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

# Tiny matmuls gain nothing from threads, and the machine is shared: one thread per process
# (subprocesses inherit OMP_NUM_THREADS) keeps timings stable and results thread-count-free.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds tinymodels.py

from tinymodels import TEXT, save_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A 4-layer teacher and a 2-layer, narrower student sharing one tokenizer (vocab 320)."""
    root = tmp_path_factory.mktemp("models")
    return {
        "teacher": save_model(root / "teacher", "mistral", seed=1),
        "student": save_model(root / "student", "mistral", seed=2, layers=2, hidden=32, ffn=64, heads=2, kv_heads=1),
    }


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    """A jsonl source of 60 short documents, as the executor would hand it to a stage."""
    root = tmp_path_factory.mktemp("corpus")
    lines = TEXT.splitlines()
    with (root / "a.jsonl").open("w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"{i}: " + "\n".join(lines[i % len(lines):] + lines[: i % 7])}) + "\n")
    return {"kind": "jsonl", "paths": [str(root / "*.jsonl")], "field": "text", "builtin": None}


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real Slurm on this host (tests/slurmkit.py): munged, slurmctld and two slurmd nodes."""
    import slurmkit

    if missing := slurmkit.missing():
        pytest.skip(f"Slurm is not installed (no {', '.join(missing)} on PATH); "
                    "`apt-get install slurmctld slurmd slurm-client munge` as root, as .ci/run does")
    with slurmkit.Cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
