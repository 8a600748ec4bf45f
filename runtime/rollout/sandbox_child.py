"""The sandbox's child side: the first code a sandboxed interpreter runs (`python -s -c <this file>`).

It is never imported by the trainer: `sandbox.py` passes its source to a fresh interpreter. It reads
its settings from stdin, sets the resource limits, drops to the sandbox uid when it starts as root,
installs the audit hook, then runs the solution and one test in one namespace and reports the outcome
on a private pipe, prefixed by a per-run nonce so that text the code prints cannot pass for a result.
Standard library only, Python ≥ 3.8 (the sandbox may run a system interpreter, see docs/sandbox.md).
"""

import errno
import json
import os
import resource
import signal
import sys

NETWORK_ERRNOS = {errno.ENETUNREACH, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EADDRNOTAVAIL}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.remove": (0,), "os.rename": (0, 1), "os.rmdir": (0,), "os.mkdir": (0,), "os.truncate": (0,),
               "os.symlink": (1,), "os.link": (1,), "os.chmod": (0,), "os.chown": (0,)}


class SandboxDenied(PermissionError):
    """Refused by the audit hook; `what` is the result's reason ("network" or "permission")."""

    def __init__(self, what, message):
        super().__init__(message)
        self.what = what


def main():
    cfg = json.loads(sys.stdin.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    me, fd, nonce = os.getpid(), cfg["result_fd"], cfg["nonce"]

    def report(reason, detail=""):
        if os.getpid() != me:  # a forked child of the code: only the first process reports
            os._exit(1)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os.write(fd, (nonce + json.dumps({"reason": reason, "detail": detail}) + "\n").encode())
        os._exit(0)

    cpu = cfg["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # soft: SIGXCPU (reported), hard: SIGKILL
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["processes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises EFBIG instead of killing
    signal.signal(signal.SIGXCPU, lambda *_: report("timeout", "CPU time limit of %d s" % cpu))
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    home = os.path.realpath(cfg["dir"])
    os.chdir(home)
    sys.dont_write_bytecode = True

    def inside(path):
        if isinstance(path, int) or path is None:
            return True
        path = os.path.realpath(os.path.join(home, os.fsdecode(path)))
        return path == home or path.startswith(home + os.sep) or path == os.devnull

    def hook(event, args):
        if event == "open":
            mode, flags = args[1], args[2] or 0
            writes = any(c in mode for c in "wax+") if mode else bool(flags & WRITE_FLAGS)
            if writes and not inside(args[0]):
                raise SandboxDenied("permission", "writing %r is refused: the sandbox may write only in its own "
                                           "directory" % os.fsdecode(args[0]))
        elif event in PATH_EVENTS and not all(inside(args[i]) for i in PATH_EVENTS[event]):
            raise SandboxDenied("permission", "%s outside the sandbox directory is refused" % event)
        elif cfg["block_network"] and event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg") \
                and args[0].family != getattr(sys.modules.get("socket"), "AF_UNIX", None):
            raise SandboxDenied("network", "network access is disabled in the sandbox")

    sys.addaudithook(hook)
    scope = {"__name__": "solution", "__builtins__": __builtins__}
    for label, source in (("solution", cfg["code"]), ("test", cfg["test"])):
        try:
            exec(compile(source, "<%s>" % label, "exec"), scope)
        except SystemExit as e:
            report("exit", "the %s called exit(%r) before the test finished" % (label, e.code))
        except BaseException as e:  # noqa: BLE001 -- every failure of untrusted code is a result
            report(*classify(e, label))
    report("passed")


def classify(e, label):
    """(reason, detail) of an exception raised by the solution or the test."""
    where, tb = "", e.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if name in ("<solution>", "<test>"):
            where = " (%s line %d)" % (name[1:-1], tb.tb_lineno)
        tb = tb.tb_next
    message = e.msg if isinstance(e, SyntaxError) else str(e)
    if isinstance(e, SyntaxError):
        where = " (%s line %s)" % (label, e.lineno)
    text = type(e).__name__ + (": %s" % message if message else "") + where
    if isinstance(e, SandboxDenied):
        return e.what, text
    if isinstance(e, MemoryError):
        return "memory", text
    if isinstance(e, OSError):
        if e.errno == errno.EAGAIN or isinstance(e, BlockingIOError):
            return "processes", text
        if e.errno == errno.EFBIG:
            return "file size", text
        if e.errno in NETWORK_ERRNOS or type(e).__name__ == "gaierror":
            return "network", text
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return "permission", text
    if isinstance(e, RuntimeError) and "new thread" in str(e):
        return "processes", text
    return "exception", text


main()
