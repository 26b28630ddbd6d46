"""A one-node Slurm cluster on this machine, for the tests of launch/slurm/ (tests/test_slurm.py).

Debian's `slurmctld slurmd slurm-client munge` (22.05), installed with apt-get when missing, run without systemd:
everything the daemons write (munge key and socket, slurm.conf, state, spool, logs, pid files) lives in one
directory, the ports are free ones picked at start, and clients find the cluster through $SLURM_CONF, so nothing
under /etc is used and a cluster already running on the machine is left alone.

    cluster = LocalSlurm(tmp_dir).start()     # ~1 s once the packages are there
    job = cluster.sbatch("launch/slurm/train.sbatch", "configs/x.yaml", cwd=repo)
    cluster.wait(job, lambda j: j["JobState"] == "COMPLETED", timeout=120)
    cluster.stop()

The daemons run as root (SlurmUser=root), as the jobs do: on a machine without root this cannot work, and
`unavailable()` says why.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol")


def unavailable() -> str | None:
    """Why a local cluster cannot run here (None when it can), after installing the packages if they are missing.
    apt-get takes ~10 s here (the packages are ~15 MB)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "a local Slurm needs root (slurmd starts jobs as their user)"
    if all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in COMMANDS):
        return None
    if shutil.which("apt-get") is None:
        return f"Slurm is not installed and there is no apt-get to install {' '.join(PACKAGES)}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
    ):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
            return f"`{' '.join(cmd)}` failed ({r.returncode}): {tail[0]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _daemon(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _node_hardware() -> tuple[int, int]:
    """CPUs and memory (MB) as slurmd itself measures them: a node configured with more is drained at start."""
    out = subprocess.run([_daemon("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    cpus = int(re.search(r"\bCPUs=(\d+)", out).group(1))
    memory = int(re.search(r"\bRealMemory=(\d+)", out).group(1))
    return cpus, memory


class LocalSlurm:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pid_files = [self.root / "slurmd.pid", self.root / "slurmctld.pid"]

    # -- daemons -----------------------------------------------------------------------------------------------
    def start(self, *, timeout: float = 30) -> LocalSlurm:
        r = self.root
        for d in ("state", "spool", "log", "munge-key"):
            (r / d).mkdir(parents=True, exist_ok=True)
        # munged wants its key private and its socket directory open to every user.
        r.chmod(0o755)
        (r / "munge-key").chmod(0o700)
        sock_dir = r / "munge"
        sock_dir.mkdir(mode=0o755, exist_ok=True)
        key = r / "munge-key" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        self.socket = sock_dir / "munge.socket"
        self._run(
            _daemon("munged"),
            f"--socket={self.socket}",
            f"--key-file={key}",
            f"--log-file={r / 'log' / 'munged.log'}",
            f"--pid-file={sock_dir / 'munged.pid'}",
            f"--seed-file={r / 'munge-key' / 'munged.seed'}",
        )
        cpus, memory = _node_hardware()
        self.cpus = cpus
        self.conf.write_text(self._slurm_conf(cpus=cpus, memory=memory))
        self._run(_daemon("slurmctld"), "-f", str(self.conf))
        self._run(_daemon("slurmd"), "-f", str(self.conf), "-N", "localhost")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.cmd("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return self
            time.sleep(0.2)
        raise RuntimeError(f"the local Slurm node is {state!r}, not idle, after {timeout} s: see {r / 'log'}")

    def _slurm_conf(self, *, cpus: int, memory: int) -> str:
        r = self.root
        return f"""\
# One node on localhost, written by tests/slurm_cluster.py.
ClusterName=memscale-test
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={self.socket},cred_expire=5
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.log"}
# No systemd, no cgroups: processes are tracked by parentage, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
# The main scheduling loop every second (default 60): a requeued job starts as soon as it is eligible.
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
NodeName=localhost CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""

    def stop(self) -> None:
        """Cancel what is still queued, then stop slurmd, slurmctld and munged (each by the pid it wrote)."""
        if self.conf.exists():
            jobs = self.cmd("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if jobs:
                self.cmd("scancel", *jobs, check=False)
        _terminate([_pid_in(f) for f in self._pid_files])
        sock = getattr(self, "socket", None)
        if sock is not None:
            subprocess.run([_daemon("munged"), "--stop", f"--socket={sock}"], capture_output=True)

    def _run(self, *cmd: str) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(
                f"{Path(cmd[0]).name} did not start ({r.returncode}): {r.stderr.strip()[-500:]}"
            )

    # -- clients -----------------------------------------------------------------------------------------------
    def cmd(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        r = subprocess.run(args, capture_output=True, text=True, timeout=60, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def sbatch(self, *args: str, env: dict | None = None, cwd: str | os.PathLike | None = None) -> str:
        """Submit; the job id."""
        r = self.cmd("sbatch", "--parsable", *args, env={**self.env, **(env or {})}, cwd=cwd)
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...): slurmctld keeps a finished job for
        MinJobAge (300 s), and there is no accounting database for sacct."""
        out = self.cmd("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, done: Callable[[dict[str, str]], bool], *, timeout: float) -> dict[str, str]:
        """Poll the job every 0.5 s until `done(job)`; TimeoutError with its last state otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if done(info):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {info.get('JobState')} ({info.get('Reason')}) after {timeout} s"
                )
            time.sleep(0.5)


def _pid_in(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _terminate(pids: list[int | None], *, timeout: float = 15) -> None:
    """SIGTERM to each, then wait for all of them together (slurmctld takes a few seconds to save its state)."""
    alive = []
    for pid in pids:
        if pid is None:
            continue
        try:
            os.kill(pid, signal.SIGTERM)
            alive.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _exists(p)]


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
