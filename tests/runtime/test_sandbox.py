"""The code sandbox contains what untrusted code tries, records why a test failed, and goes on.

Each hazard runs as the first of two tests, the second a correct one, so every case also shows that
the next test still runs. Both layers are tested: the namespaces `unshare` gives (when this
machine allows them) and the fallback without them (audit hook against the network)."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

from cascadec.runtime.rollout import sandbox
from cascadec.runtime.rollout.sandbox import run_tests

SOLUTION = "def double(x):\n    return 2 * x\n"
GOOD = "assert double(21) == 42"


def _mode(request) -> bool:
    if request.param:
        try:
            sandbox.isolation(True)
        except RuntimeError as e:
            pytest.skip(f"no namespaces on this machine: {e}")
    return request.param


@pytest.fixture(params=[True, False], ids=["namespaces", "no-namespaces"])
def namespaces(request) -> bool:
    return _mode(request)


def _leftovers() -> list[int]:
    """Processes still running in a (deleted) sandbox directory."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if "cascadec-sandbox-" in os.readlink(f"/proc/{pid}/cwd"):
                pids.append(int(pid))
        except OSError:
            pass
    return pids


def _run(hazard: str, namespaces: bool, **limits):
    results = run_tests(SOLUTION, [hazard, GOOD], namespaces=namespaces, **{"timeout_s": 3, **limits})
    assert [r.passed for r in results] == [False, True], results
    assert results[1].reason == "passed" and results[1].detail == ""
    return results[0]


def test_correct_and_wrong_solutions(namespaces):
    results = run_tests(SOLUTION, [GOOD, "assert double(2) == 5", "print('hi')\nassert double(-1) == -2"],
                        namespaces=namespaces, timeout_s=5)
    assert [(r.passed, r.reason, r.detail) for r in results] == [
        (True, "passed", ""), (False, "exception", "AssertionError (test line 1)"), (True, "passed", "")]
    assert results[2].stdout == "hi\n"


def test_infinite_loop_times_out(namespaces):
    r = _run("while True:\n    pass", namespaces, timeout_s=2)
    assert r.reason == "timeout"
    assert r.seconds < 6
    assert _leftovers() == []


def test_fork_bomb_is_capped_and_killed(namespaces):
    r = _run("import os\nwhile True:\n    os.fork()", namespaces, processes=8)
    assert r.reason == "processes"
    assert r.detail == "BlockingIOError: [Errno 11] Resource temporarily unavailable (test line 3)"
    assert _leftovers() == []


def test_fork_bomb_that_ignores_failures_is_killed_at_the_deadline(namespaces):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = _run(bomb, namespaces, processes=8, timeout_s=2)
    assert (r.reason, r.detail) == ("timeout", "still running after 2 s (wall clock); killed")
    assert _leftovers() == []
    assert os.fork is not None and os.getpid()  # the parent still runs, and can still start processes:
    assert run_tests(SOLUTION, [GOOD], namespaces=namespaces)[0].passed


def test_ten_gigabytes_fail_as_memory(namespaces):
    r = _run("block = bytearray(10 * 1024 ** 3)", namespaces, memory_mb=300)
    assert (r.reason, r.detail) == ("memory", "MemoryError (test line 1)")


def test_network_connection_is_refused(namespaces):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        r = _run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", namespaces)
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever reached the server
    finally:
        server.close()
    assert r.reason == "network"
    assert r.detail == ("OSError: [Errno 101] Network is unreachable (test line 2)" if namespaces else
                        "SandboxDenied: network access is disabled in the sandbox (test line 2)")


def test_writes_outside_the_directory_are_refused(namespaces, tmp_path):
    outside = Path(tempfile.gettempdir()) / f"cascadec-outside-{os.getpid()}.txt"
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    try:
        for hazard in (f"open({str(outside)!r}, 'w').write('x')", f"import os\nos.remove({str(keep)!r})"):
            r = _run(hazard, namespaces)
            assert r.reason == "permission", r
        assert not outside.exists() and keep.read_text() == "mine"
    finally:
        outside.unlink(missing_ok=True)
    r = run_tests(SOLUTION, ["open('mine.txt', 'w').write('x')\nassert open('mine.txt').read() == 'x'"],
                  namespaces=namespaces)[0]
    assert r.passed  # its own directory is writable


def test_output_flood_is_cut(namespaces):
    r = _run("while True:\n    print('x' * 1000)", namespaces, output_kb=64)
    assert (r.reason, r.detail) == ("output", "more than 64 KiB of output; killed")
    assert len(r.stdout) == sandbox.KEEP_CHARS


def test_file_size_limit(namespaces):
    r = _run("open('big.bin', 'wb').write(b'x' * (4 << 20))", namespaces, file_mb=1)
    assert (r.reason, r.detail) == ("file size", "OSError: [Errno 27] File too large (test line 1)")


def test_exiting_early_never_passes():
    """Code that exits with status 0 before the test ran (a reward hack) fails."""
    for code in ("import os\nos._exit(0)", "import sys\nsys.exit(0)"):
        r = run_tests(code, [GOOD])[0]
        assert not r.passed and r.reason == "exit", r
    assert run_tests("import sys\nsys.exit(0)", [GOOD])[0].detail == \
        "the solution called exit(0) before the test finished"


def test_broken_code_and_stop_on_failure():
    results = run_tests("def double(x:\n", [GOOD, GOOD], stop_on_failure=True)
    assert [(r.reason, r.detail) for r in results] == [
        ("exception", "SyntaxError: '(' was never closed (solution line 1)"), ("skipped", "an earlier test failed")]


def test_the_directory_is_removed():
    before = {p.name for p in Path(tempfile.gettempdir()).glob("cascadec-sandbox-*")}
    r = run_tests(SOLUTION, ["open('note.txt', 'w').write('x')"])[0]
    assert r.passed
    assert {p.name for p in Path(tempfile.gettempdir()).glob("cascadec-sandbox-*")} <= before
