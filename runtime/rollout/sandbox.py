"""The code sandbox: run untrusted Python (a model's completion) against tests, each test in a fresh
interpreter with resource limits, no network, a temporary directory of its own, capped output and a
wall-clock kill. Never raises for bad code: every outcome is a `TestResult` with its reason.

What it protects against and what it does not is in docs/sandbox.md; in short, the layers are:

- resource limits set in the child (`sandbox_child.py`) before the code runs: CPU time, address
  space, file size, number of processes (RLIMIT_NPROC counts per user, so the child runs under a
  uid of its own: a fresh random uid when started as root, or the root of a new user namespace);
- `unshare` namespaces when available: a network namespace (no interface but a down loopback, so
  every connection fails in the kernel) and a pid namespace (killing its first process kills
  everything the code forked, whatever session or group it moved to);
- a Python audit hook: refuses writes outside the sandbox directory and, when no network namespace
  could be made, socket connections. It stops honest mistakes and simple code; code that reaches
  libc through ctypes gets past it, so it is a speed bump, not a wall (docs/sandbox.md).
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py").read_text()  # run with -c, never imported here
KEEP_CHARS = 2000  # of stdout and of stderr, kept in a TestResult
REASONS = ("passed", "timeout", "memory", "processes", "file size", "output", "network", "permission", "exit",
           "exception", "skipped")


@dataclass(frozen=True)
class TestResult:
    """One test's outcome. `reason` is one of REASONS; `detail` says what happened in words."""

    passed: bool
    reason: str
    detail: str = ""
    seconds: float = 0.0
    stdout: str = ""  # the first KEEP_CHARS characters
    stderr: str = ""


@dataclass(frozen=True)
class Isolation:
    """How this machine sandboxes (probed once per process, see `isolation()`)."""

    python: str  # the interpreter the code runs in
    prefix: tuple[str, ...]  # `unshare ...` when namespaces work, else ()
    drop_uid: bool  # started as root: the child switches to a fresh unprivileged uid

    @property
    def namespaces(self) -> bool:
        return bool(self.prefix)


def _unshare_prefix(root: bool) -> tuple[str, ...]:
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    user = () if root else ("--user", "--map-root-user")
    return (exe, *user, "--net", "--pid", "--fork", "--kill-child")


# After dropping to the sandbox uid the child imports modules it has not loaded yet: the probe checks
# that the interpreter's files are readable by that uid (a venv whose python lives under /root is not).
PROBE = ("import os, sys\nif len(sys.argv) > 2:\n    os.setgroups([]); os.setgid(int(sys.argv[2])); "
         "os.setuid(int(sys.argv[2]))\nos.chdir(sys.argv[1])\nimport fractions, statistics, decimal\nprint('ok')")


@cache
def isolation(namespaces: bool | None = None) -> Isolation:
    """The interpreter and wrappers that work here. ``namespaces``: None = use them when they work,
    False = never (the audit hook then blocks the network), True = required."""
    root = os.geteuid() == 0
    prefixes = [_unshare_prefix(root)] if namespaces is not False else []
    prefixes = [p for p in prefixes if p] + ([()] if namespaces is not True else [])
    pythons = dict.fromkeys([sys.executable, os.path.realpath(sys.executable), getattr(sys, "_base_executable", ""),
                             shutil.which("python3") or "", "/usr/bin/python3"])
    workdir = tempfile.mkdtemp(prefix="cascadec-sandbox-")
    try:
        uid = _fresh_uid()
        if root:
            os.chown(workdir, uid, uid)
        for prefix in prefixes:
            for python in (p for p in pythons if p and os.access(p, os.X_OK)):
                argv = [*prefix, python, "-s", "-c", PROBE, workdir, *([str(uid)] if root else [])]
                try:
                    ok = subprocess.run(argv, capture_output=True, timeout=60, env=_env(workdir),
                                        cwd="/").stdout.strip() == b"ok"
                except (OSError, subprocess.TimeoutExpired):
                    ok = False
                if ok:
                    return Isolation(python=python, prefix=prefix, drop_uid=root)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    raise RuntimeError("no Python interpreter can run sandboxed code here" + (
        f" under an unprivileged uid: its files, and the temporary directory {tempfile.gettempdir()} (TMPDIR), "
        f"must be readable by all users" if root else "")
        + ("" if namespaces is not True else " inside `unshare` namespaces"))


def _fresh_uid() -> int:
    """A uid nobody uses, so RLIMIT_NPROC counts only this run's processes."""
    return 1_000_000 + secrets.randbelow(1 << 30)


