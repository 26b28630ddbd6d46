"""launch/slurm/train.sbatch and `memscale launch slurm` on a real Slurm: a one-node cluster on this machine
(tests/slurm_cluster.py; the packages are installed with apt-get when missing), jobs submitted with sbatch and
followed with scontrol, dp=2 training on the bundled corpus.

Preemption is delivered as Slurm delivers its warning: `--signal=B:USR1@S` makes slurmctld send SIGUSR1 to the
batch script S seconds before the time limit, and `scancel --signal=USR1 --batch` sends the same signal to the same
process now. A real time limit would make the test wait over a minute (limits are whole minutes) and land the
signal at whatever step the run has reached when Slurm's timer thread next looks, so the signal is sent once the
run has written its first checkpoint instead.

Deselect with `-m "not slurm"`.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from memscale.checkpoint import simple as ckpt
from tests.slurm_cluster import LocalSlurm, unavailable
from tests.test_nothing_lost import _assert_same_weights, _config_file, _run

REPO = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "TORCH_EXTENSIONS_DIR": os.environ.get(
        "TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/memscale/torch_extensions")
    ),
}
MAX_STEPS = 24
RUN = (
    f"train.max_steps={MAX_STEPS}",
    "train.save_every=4",
    "train.keep_checkpoints=2",
    "train.log_every=1",
    "train.eval_every=0",
    "data.num_streams=2",
    "parallel.zero_stage=2",
    "train.memory_grad=truncated",
    "model.dropout=0.1",  # each rank's dropout stream must be restored on resume, or the weights drift
)


@pytest.fixture(scope="session")
def slurm():
    """A one-node Slurm for the session: munged, slurmctld and slurmd started here, stopped at the end."""
    why = unavailable()
    if why is not None:
        pytest.skip(why)
    # Not under pytest's tmp dir: munged refuses a socket below a directory that other users cannot enter.
    root = tempfile.mkdtemp(prefix="memscale-slurm-")
    cluster = LocalSlurm(root)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _finished(job: dict[str, str]) -> bool:
    return job["JobState"] in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def _output(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else "(no output file)"


@pytest.fixture(scope="module")
def straight(slurm, data_dir, tmp_path_factory):
    """A dp=2 run submitted with `memscale launch slurm` and never stopped; (job, run directory, its output)."""
    tmp = tmp_path_factory.mktemp("straight")
    out = tmp / "run"
    cfg = _config_file(tmp, data_dir, out, *RUN)
    r = _run("launch", "slurm", str(cfg), "--nodes", "1", "--nproc-per-node", "2", env={**ENV, **slurm.env})
    assert r.returncode == 0, r.stderr
    job_id = re.search(r"submitted job (\d+)", r.stdout).group(1)
    job = slurm.wait(job_id, _finished, timeout=240)
    return job, out, _output(out / "slurm" / f"memscale-{job_id}.out")


@pytest.mark.slurm
def test_preempted_job_requeues_itself_and_ends_bitwise_equal(slurm, data_dir, tmp_path, request):
    """Plain `sbatch train.sbatch CONFIG`, dp=2: SIGUSR1 to the batch script once step 4 is saved -> the ranks
    checkpoint and exit 75 -> `scontrol requeue` -> the same job id starts again, resumes from that checkpoint and
    ends with the weights of a run that was never stopped, bit for bit."""
    out = tmp_path / "run"
    cfg = _config_file(tmp_path, data_dir, out, *RUN)
    job_id = slurm.sbatch(
        f"--output={tmp_path / 'job-%j.out'}",
        str(REPO / "launch" / "slurm" / "train.sbatch"),
        str(cfg),
        env={**ENV, "MEMSCALE_NPROC_PER_NODE": "2", "MEMSCALE_PYTHON": sys.executable},
        cwd=REPO,
    )
    log = tmp_path / f"job-{job_id}.out"
    deadline = time.monotonic() + 180
    while ckpt.latest(out / "checkpoints") is None:
        job = slurm.job(job_id)
        assert not _finished(job) and time.monotonic() < deadline, f"no checkpoint: {job}\n{_output(log)}"
        time.sleep(0.2)
    slurm.cmd("scancel", "--signal=USR1", "--batch", job_id)
    slurm.wait(job_id, lambda j: int(j["Restarts"]) >= 1, timeout=120)
    # While the requeued job waits and resumes, the reference run (the module fixture) trains beside it.
    ref_job, ref_out, _ = request.getfixturevalue("straight")
    job = slurm.wait(job_id, _finished, timeout=240)
    text = _output(log)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), text
    stopped = re.search(r"SIGUSR1 received: stopped after step (\d+)", text)
    assert stopped, text
    step = int(stopped.group(1))
    assert 4 <= step < MAX_STEPS
    assert f"training step ended with 75; checkpoint {ckpt.step_dir_name(step)}" in text
    assert f"requeueing: the next start resumes from {ckpt.step_dir_name(step)}" in text
    assert f"resume: {out / 'checkpoints' / ckpt.step_dir_name(step)} at step {step}" in text
    assert f"done: {MAX_STEPS} steps" in text
    assert ref_job["JobState"] == "COMPLETED"
    final = ckpt.step_dir_name(MAX_STEPS)
    _assert_same_weights(ref_out / "checkpoints" / final, out / "checkpoints" / final)


@pytest.mark.slurm
def test_dp2_job_from_memscale_launch_trains_and_finishes(straight):
    job, out, text = straight
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "0"), text
    assert "1 node(s) x 2 process(es), rendezvous localhost:" in text and f"run directory {out}" in text
    assert "x 2 ranks, ZeRO-2)" in text
    assert f"resume: no checkpoint under {out / 'checkpoints'} yet: starting at step 0" in text
    assert f"done: {MAX_STEPS} steps" in text and "training step ended with 0" in text
    final = out / "checkpoints" / ckpt.step_dir_name(MAX_STEPS)
    assert ckpt.latest(out / "checkpoints") == final and (final / "deepspeed").is_dir()
    assert (out / "slurm" / "train.sbatch").is_file() and (out / "slurm" / "config.yaml").is_file()
    assert any((out / "tb").iterdir())  # TensorBoard in the run directory


# -- the helper without a cluster ---------------------------------------------------------------------------------


def test_launch_dry_run_prints_the_job_and_writes_nothing(data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _config_file(tmp_path, data_dir, out, *RUN)
    r = _run(
        "launch", "slurm", str(cfg), "--nodes", "2", "--nproc-per-node", "1", "--time", "1:00:00",
        "--partition", "gpu", "--sbatch-arg=--gpus-per-node=1", "--dry-run",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    command = r.stdout.strip().splitlines()[-1]
    for part in (
        "MEMSCALE_NPROC_PER_NODE=1",
        "MEMSCALE_STOP_TIMEOUT=110",
        "sbatch --parsable --job-name=memscale --nodes=2 --ntasks-per-node=1 --signal=B:USR1@120",
        f"--output={out}/slurm/%x-%j.out --partition=gpu --time=1:00:00 --gpus-per-node=1",
        f"{out}/slurm/train.sbatch {out}/slurm/config.yaml",
    ):
        assert part in command, command
    assert not out.exists()


def test_launch_errors_are_one_line(data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _config_file(tmp_path, data_dir, out, *RUN)
    no_sbatch = {**os.environ, "PATH": str(tmp_path / "empty")}
    cases = [
        ((), no_sbatch, "sbatch not found on PATH"),
        (("--nproc-per-node", "2", "--set", "parallel.dp=3"), None, "world size 2 != parallel.tp*pp*dp"),
        (("--signal-lead", "5"), None, "--signal-lead=5 leaves the ranks no time to checkpoint"),
        (("--script", str(tmp_path / "nope.sbatch")), None, "nope.sbatch not found"),
    ]
    for args, env, message in cases:
        r = _run("launch", "slurm", str(cfg), *args, env=env)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and message in err[0], (args, r.stderr)
    assert not out.exists()
    (out / "checkpoints").mkdir(parents=True)
    r = _run("launch", "slurm", str(cfg), "--dry-run")
    assert r.returncode == 2 and "already holds files: pass --resume" in r.stderr
    assert _run("launch", "slurm", str(cfg), "--dry-run", "--resume").returncode == 0
