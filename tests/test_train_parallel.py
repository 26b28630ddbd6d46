"""`memscale train --nproc 2`: data-parallel training with ZeRO in real processes (torchrun, gloo), end to end on
the bundled corpus, against one process training the same global streams.

Two ranks of 2 streams read exactly the rows of one process with 4 (the loader's global plan), and the loss is
normalised by the target tokens of all ranks, so the runs compute the same gradients up to the order of fp32 sums:
measured 2e-7 apart in the weights after 6 AdamW steps and equal losses to the printed digits. The tolerance,
rel 1e-5 on losses and abs 1e-5 on weights, is far below what a wrong normalisation (a factor of 2 in the
gradient, ~1e-3 in the losses by step 3) or a rank reading the wrong rows would give.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from memscale.checkpoint import simple as ckpt
from memscale.train.trainer import Trainer
from tests.test_nothing_lost import _assert_same_weights, _config_file, _run, _stop_at
from tests.test_train import _cfg, _events

ENV = {**os.environ, "TORCH_EXTENSIONS_DIR": os.path.expanduser("~/.cache/memscale/torch_extensions")}
STEPS = (
    "train.max_steps=6",
    "train.save_every=3",
    "train.keep_checkpoints=3",
    "train.log_every=1",
    "train.eval_every=3",
)


def _losses(out) -> list[float]:
    return [e.value for e in _events(out).Scalars("train/loss")]


def _dp_run(tmp_path, data_dir, out, *extra, resume=False):
    cfg = _config_file(tmp_path, data_dir, out, *STEPS, "data.num_streams=2", *extra, name=f"{out.name}.yaml")
    args = ["train", str(cfg), "--nproc", "2"] + (["--resume"] if resume else [])
    r = _run(*args, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _resumed_at_3_ends_the_same(tmp_path, data_dir, run, *mode) -> None:
    """A copy of `run` cut back to its step-3 checkpoint and resumed ends bitwise equal to `run` at step 6."""
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000006")
    (resumed / "checkpoints" / "latest").write_text("step-000003\n")
    r = _dp_run(tmp_path, data_dir, resumed, *mode, resume=True)
    assert "at step 3" in r.stdout
    _assert_same_weights(run / "checkpoints" / "step-000006", resumed / "checkpoints" / "step-000006")


@pytest.mark.parametrize(
    "stage, memory_grad, recompute, depth",
    [
        (2, "truncated", "selective", None),
        (3, "replay", "full", None),
        (0, "detached", "none", None),
        # Sliding depth 3 (memscale/train/bptt.py): history segments rerun on every rank, the per-age state
        # gradients by autograd.grad beside the engine's backward; each rank's history in the checkpoint.
        (2, "replay", "none", 3),
        (3, "truncated", "full", 2),
    ],
)
def test_dp2_zero_equals_one_process_and_resumes_exactly(
    data_dir, tmp_path, stage, memory_grad, recompute, depth
):
    """... and activation checkpointing on the two ranks (ZeRO-3 gathers the parameters of a block again when it
    is recomputed in backward) against none on one process."""
    mode = (f"parallel.zero_stage={stage}", f"train.memory_grad={memory_grad}")
    if depth is not None:
        mode = (*mode, f"train.bptt_depth={depth}")
    one = tmp_path / "one"
    Trainer(
        _cfg(data_dir, one, *STEPS, "data.num_streams=4", "train.threads=1", *mode), log=lambda _: None
    ).train()
    two = tmp_path / "two"
    mode = (*mode, f"train.activation_checkpointing={recompute}")
    r = _dp_run(tmp_path, data_dir, two, *mode)
    assert f"x 2 ranks, ZeRO-{stage})" in r.stdout and "done: 6 steps" in r.stdout
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    a = ckpt.load(one / "checkpoints" / "step-000006")
    b = ckpt.load(two / "checkpoints" / "step-000006")
    for name, t in a.model.items():
        torch.testing.assert_close(b.model[name], t, rtol=0, atol=1e-5, msg=name)
    # The memory of all 4 global streams, in global order, equals the one-process run's.
    for name, t in a.memory.items():
        torch.testing.assert_close(b.memory[name], t, rtol=0, atol=1e-5, msg=name)
    assert (two / "checkpoints" / "step-000006" / "deepspeed").is_dir()
    # Stopped at step 3 and resumed on 2 processes: the same weights as the uninterrupted run, bit for bit.
    _resumed_at_3_ends_the_same(tmp_path, data_dir, two, *mode)
    # The consolidated weights serve `memscale eval` on one process.
    ev = _run("eval", str(two / "config.yaml"), "--checkpoint", str(two), "--segments", "2")
    assert ev.returncode == 0 and "validation: loss" in ev.stdout, ev.stderr


def test_dp2_sliding_depth_with_dropout_resumes_exactly(data_dir, tmp_path):
    """Sliding depth 3 with dropout on 2 ranks: each rank reruns its history with its own RNG states, which the
    checkpoint keeps per rank (`Distributed.gather_history`); stopped at step 3 and resumed, step 6 is bitwise the
    straight run's, and the checkpoint's history spans the 4 global streams."""
    mode = (
        "parallel.zero_stage=1",
        "train.memory_grad=replay",
        "train.bptt_depth=3",
        "model.dropout=0.1",
        "train.eval_every=0",
    )
    run = tmp_path / "straight"
    _dp_run(tmp_path, data_dir, run, *mode)
    hist = ckpt.load(run / "checkpoints" / "step-000003").history
    assert hist["tokens"].shape[:2] == (4, 3) and {"rng.cpu.rank0", "rng.cpu.rank1"} <= hist.keys()
    assert not torch.equal(hist["rng.cpu.rank0"], hist["rng.cpu.rank1"])
    _resumed_at_3_ends_the_same(tmp_path, data_dir, run, *mode)


def test_bad_layout_is_one_line_before_any_process_starts(data_dir, tmp_path):
    cfg = _config_file(tmp_path, data_dir, tmp_path / "run", "parallel.dp=3")
    r = _run("train", str(cfg), "--nproc", "2")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "world size 2 != parallel.tp*pp*dp = 1*1*3 = 3" in err[0]
    r = _run("train", str(cfg), "--nproc", "2", "--set", "parallel.pp=2", "--set", "model.num_layers=1")
    assert r.returncode == 2 and "parallel.pp=2 > model.num_layers=1" in r.stderr


def test_sigterm_to_nproc_run_checkpoints_every_rank_and_resumes_exactly(data_dir, tmp_path):
    """SIGTERM to `memscale train --nproc 2` reaches both ranks through torchrun; they agree on the step to stop
    after, write one checkpoint and the command exits 75; `--resume --nproc 2` ends bitwise equal to a run that
    was never stopped."""
    import subprocess

    mode = ("parallel.zero_stage=2", "train.memory_grad=truncated", "train.eval_every=0")
    straight = tmp_path / "straight"
    _dp_run(tmp_path, data_dir, straight, *mode)
    stopped = tmp_path / "stopped"
    cfg = _config_file(tmp_path, data_dir, stopped, *STEPS, "data.num_streams=2", *mode, name="stopped.yaml")
    rc, rest = _stop_at(
        ["train", str(cfg), "--nproc", "2"], "step      1/6", timeout=300, stderr=subprocess.DEVNULL, env=ENV
    )
    assert rc == 75
    assert "SIGTERM received: stopped after step" in rest
    step = ckpt.step_of(ckpt.latest(stopped / "checkpoints"))
    assert 1 <= step < 6
    _dp_run(tmp_path, data_dir, stopped, *mode, resume=True)
    _assert_same_weights(straight / "checkpoints" / "step-000006", stopped / "checkpoints" / "step-000006")


# lamemo: head-sharded memory state (attn.l, lognorm.l) and relative-position parameters split by heads.
TP_LAMEMO = ("model.memory.kind=lamemo", "model.memory.mem_len=8", "train.memory_grad=detached")
# memformer: read and write projections split by heads; replay restores the TP tracker's streams.
TP_MEMFORMER = ("model.memory.kind=memformer", "model.dropout=0.1", "train.memory_grad=replay")


def test_tp2_trains_like_one_process_and_resumes_exactly(data_dir, tmp_path):
    """`memscale train --nproc 2 --set parallel.tp=2`: megatron-core's column/row/vocab-parallel layers, the
    vocab-parallel loss and head-sharded lamemo memory, end to end, against one process.

    With dropout the runs draw different masks (attention dropout on a TP rank's heads comes from megatron-core's
    tracker stream), so the reference comparison runs without dropout: the TP run computes the function of the
    unsharded model up to the order of fp32 sums (row-parallel all-reduce, vocab-parallel softmax), measured ~1e-7
    relative; rel 1e-5 on the losses and abs 1e-5 on weights and memory leave room for 6 AdamW steps and catch a
    misplaced shard (a wrong head order changes losses at 1e-2). The resume check runs memformer with dropout and
    replay under ZeRO-1: a run stopped at step 3 and resumed ends bitwise equal, the tracker's streams included."""
    mode = TP_LAMEMO
    one = tmp_path / "one"
    Trainer(_cfg(data_dir, one, *STEPS, "train.threads=1", *mode), log=lambda _: None).train()
    tp = tmp_path / "tp"
    r = _dp_run(tmp_path, data_dir, tp, *mode, "parallel.tp=2")
    assert "x 1 ranks, tp=2, ZeRO-0)" in r.stdout and "done: 6 steps" in r.stdout, r.stdout
    assert _losses(tp) == pytest.approx(_losses(one), rel=1e-5)
    a = ckpt.load(one / "checkpoints" / "step-000006")
    b = ckpt.load(tp / "checkpoints" / "step-000006")
    assert sorted(b.model) == sorted(a.model)  # consolidated: the plain model's names and shapes
    for name, t in a.model.items():
        torch.testing.assert_close(b.model[name], t, rtol=0, atol=1e-5, msg=name)
    assert sorted(b.memory) == sorted(a.memory)  # attn.l and lognorm.l joined over the TP ranks
    for name, t in a.memory.items():
        torch.testing.assert_close(b.memory[name], t, rtol=0, atol=1e-5, msg=name)
    ev = _run("eval", str(tp / "config.yaml"), "--checkpoint", str(tp), "--segments", "2")
    assert ev.returncode == 0 and "validation: loss" in ev.stdout, ev.stderr

    drop = (*TP_MEMFORMER, "parallel.tp=2", "parallel.zero_stage=1")
    full = tmp_path / "full"
    _dp_run(tmp_path, data_dir, full, *drop)
    _resumed_at_3_ends_the_same(tmp_path, data_dir, full, *drop)
    # Another layout is refused in one line, naming both.
    r = _run(
        "train", str(tmp_path / "resumed.yaml"), "--resume", "--nproc", "2", "--set", "parallel.tp=1", env=ENV
    )
    assert (
        r.returncode != 0
        and "was written by 2 processes (tp=2, ZeRO-1), this run is 2 processes (tp=1" in r.stderr
    )


