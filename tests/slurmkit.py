"""A real Slurm cluster on this machine for tests: munged, slurmctld and two slurmd daemons.

The two slurmd are two Slurm nodes (`n1`, `n2`) on one host, each with its own port and spool
directory (Debian's slurm-wlm is built with multiple-slurmd support: `slurmd -N NAME`), so a
job with `--nodes=2` really gets two nodes, SLURM_NODEID 0 and 1 and a node list to read the head
from, while both live on localhost. Everything (config, munge key and socket, state, logs) sits
in one temporary directory; nothing under /etc is touched. Needs root (slurmd runs jobs as their
user) and Debian's `slurmctld slurmd slurm-client munge` packages (.ci/run installs them).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo")
NODES = ("n1", "n2")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def missing() -> list[str]:
    return [b for b in BINARIES if not shutil.which(b)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(root: Path, host: str, cpus: int) -> str:
    ports = [_free_port() for _ in range(2 + len(NODES))]
    nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={cpus} State=UNKNOWN"
                      for n, p in zip(NODES, ports[2:]))
    return f"""ClusterName=cascadec-test
SlurmctldHost={host}
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
AuthType=auth/munge
# cred_expire: a requeued job waits cred_expire + 1 s before it may start again (default 120)
AuthInfo=socket={root}/munge.sock,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=5
MinJobAge=600
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """Start with `with Cluster(tmp) as c:`; ``c.env`` is the environment for Slurm commands."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}

    def __enter__(self) -> Cluster:
        if not stat.S_ISCHR(os.stat("/dev/null").st_mode):
            raise RuntimeError("/dev/null is not a character device; recreate it: "
                               "rm /dev/null && mknod -m 666 /dev/null c 1 3")
        r = self.root
        (r / "state").mkdir(parents=True)
        (r / "munge.key").write_bytes(os.urandom(1024))
        (r / "munge.key").chmod(0o400)
        (r / "slurm.conf").write_text(config(r, socket.gethostname().split(".")[0], os.cpu_count() or 2))
        try:
            self._start(["munged", "--foreground", "--force", f"--socket={r}/munge.sock", f"--key-file={r}/munge.key",
                         f"--pid-file={r}/munged.pid", f"--log-file={r}/munged.log", f"--seed-file={r}/munged.seed"])
            self._wait(lambda: (r / "munge.sock").exists(), "munged to open its socket")
            self._start(["slurmctld", "-D", "-f", str(r / "slurm.conf")])
            self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, "slurmctld to answer")
            for n in NODES:
                self._start(["slurmd", "-D", "-N", n, "-f", str(r / "slurm.conf")])
            self._wait(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.split() == ["idle"],
                       "both slurmd nodes to be idle")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.procs:
            self.run("scancel", "--user=root", check=False)
        for proc in reversed(self.procs):  # slurmd, slurmctld, then munged
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def _start(self, cmd: list[str]) -> None:
        log = open(self.root / f"{Path(cmd[0]).name}-{len(self.procs)}.out", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           stdin=subprocess.DEVNULL))

    def _wait(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited while waiting for {what}; logs in {self.root}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}; logs in {self.root}")

    def run(self, *cmd: str, check: bool = True, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, capture_output=True, text=True, env={**self.env, **(env or {})}, cwd=cwd,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr or done.stdout}")
        return done

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, NodeList, Restarts, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_ids, timeout: float = 900) -> dict[str, dict]:
        """Wait until every job has ended (requeued ones run again); their final `job` records."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = {j: self.job(j) for j in job_ids}
            if all(j["JobState"] in ENDED or j.get("Reason") == "DependencyNeverSatisfied" for j in jobs.values()):
                return jobs
            if time.monotonic() > deadline:
                raise TimeoutError(f"Slurm jobs still running after {timeout} s: {jobs}")
            time.sleep(0.5)
