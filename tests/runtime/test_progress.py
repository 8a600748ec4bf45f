"""Progress outside a terminal: a plain line per tenth of the work, never a carriage return."""

from __future__ import annotations

import os
import subprocess
import sys

from stagekit import context, stage

from cascadec.runtime import progress
from cascadec.runtime.stages import distill


def test_outside_a_terminal_a_bar_is_one_line_per_tenth(monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: False)
    lines = []
    bar = progress.Progress(200, what="distill/x", log=lines.append)
    for step in range(200):
        bar.update(1, loss=f"{2 - step / 200:.2f}")
    bar.close()
    assert lines[0] == "distill/x: step 20/200 (10%), loss 1.91"
    assert [line.split(" (")[1].split("%")[0] for line in lines] == [str(p) for p in range(10, 101, 10)]


def test_a_resumed_bar_starts_at_its_step_and_a_silent_one_writes_nothing(monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: False)
    lines = []
    bar = progress.Progress(100, what="s", log=lines.append, initial=47)
    for _ in range(53):
        bar.update()
    bar.close()
    assert [line.split(" ")[2] for line in lines] == ["50/100", "60/100", "70/100", "80/100", "90/100", "100/100"]
    silent = progress.Progress(10, what="s", log=lines.append, enabled=False)
    silent.update(10)
    silent.close()
    assert len(lines) == 6


def test_quiet_libraries_turns_off_every_tqdm_bar_outside_a_terminal():
    """In a fresh process, as `cascadec run` starts: tqdm reads TQDM_* when it is imported."""
    code = ("from cascadec.runtime.progress import quiet_libraries; quiet_libraries()\n"
            "from tqdm.auto import tqdm\nimport transformers, tqdm as t\n"
            "print(tqdm(total=3).disable, t.tqdm(total=3).disable)")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.stdout.split() == ["True", "True"], run.stderr
    assert "\r" not in run.stderr


def test_a_training_stage_logs_plain_progress_lines_and_no_carriage_return(tiny_models, corpus, tmp_path, capfd,
                                                                           monkeypatch):
    for name in progress.QUIET_ENV:  # restored after the test
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    progress.quiet_libraries()  # as `cascadec run` starts, outside a terminal
    lines = []
    ctx = context(tmp_path, stage(steps=20), dict(tiny_models), corpus)
    ctx.log = lines.append
    distill.run(ctx)
    captured = capfd.readouterr()
    assert "\r" not in captured.out + captured.err + "".join(lines)
    assert [line.split(" ")[2] for line in lines if line.startswith("distill/tiny/short: step ")] == \
        [f"{s}/20" for s in range(2, 21, 2)]
    import transformers

    transformers.utils.logging.enable_progress_bar()  # as it was for the other tests