def _train_with_fault(cfg, out, fault_module: str):
    """`memscale train CFG` on 2 ranks whose third window is made NaN by `fault_module` (tests/*_fault_entry.py):
    one step is skipped and the run ends at step 5 with a finite checkpoint. The run's output."""
    import math
    import subprocess

    from memscale.parallel.launch import torchrun_command
    from tests.test_nothing_lost import REPO

    r = subprocess.run(
        torchrun_command(2, ["train", str(cfg)], module=fault_module),
        env={**ENV, "OMP_NUM_THREADS": "1"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("optimizer step skipped") == 1, r.stdout
    assert "done: 5 steps" in r.stdout
    ts = ckpt.load(ckpt.latest(out / "checkpoints"))
    assert ts.step == 5
    ckpt.check_finite(ts)  # weights and the memory of every stream
    assert all(math.isfinite(x) for x in _losses(out)[3:])
    return r


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_dp2_non_finite_step_is_skipped(data_dir, tmp_path, stage):
    """A window whose loss and gradients are NaN on both ranks: the update is skipped under every ZeRO stage
    (ZeRO-0 has no overflow check in fp32 and would write NaN into every weight; memscale drops the gradients
    instead), and the run trains on to a finite checkpoint."""
    out = tmp_path / "run"
    cfg = _config_file(
        tmp_path,
        data_dir,
        out,
        "train.max_steps=5",
        "train.log_every=1",
        "train.eval_every=0",
        f"parallel.zero_stage={stage}",
        "train.memory_grad=truncated",
    )
    r = _train_with_fault(cfg, out, "tests.dp_fault_entry")
    assert f"ZeRO-{stage})" in r.stdout  # the layout line: the stage asked for ran
