"""Starting N local processes, and reading what torchrun tells each of them.

    memscale train CONFIG --nproc 4 ...        ->  spawn_local(4, ["train", "CONFIG", ...])
                                                =  python -m torch.distributed.run --standalone --nproc-per-node 4 \\
                                                       -m memscale.cli train CONFIG ...
    torchrun --nproc-per-node 4 -m memscale train CONFIG --set parallel.tp=2      (the same, by hand)

In each process, `dist_env()` says which rank it is; `memscale.parallel.dims` builds the layout from the config and
$WORLD_SIZE, validates it, and only then joins the default group (gloo on CPU, nccl on CUDA).
This module imports no torch: the `--nproc` path of the CLI stays fast.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

EXIT_STOPPED = 75
"""What `memscale train` exits with after a stop signal and its checkpoint (EX_TEMPFAIL; trainer.EXIT_PREEMPTED)."""

TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""What torchrun passes on to its ranks (and then waits for them, TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds, 30 by
default). Its default list lacks SIGUSR1, Slurm's usual warning: torchrun would die of it and leave the ranks running.
launch/slurm/train.sbatch passes the same list."""


def torchrun_command(nproc: int, argv: Sequence[str], *, module: str = "memscale.cli") -> list[str]:
    if nproc < 1:
        raise ValueError(f"--nproc={nproc} must be >= 1")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a local rendezvous on a free port: no MASTER_ADDR/PORT to choose
        f"--nproc-per-node={nproc}",
        f"--signals-to-handle={TORCHRUN_SIGNALS}",
        "-m",
        module,
        *argv,
    ]


def spawn_local(
    nproc: int,
    argv: Sequence[str],
    *,
    module: str = "memscale.cli",
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> int:
    """Run `python -m <module> <argv>` in `nproc` processes under torchrun on this machine; its exit code.

    torchrun returns 0 when every rank exits 0; when one fails it stops the others and returns 1 (the failing
    rank's own status and traceback are in the log it prints).
    """
    full_env = dict(os.environ if env is None else env)
    # The launcher is the place to keep N processes from each using every core; a worker that wants more sets
    # train.threads. torchrun does the same, but only when OMP_NUM_THREADS is unset and nproc > 1.
    full_env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen(torchrun_command(nproc, argv, module=module), env=full_env, cwd=cwd)
    # A scheduler's stop signal sent to this process is passed on: torchrun hands SIGTERM to every rank, which
    # finishes its step and checkpoints (README, "When things go wrong"). Only the main thread installs handlers.
    stopped = []

    def forward(signum, _frame):
        stopped.append(signum)
        proc.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        rc = proc.wait()
        # torchrun folds the ranks' exit codes into its own (1, with a traceback of the signal); the ranks were
        # told to stop and checkpointed: report what a lone `memscale train` reports, so a job script requeues.
        return EXIT_STOPPED if rc != 0 and any(s != signal.SIGINT for s in stopped) else rc
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launched: bool
    """True under torchrun (or any launcher that sets RANK/WORLD_SIZE); False for a plain single process."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """RANK, WORLD_SIZE, LOCAL_RANK (and LOCAL_WORLD_SIZE) as set by torchrun; a single process without them."""
    e = os.environ if environ is None else environ
    if "WORLD_SIZE" not in e and "RANK" not in e:
        return DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, launched=False)
    try:
        world = int(e["WORLD_SIZE"])
        rank = int(e["RANK"])
        local_rank = int(e.get("LOCAL_RANK", rank))
        local_world = int(e.get("LOCAL_WORLD_SIZE", world))
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"the launcher environment is incomplete ({err}): start with torchrun, which sets RANK, WORLD_SIZE and "
            "LOCAL_RANK, or set none of them for one process"
        ) from None
    if not 0 <= rank < world or not 0 <= local_rank < local_world:
        raise ValueError(f"RANK={rank} / LOCAL_RANK={local_rank} out of range for WORLD_SIZE={world}")
    return DistEnv(
        rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world, launched=True
    )
