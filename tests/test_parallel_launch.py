"""The local launcher: torchrun with N processes, exit codes, and the environment each rank reads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memscale.parallel.launch import dist_env, spawn_local, torchrun_command

ROOT = str(Path(__file__).resolve().parents[1])


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": ROOT}


def test_spawn_local_runs_every_rank(tmp_path):
    assert spawn_local(2, [str(tmp_path), "-1", "0"], module="tests.launch_entry", env=_env(), cwd=ROOT) == 0
    seen = sorted((tmp_path / f"rank{r}.txt").read_text() for r in range(2))
    # rank, world size, local rank, launched, sum of ranks over the group
    assert seen == ["0 2 0 True 1.0", "1 2 1 True 1.0"]


def test_spawn_local_reports_a_failing_rank(tmp_path):
    assert spawn_local(2, [str(tmp_path), "1", "3"], module="tests.launch_entry", env=_env(), cwd=ROOT) != 0


def test_spawn_local_reaches_the_cli():
    assert spawn_local(1, ["--help"], env=_env(), cwd=ROOT) == 0


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_stop_signal_reaches_every_rank(tmp_path, sig):
    """SIGUSR1 (Slurm's warning) and SIGTERM to `spawn_local` reach every rank through torchrun, which waits for
    them; the command exits 75 as one process would. torchrun's own default would let SIGUSR1 kill it and leave the
    ranks running."""
    code = (
        "import sys\nfrom memscale.parallel.launch import spawn_local\n"
        f"sys.exit(spawn_local(2, [{str(tmp_path)!r}], module='tests.signal_entry'))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
            assert proc.poll() is None and time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.1)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 75
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [(tmp_path / f"rank{r}.sig").read_text() for r in range(2)] == [sig.name] * 2


def test_torchrun_command():
    cmd = torchrun_command(4, ["train", "c.yaml", "--set", "parallel.tp=2"])
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=4",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "-m",
        "memscale.cli",
        "train",
        "c.yaml",
        "--set",
        "parallel.tp=2",
    ]
    with pytest.raises(ValueError, match="--nproc=0 must be >= 1"):
        torchrun_command(0, [])


def test_dist_env():
    assert dist_env({}) == dist_env({"UNRELATED": "1"})
    assert not dist_env({}).launched and dist_env({}).world_size == 1
    e = dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.launched, e.is_main) == (
        3,
        4,
        1,
        2,
        True,
        False,
    )
    with pytest.raises(ValueError, match="start with torchrun"):
        dist_env({"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="out of range"):
        dist_env({"RANK": "2", "WORLD_SIZE": "2"})
