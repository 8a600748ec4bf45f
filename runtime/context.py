"""`StageContext`: everything a stage function may touch, built by the executor (or stage_main).

It owns no behaviour beyond small conveniences; stages must not reach outside it for paths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StageContext:
    """What ``run(ctx)`` of every stage kind receives.

    ``out`` is a fresh temporary directory the executor renames into place when the stage
    returns; ``scratch`` survives a kill (step checkpoints live there, so a rerun resumes);
    ``cache`` holds tokenised data shared by every stage of a workspace (content-addressed, so
    sharing is always safe). When ``cache`` is None the tokenised shards go under ``scratch``.
    """

    stage: dict
    # The plan's stage dict (``id``, ``kind``, ``config``, ``launch`` ...).
    inputs: dict[str, Path]
    # Input role -> resolved local path ("student", "teacher", "teacher_logits", "template").
    data: dict[str, dict]
    # Data name -> the plan's source dict with ``paths`` resolved to absolute paths.
    out: Path
    scratch: Path
    log: Callable[[str], None] = print
    cache: Path | None = None
    metrics_file: Path | None = field(default=None)
    # JSONL of per-step metrics; defaults to ``scratch / "metrics.jsonl"``.
    plan: dict | None = None
    workdir: Path | None = None
    # The whole plan and the workspace, for the one stage that reads across stages (`report`).

    @property
    def config(self) -> dict:
        return self.stage["config"]

    def source(self) -> dict:
        """The data source this stage reads (``config.data.name``)."""
        name = self.config["data"]["name"]
        if name not in self.data:
            raise KeyError(f"stage {self.stage.get('id')} reads data {name!r}, which the run did not provide")
        return self.data[name]

    def token_cache(self) -> Path:
        return Path(self.cache) if self.cache else Path(self.scratch) / "tokens"
