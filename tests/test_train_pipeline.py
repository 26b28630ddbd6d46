"""`memscale train --nproc 2 --set parallel.pp=2`: pipeline-parallel training in real processes (torchrun, gloo), end
to end on the bundled corpus, against one process training the same streams.

Each rank builds the whole model from the seed and keeps one stage of the 4 layers (memscale/train/
distributed.py `cut`: balanced by cost by default, 2 + 2 and 3 + 1 given by `parallel.pp_layers` for xl); the window's 2 segments of 4 streams go through the schedule in G stream groups of rows
(rmt: G = 2 = pp, its memory returns from the last stage; xl: G = 1, its memory stays per stage), the loss is
normalised by the window's targets, the gradient of the tied embedding (and of xl's u and v) is summed over the
stages and counted once in the clipping norm. fp32 on CPU: the pipeline computes the same operations on the same
values, but per group of rows (weight gradients summed in another order) and with the replicated gradients added
over the stages, so the runs agree up to the order of fp32 sums. Measured (6 AdamW steps, clipping active): losses
and validation losses within ~1e-7 relative, weights within ~2e-6 (see the printed numbers and `_compare`); rel
1e-5 on losses (1e-6 on validation) and abs 1e-5 on weights leave a margin of 5x or more. What they catch
(measured by breaking the code, xl): the copies of the tied embedding and of u and v counted twice in the clipping
norm move the weights by 2.5e-4 and validation by 3.4e-5 (the training losses by only 7e-6: the weights are the
sharp check); validation without the memory carried from one forward-only pass to the next is 5.7e-6 off.

Dropout is off in the comparison with one process (a stage draws masks only for its layers, so they cannot equal
one process's); the resume check runs with dropout on: each stage seeds its own generator (`train.seed + dp_rank +
pp_rank x dp`), every rank's RNG state is in the checkpoint and restored on that rank, so a run stopped at step 3
and resumed ends bitwise equal to one that was not stopped.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from memscale.checkpoint import simple as ckpt
from memscale.train.trainer import Trainer
from tests.test_nothing_lost import _assert_same_weights, _config_file, _run
from tests.test_train import _cfg, _events
from tests.test_train_parallel import ENV, STEPS, _dp_run, _losses, _train_with_fault

PP = ("parallel.pp=2", "model.num_layers=4", "data.num_streams=4")
RMT = ("model.memory.kind=rmt", "train.memory_grad=truncated")
# 10 validation segments: two forward-only passes (EVAL_CHUNK = 8, then 2) with the memory carried between them.
XL = ("model.memory.kind=xl", "model.memory.mem_len=16", "train.eval_segments=10")
MEMFORMER = ("model.memory.kind=memformer", "train.memory_grad=replay")


def _val_losses(out) -> list[float]:
    return [e.value for e in _events(out).Scalars("val/loss")]


def _compare(tmp_path, data_dir, mode, *pp_only, split=None):
    """pp=2 against one process; `split`: the layers per stage the run must record, when given explicitly
    (`parallel.pp_layers`), else the cost-balanced split of its config."""
    one = tmp_path / "one"
    Trainer(
        _cfg(data_dir, one, *STEPS, "train.threads=1", "model.num_layers=4", "data.num_streams=4", *mode),
        log=lambda _: None,
    ).train()
    two = tmp_path / "two"
    r = _dp_run(tmp_path, data_dir, two, *PP, *mode, *pp_only)
    assert "pp=2" in r.stdout and "done: 6 steps" in r.stdout, r.stdout
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    val_one, val_two = _val_losses(one), _val_losses(two)
    assert len(val_two) == len(val_one) == 2
    # Tighter than the training losses: a nearly untrained model leans little on its memory, so validation without
    # the memory carried from one forward-only pass to the next is only 5.7e-6 off (xl, measured); 7.8e-8 measured.
    assert val_two == pytest.approx(val_one, rel=1e-6)
    a = ckpt.load(one / "checkpoints" / "step-000006")
    b = ckpt.load(two / "checkpoints" / "step-000006")
    assert sorted(b.model) == sorted(a.model)  # consolidated: the plain model's names
    worst, outliers = 0.0, 0
    for name, t in a.model.items():
        diff = (b.model[name] - t).abs()
        # AdamW's first update is lr g / (|g| + eps) per entry: where |g| was near eps (1e-8), a gradient that
        # differs at fp32 rounding moves the entry by a visible fraction of lr (1e-3). Such entries are rare (one
        # of 4096 in blocks.1.mlp.down.weight, 1.4e-5, in the rmt run; every other entry within 2e-6): a few
        # per tensor are held to 0.1 lr, all others to abs 1e-5.
        far = int((diff > 1e-5).sum())
        assert far <= max(2, t.numel() // 1000) and diff.max().item() < 1e-4, (name, far, diff.max().item())
        outliers += far
        worst = max(worst, diff[diff <= 1e-5].max().item() if far < t.numel() else 0.0)
    assert sorted(b.memory) == sorted(a.memory)  # every stage's memory, global memory from its writer
    for name, t in a.memory.items():  # computed by those weights: 5e-5 leaves room for the rare entries above
        torch.testing.assert_close(b.memory[name], t, rtol=0, atol=5e-5, msg=name)
    loss_err = max(abs(x - y) / abs(y) for x, y in zip(_losses(two), _losses(one), strict=True))
    val_err = max(abs(x - y) / abs(y) for x, y in zip(val_two, val_one, strict=True))
    print(
        f"pp=2 vs one process: losses {loss_err:.1e} rel, val {val_err:.1e} rel, weights {worst:.1e} abs "
        f"({outliers} entries above 1e-5)"
    )
    assert b.extra["pp"] == 2 and b.extra["pp_layers"] == (split or _split_of(two / "config.yaml"))
    return two


def _split_of(config_path) -> str:
    """The layers per stage `memscale train` cuts for this config, as "3,1"."""
    from memscale.config import load_config
    from memscale.parallel.pipeline.balance import stage_layers

    return ",".join(map(str, stage_layers(load_config(config_path))))


def test_pp2_rmt_equals_one_process_and_resumes_exactly(data_dir, tmp_path):
    """rmt, truncated BPTT over the window (memory and its gradient between the last stage and the first), 2
    stream groups; the checkpoint serves `memscale eval`; with dropout, stopped at step 3 and resumed, bitwise equal."""
    two = _compare(tmp_path, data_dir, RMT)
    ev = _run("eval", str(two / "config.yaml"), "--checkpoint", str(two), "--segments", "2")
    assert ev.returncode == 0 and "validation: loss" in ev.stdout, ev.stderr

    drop = (*PP, *RMT, "model.dropout=0.1")
    full = tmp_path / "full"
    _dp_run(tmp_path, data_dir, full, *drop)
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000006")
    (resumed / "checkpoints" / "latest").write_text("step-000003\n")
    r = _dp_run(tmp_path, data_dir, resumed, *drop, resume=True)
    assert "at step 3" in r.stdout
    _assert_same_weights(full / "checkpoints" / "step-000006", resumed / "checkpoints" / "step-000006")
    # Another layout is refused in one line, naming both; so is another split of the layers.
    split = _split_of(tmp_path / "resumed.yaml")
    other = "3,1" if split == "2,2" else "2,2"
    r = _run(
        "train", str(tmp_path / "resumed.yaml"), "--resume", "--nproc", "2", "--set", "parallel.pp=1", env=ENV
    )
    assert (
        r.returncode != 0
        and f"was written by 2 processes (tp=1, pp=2 with layers {split}, ZeRO-0), this" in r.stderr
    )
    over = ("--set", f"parallel.pp_layers={other}")
    r = _run("train", str(tmp_path / "resumed.yaml"), "--resume", "--nproc", "2", *over, env=ENV)
    assert (
        r.returncode != 0 and f"this run is 2 processes (tp=1, pp=2 with layers {other}, ZeRO-0)" in r.stderr
    ), r.stderr


@pytest.mark.parametrize("split", ["2,2", "3,1"])
def test_pp2_xl_equals_one_process(data_dir, tmp_path, split):
    """xl, detached: per-layer memory on each stage, its u and v held by both stages, one stream group; the stages
    recompute their blocks in backward (activation checkpointing) against none on one process. Layers cut evenly
    and unevenly (`parallel.pp_layers`)."""
    two = _compare(
        tmp_path,
        data_dir,
        XL,
        "train.activation_checkpointing=full",
        f"parallel.pp_layers={split}",
        split=split,
    )
    assert _split_of(two / "config.yaml") == split  # the run was cut as asked


@pytest.mark.slow
def test_pp2_memformer_replay_equals_one_process(data_dir, tmp_path):
    """memformer under replay: its slots read by every stage, their initial memory and gradient sent across."""
    two = _compare(tmp_path, data_dir, MEMFORMER)
    assert (two / "checkpoints" / "step-000006").is_dir()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ("parallel.pp=2", "model.num_layers=4", "parallel.stream_groups=1"),
            "parallel.stream_groups=1 < parallel.pp=2 with model.memory.kind=rmt",
        ),
        (
            ("parallel.pp=2", "model.num_layers=4", "data.num_streams=3"),
            "data.num_streams=3 is not divisible by parallel.stream_groups=2",
        ),
        (("parallel.pp=4", "model.num_layers=3"), "parallel.pp=4 > model.num_layers=3"),
        (
            ("parallel.pp=2", "model.num_layers=4", "parallel.pp_layers=3,2"),
            "parallel.pp_layers='3,2' sums to 5 but model.num_layers=4",
        ),
        (
            ("parallel.pp=2", "model.num_layers=4", "parallel.zero_stage=2"),
            "parallel.zero_stage=2 cannot combine with parallel.pp=2",
        ),
    ],
)
def test_bad_pipeline_layout_is_one_line_before_any_process_starts(data_dir, tmp_path, overrides, message):
    cfg = _config_file(tmp_path, data_dir, tmp_path / "run")
    args = [a for o in overrides for a in ("--set", o)]
    r = _run("train", str(cfg), "--nproc", "2", *args)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and message in err[0], r.stderr


def _compare_4(tmp_path, data_dir, mode, layout):
    """4 processes (`layout`: dp=2 with ZeRO-1, or tp=2) against one process training the 4 streams."""
    one = tmp_path / "one"
    Trainer(
        _cfg(data_dir, one, *STEPS, "train.threads=1", "model.num_layers=4", "data.num_streams=4", *mode),
        log=lambda _: None,
    ).train()
    four = tmp_path / "four"
    cfg = _config_file(tmp_path, data_dir, four, *STEPS, *PP, *mode, *layout, name="four.yaml")
    r = _run("train", str(cfg), "--nproc", "4", env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _losses(four) == pytest.approx(_losses(one), rel=1e-5)
    assert _val_losses(four) == pytest.approx(_val_losses(one), rel=1e-5)
    a = ckpt.load(one / "checkpoints" / "step-000006")
    b = ckpt.load(four / "checkpoints" / "step-000006")
    assert sorted(b.model) == sorted(a.model)
    for name, t in a.model.items():
        diff = (b.model[name] - t).abs()  # the rare AdamW entries of `_compare`
        assert int((diff > 1e-5).sum()) <= max(2, t.numel() // 1000) and diff.max().item() < 1e-4, name
    for name, t in a.memory.items():
        torch.testing.assert_close(b.memory[name], t, rtol=0, atol=5e-5, msg=name)
    return r


@pytest.mark.slow
def test_dp2_by_pp2_zero1_equals_one_process(data_dir, tmp_path):
    """dp=2 x pp=2 under ZeRO-1 (4 processes): each pipeline trains 2 of the 4 streams; DeepSpeed's ZeRO-1 norm
    skips the stage copies marked ds_pipe_replicated (xl's u and v and the tied embedding count once)."""
    r = _compare_4(tmp_path, data_dir, XL, ("parallel.zero_stage=1", "data.num_streams=2"))
    assert "x 2 ranks, pp=2 (1 stream groups), ZeRO-1)" in r.stdout, r.stdout


@pytest.mark.slow
def test_tp2_by_pp2_equals_one_process(data_dir, tmp_path):
    """tp=2 x pp=2 (4 processes): every stage also split over 2 tensor-parallel ranks (rmt, truncated)."""
    r = _compare_4(tmp_path, data_dir, RMT, ("parallel.tp=2",))
    assert "tp=2, pp=2 (2 stream groups), ZeRO-0)" in r.stdout, r.stdout


def test_pp2_non_finite_step_is_skipped_and_its_streams_restart(data_dir, tmp_path):
    """A window whose loss and gradients are NaN and that leaves stream 1's memory NaN on every stage: the update is
    skipped on every stage (no parameter or moment moves), stream 1 restarts from the initial memory on every
    stage (the stages agree on the rows), and the run trains on to a finite checkpoint."""
    out = tmp_path / "run"
    cfg = _config_file(
        tmp_path, data_dir, out, *PP, *RMT, "train.max_steps=5", "train.log_every=1", "train.eval_every=0"
    )
    r = _train_with_fault(cfg, out, "tests.pipeline_fault_entry")
    assert "step 3: loss nan, grad norm nan: not finite, optimizer step skipped (1 in a row" in r.stdout
