"""`memscale launch slurm`: write the job script of a run into its run directory and submit it with sbatch.

    memscale launch slurm configs/quickstart.yaml --nodes 2 --nproc-per-node 4 --time 24:00:00 \\
        --set train.out_dir=runs/qs-8ranks
    memscale launch slurm configs/quickstart.yaml --nodes 2 --nproc-per-node 4 --dry-run    # print, submit nothing

What it writes, under `<train.out_dir>/slurm/`: `train.sbatch` (a copy of launch/slurm/train.sbatch, the script the
job runs, every start of it) and `config.yaml` (the config with every --set applied: a requeued start reads exactly
what was submitted, whatever happens to the original file). Slurm's output goes to `slurm/memscale-<jobid>.out`
(appended to by every start), TensorBoard to `<train.out_dir>/tb` as for any run. The layout is checked before
anything is written: nodes x processes per node must equal parallel.tp x pp x dp.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

TEMPLATE = Path(__file__).resolve().parents[2] / "launch" / "slurm" / "train.sbatch"
"""The job script in a source checkout (the package is installed with `pip install -e .`)."""


@dataclass(frozen=True)
class SlurmJob:
    """What one submission asks of Slurm; the options that `memscale launch slurm` takes."""

    nodes: int
    nproc_per_node: int
    partition: str | None = None
    time: str | None = None
    signal_lead: int = 120
    """Seconds before the time limit at which Slurm sends SIGUSR1 (`--signal=B:USR1@S`): the time the ranks have to
    finish their step and checkpoint; torchrun waits for them 10 s less than this."""
    job_name: str = "memscale"
    sbatch_args: tuple[str, ...] = ()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _check_run_dir(out_dir: Path, *, resume: bool) -> None:
    from memscale.train.rundir import LOCK_NAME, locked_by_other

    holder = locked_by_other(out_dir)
    if holder is not None:
        raise ValueError(
            f"train.out_dir={out_dir} is in use by another memscale run ({holder}): wait for it to end"
        )
    if resume or not out_dir.exists():
        return
    if any(p.name != LOCK_NAME for p in out_dir.iterdir()):
        raise ValueError(
            f"train.out_dir={out_dir} already holds files: pass --resume to continue that run on Slurm, "
            "or choose another train.out_dir"
        )


def sbatch_command(job: SlurmJob, *, script: Path, config: Path, out_dir: Path, cwd: Path) -> list[str]:
    """The sbatch command line (its options override the #SBATCH defaults in the script)."""
    cmd = [
        "sbatch",
        "--parsable",
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
        f"--signal=B:USR1@{job.signal_lead}",
        f"--chdir={cwd}",
        f"--output={out_dir / 'slurm' / '%x-%j.out'}",
    ]
    if job.partition:
        cmd.append(f"--partition={job.partition}")
    if job.time:
        cmd.append(f"--time={job.time}")
    return [*cmd, *job.sbatch_args, str(script), str(config)]


def job_env(job: SlurmJob) -> dict[str, str]:
    """What the job script reads from the environment (sbatch exports the submitting environment)."""
    return {
        "MEMSCALE_NPROC_PER_NODE": str(job.nproc_per_node),
        "MEMSCALE_PYTHON": sys.executable,
        "MEMSCALE_STOP_TIMEOUT": str(max(job.signal_lead - 10, 10)),
    }


def launch(
    config_path: str,
    overrides: list[str],
    job: SlurmJob,
    *,
    resume: bool = False,
    dry_run: bool = False,
    template: str | os.PathLike | None = None,
    say=print,
) -> int:
    """Check, write the job's files, submit; 0 once sbatch accepted the job. ValueError (one line) on bad input."""
    from memscale.config import load_config, to_dict
    from memscale.parallel.dims import ParallelDims

    for name, value in (("--nodes", job.nodes), ("--nproc-per-node", job.nproc_per_node)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    if job.signal_lead < 20:
        raise ValueError(
            f"--signal-lead={job.signal_lead} leaves the ranks no time to checkpoint: use >= 20 s"
        )
    cfg = load_config(config_path, overrides)
    ParallelDims.for_config(cfg, world_size=job.nodes * job.nproc_per_node)
    src = Path(template) if template is not None else TEMPLATE
    if not src.is_file():
        raise ValueError(
            f"job script {src} not found: run from a source checkout (pip install -e .) or pass --script PATH"
        )
    out_dir = Path(cfg.train.out_dir).resolve()
    _check_run_dir(out_dir, resume=resume)
    script, config = out_dir / "slurm" / "train.sbatch", out_dir / "slurm" / "config.yaml"
    cmd = sbatch_command(job, script=script, config=config, out_dir=out_dir, cwd=Path.cwd())
    env = job_env(job)
    shown = shlex.join([f"{k}={v}" for k, v in env.items()] + cmd)
    if dry_run:
        say(
            f"# would write {script} (from {src}) and {config} (the config with its --set overrides), then run:"
        )
        say(shown)
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ValueError("sbatch not found on PATH: run on a Slurm login node, or see the job with --dry-run")
    created = not out_dir.exists()
    script.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(script, src.read_text(encoding="utf-8"))
    script.chmod(0o755)
    _write_atomic(config, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    r = subprocess.run([sbatch, *cmd[1:]], capture_output=True, text=True, env={**os.environ, **env})
    if r.returncode != 0:
        if created:  # leave no half-started run behind: submitting again must not need --resume
            shutil.rmtree(out_dir, ignore_errors=True)
        why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        raise ValueError(f"sbatch refused the job: {why} (command: {shown})")
    job_id = r.stdout.strip().split(";")[0]
    say(
        f"submitted job {job_id}: {job.nodes} node(s) x {job.nproc_per_node} process(es), run directory {out_dir}; "
        f"output {out_dir / 'slurm' / f'{job.job_name}-{job_id}.out'}; squeue -j {job_id}; "
        f"tensorboard --logdir {out_dir / 'tb'}"
    )
    return 0