def _env(home: str) -> dict:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_tests(code: str, tests: list[str], *, timeout_s: float = 4.0, memory_mb: int = 300, file_mb: int = 16,
              processes: int = 16, output_kb: int = 64, stop_on_failure: bool = False,
              namespaces: bool | None = None) -> list[TestResult]:
    """Run ``code`` then each test (Python statements, e.g. ``assert f(2) == 4``) in a fresh sandbox.

    One TestResult per test, in order. ``stop_on_failure``: the tests after a failure are not run
    (reason "skipped"), for all-or-nothing rewards. Limits per test: wall and CPU time ``timeout_s``
    (interpreter start included), address space ``memory_mb``, each file ``file_mb``, ``processes``
    tasks (threads count), ``output_kb`` of stdout + stderr (then killed). The code runs with
    ``__name__ == "solution"``, so a ``if __name__ == "__main__":`` block does not run.
    """
    iso = isolation(namespaces)
    out: list[TestResult] = []
    for test in tests:
        if stop_on_failure and out and not out[-1].passed:
            out.append(TestResult(False, "skipped", "an earlier test failed"))
            continue
        out.append(_run_one(code, test, iso, timeout_s=timeout_s, memory_bytes=memory_mb << 20,
                            file_bytes=file_mb << 20, processes=processes, output_bytes=output_kb << 10))
    return out


def _run_one(code: str, test: str, iso: Isolation, *, timeout_s: float, memory_bytes: int, file_bytes: int,
             processes: int, output_bytes: int) -> TestResult:
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="cascadec-sandbox-")
    uid = _fresh_uid() if iso.drop_uid else None
    read_fd, write_fd = os.pipe()
    proc = None
    try:
        if uid is not None:
            os.chown(workdir, uid, uid)
        nonce = secrets.token_hex(16)
        cfg = {"code": code, "test": test, "dir": workdir, "uid": uid, "nonce": nonce, "result_fd": write_fd,
               "cpu_s": max(1, int(timeout_s + 0.999)), "memory_bytes": memory_bytes, "file_bytes": file_bytes,
               "processes": processes, "block_network": not iso.namespaces}
        proc = subprocess.Popen([*iso.prefix, iso.python, "-s", "-c", CHILD], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(write_fd,), cwd=workdir,
                                env=_env(workdir), start_new_session=True)
        os.close(write_fd)
        write_fd = -1
        try:
            proc.stdin.write(json.dumps(cfg).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        streams, timed_out, overflow = _collect(proc, read_fd, start + timeout_s, output_bytes)
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        os.close(read_fd)
        if proc is not None:
            _kill(proc, uid)
        shutil.rmtree(workdir, ignore_errors=True)
    stdout, stderr, result = (streams[k].decode("utf-8", "replace") for k in ("stdout", "stderr", "result"))
    reason, detail = _outcome(proc.returncode, result, nonce, stderr, timed_out, overflow, timeout_s, output_bytes)
    return TestResult(passed=reason == "passed", reason=reason, detail=detail,
                      seconds=round(time.monotonic() - start, 3), stdout=stdout[:KEEP_CHARS],
                      stderr=stderr[:KEEP_CHARS])


def _collect(proc, result_fd: int, deadline: float, cap: int):
    """Read stdout, stderr and the result pipe until all close, the deadline passes or the output
    exceeds ``cap``; keep at most KEEP_CHARS·4 bytes of each stream. (streams, timed_out, overflow)"""
    sel = selectors.DefaultSelector()
    files = {"stdout": proc.stdout.fileno(), "stderr": proc.stderr.fileno(), "result": result_fd}
    for name, fd in files.items():
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, name)
    kept = {name: bytearray() for name in files}
    total, open_fds = 0, len(files)
    try:
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                return kept, True, False
            for key, _ in sel.select(min(left, 0.5)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    open_fds -= 1
                    continue
                if key.data != "result":
                    total += len(chunk)
                    if total > cap:
                        return kept, False, True
                if len(kept[key.data]) < KEEP_CHARS * 4:
                    kept[key.data] += chunk
            if proc.poll() is not None and not sel.select(0):
                break  # exited; a stray grandchild holding a pipe open is killed by _kill
        return kept, False, False
    finally:
        sel.close()


def _kill(proc, uid: int | None) -> None:
    """Kill the process group (with namespaces: `unshare` and the pid namespace's first process,
    which takes every other process of the namespace with it); without a pid namespace, every
    process of the sandbox uid too (the code may have left the group with setsid)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is not None and not proc.args[0].endswith("unshare"):
        subprocess.run(["kill", "-KILL", "-1"], user=uid, group=uid, extra_groups=[],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for stream in (proc.stdout, proc.stderr, proc.stdin):
        if stream is not None and not stream.closed:
            stream.close()
    proc.wait()


def _outcome(returncode: int, result: str, nonce: str, stderr: str, timed_out: bool, overflow: bool,
             timeout_s: float, output_bytes: int) -> tuple[str, str]:
    if overflow:
        return "output", f"more than {output_bytes >> 10} KiB of output; killed"
    if timed_out:
        return "timeout", f"still running after {timeout_s:g} s (wall clock); killed"
    for line in result.splitlines():
        if line.startswith(nonce):
            data = json.loads(line[len(nonce):])
            return data["reason"], data["detail"]
    if returncode in (-signal.SIGKILL, -signal.SIGXCPU):
        return "timeout", f"killed by {signal.Signals(-returncode).name} (CPU time limit of {timeout_s:g} s)"
    if returncode < 0:
        return "exit", f"killed by {signal.Signals(-returncode).name} before the test finished"
    last = stderr.strip().splitlines()[-1:] or [""]
    return "exit", f"exited with code {returncode} before the test finished" + (f": {last[0]}" if last[0] else "")
