"""End to end on real files: prepare the bundled corpus, train, read TensorBoard back, resume exactly."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memscale.checkpoint import simple as ckpt
from memscale.config import config_from_dict
from memscale.train.trainer import Trainer
from tests.conftest import VOCAB

REPO = Path(__file__).resolve().parents[1]


def _cfg(data_dir, out_dir, *extra):
    return config_from_dict(
        {},
        [
            "model.d_model=32",
            "model.num_layers=2",
            "model.num_heads=2",
            f"model.vocab_size={VOCAB}",
            "model.memory.kind=rmt",
            "model.memory.num_tokens=4",
            f"data.dir={data_dir}",
            "data.segment_len=16",
            "data.num_streams=2",
            "train.max_steps=8",
            "train.warmup_steps=2",
            "train.bptt_segments=2",
            "train.memory_grad=truncated",
            "train.eval_every=4",
            "train.eval_segments=4",
            "train.log_every=2",
            f"train.out_dir={out_dir}",
            *extra,
        ],
    )


def _events(out_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(out_dir) / "tb"))
    acc.Reload()
    return acc


def test_train_logs_tensorboard_and_checkpoints(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    summary = Trainer(_cfg(data_dir, out)).train()
    printed = capsys.readouterr().out
    assert (
        "step      8/8" in printed and "validation @ step 8" in printed and "unigram baseline ppl" in printed
    )
    acc = _events(out)
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/ppl",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/mfu",
        "memory/norm/mem",
        "val/loss",
        "val/ppl",
        "val/unigram_ppl",
    ):
        assert tag in tags, tag
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [2, 4, 6, 8]
    assert loss[-1].value == pytest.approx(summary.final_loss, rel=1e-6)
    assert acc.Scalars("val/ppl")[-1].value == pytest.approx(summary.val_ppl, rel=1e-6)
    assert 0 < acc.Scalars("train/mfu")[-1].value < 1.5
    ts = ckpt.load(ckpt.latest(out / "checkpoints"))
    assert ts.step == 8 and "mem" in ts.memory and ts.loader["steps"] == 16


def test_resume_matches_uninterrupted_run(data_dir, tmp_path):
    """Stop after 4 of 8 steps (a kept checkpoint), resume: weights, memory and loss equal the straight run.

    Exact equality (not a tolerance): same ops, same order, same RNG and loader position on one thread.
    """
    straight = tmp_path / "straight"
    a = Trainer(
        _cfg(data_dir, straight, "train.save_every=4", "train.keep_checkpoints=3", "model.dropout=0.1")
    ).train()
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000008")
    (resumed / "checkpoints" / "latest").write_text("step-000004\n")
    b = Trainer(
        _cfg(data_dir, resumed, "train.save_every=4", "train.keep_checkpoints=3", "model.dropout=0.1"),
        resume=True,
    ).train()
    assert b.steps == 8 and b.final_loss == a.final_loss and b.val_ppl == a.val_ppl
    sa = ckpt.load(straight / "checkpoints" / "step-000008")
    sb = ckpt.load(resumed / "checkpoints" / "step-000008")
    for name, t in sa.model.items():
        assert torch.equal(t, sb.model[name]), name
    assert torch.equal(sa.memory["mem"], sb.memory["mem"])
    assert sa.loader == sb.loader


@pytest.mark.parametrize("kind, mode", [("rmt", "truncated"), ("memformer", "replay")])
def test_sliding_depth_resume_matches_uninterrupted_run(data_dir, tmp_path, kind, mode):
    """Sliding depth 3 (deeper than the 2 segments of a step, so the history spans two earlier steps), dropout on:
    stopped at step 3 and resumed, step 6 is bitwise equal to the straight run. The checkpoint carries the history
    (the 3 segments, the state before them, their RNG states); without it the resumed run differs."""
    mode_args = (
        f"model.memory.kind={kind}",
        f"train.memory_grad={mode}",
        "train.bptt_depth=3",
        "model.dropout=0.1",
        "train.max_steps=6",
        "train.save_every=3",
        "train.keep_checkpoints=3",
        "train.eval_every=3",
    )
    straight = tmp_path / "straight"
    a = Trainer(_cfg(data_dir, straight, *mode_args), log=lambda _: None).train()
    hist = ckpt.load(straight / "checkpoints" / "step-000003").history
    assert hist["tokens"].shape[:2] == (2, 3) and hist["rng.cpu"].shape[0] == 3 and "state.mem" in hist
    for name, drop_history in (("resumed", False), ("no-history", True)):
        run = tmp_path / name
        shutil.copytree(straight, run)
        shutil.rmtree(run / "checkpoints" / "step-000006")
        (run / "checkpoints" / "latest").write_text("step-000003\n")
        trainer = Trainer(_cfg(data_dir, run, *mode_args), resume=True, log=lambda _: None)
        assert trainer.step == 3 and len(trainer.history) == 3
        if drop_history:
            trainer.history = type(trainer.history)()
        b = trainer.train()
        sa = ckpt.load(straight / "checkpoints" / "step-000006")
        sb = ckpt.load(run / "checkpoints" / "step-000006")
        same = [torch.equal(t, sb.model[n]) for n, t in sa.model.items()]
        if drop_history:
            assert not all(same)
            continue
        assert all(same) and b.final_loss == a.final_loss and b.val_ppl == a.val_ppl
        assert torch.equal(sa.memory["mem"], sb.memory["mem"])
        assert sa.history.keys() == sb.history.keys()
        for k, t in sa.history.items():
            assert torch.equal(t, sb.history[k]), k


def test_sliding_depth_history_is_dropped_after_a_skipped_step(data_dir, tmp_path, monkeypatch):
    """A skipped step (non-finite loss) drops the history, which would recompute the bad memory; the history then
    grows again from the memory the trainer restarted (depth 3, 2 segments per step)."""
    import memscale.train.trainer as trainer_module
    from memscale.train.bptt import run_window

    seen = []

    def third_step_not_finite(*args, **kw):
        seen.append(len(kw["history"]))
        result = run_window(*args, **kw)
        if len(seen) == 3:
            result.loss_sum = math.nan
        return result

    monkeypatch.setattr(trainer_module, "run_window", third_step_not_finite)
    cfg = _cfg(data_dir, tmp_path / "run", "train.bptt_depth=3", "train.max_steps=5", "train.eval_every=0")
    summary = Trainer(cfg, log=lambda _: None).train()
    assert summary.skipped_steps == 1 and math.isfinite(summary.final_loss)
    assert seen == [0, 2, 3, 0, 2]


def _memscale(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "memscale.cli", *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.max_stepz=3", "unknown config key 'train.max_stepz'"),
        ("train.max_steps=ten", "train.max_steps='ten' must be an integer"),
        ("data.segment_len=0", "data.segment_len=0 must be > 0"),
        ("model.memory.kind=rmtt", "model.memory.kind='rmtt' is not one of"),
        ("data.dir=/nonexistent/data", "data.dir=/nonexistent/data does not exist"),
        ("model.vocab_size=1000", "model.vocab_size=1000 differs from the tokenizer"),
    ],
)
def test_cli_bad_input_one_line_and_nothing_written(data_dir, tmp_path, override, fragment):
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data:\n  dir: {data_dir}\nmodel:\n  vocab_size: {VOCAB}\n  d_model: 32\n  num_heads: 2\n"
        f"train:\n  out_dir: {out}\n  max_steps: 2\n"
    )
    r = _memscale("train", str(cfg), "--set", override)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert not out.exists()


def test_truncated_shard_is_named(data_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    shard = sorted((broken / "train").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data:\n  dir: {broken}\nmodel:\n  vocab_size: {VOCAB}\n  d_model: 32\n  num_heads: 2\n"
        f"train:\n  out_dir: {tmp_path / 'run'}\n  max_steps: 2\n"
    )
    r = _memscale("train", str(cfg))
    assert r.returncode == 2
    assert (
        shard.name in r.stderr
        and "memscale data prepare" in r.stderr
        and len(r.stderr.strip().splitlines()) == 1
    )


def test_existing_run_is_not_overwritten(data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    precious = out / "notes.txt"
    precious.write_text("keep me")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data:\n  dir: {data_dir}\nmodel:\n  vocab_size: {VOCAB}\n  d_model: 32\n  num_heads: 2\n"
        f"train:\n  out_dir: {out}\n  max_steps: 2\n"
    )
    r = _memscale("train", str(cfg))
    assert r.returncode == 2 and "already holds files" in r.stderr
    assert precious.read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_eval_cli_reads_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(data_dir, out, "train.max_steps=2", "train.eval_every=0")).train()
    cfg = out / "config.yaml"  # the run's own resolved config
    r = _memscale("eval", str(cfg), "--checkpoint", str(out), "--segments", "3")
    assert r.returncode == 0, r.stderr
    assert (
        "validation: loss" in r.stdout
        and "unigram baseline ppl" in r.stdout
        and "tokens          0-4096" in r.stdout
    )
    bad = _memscale("eval", str(cfg), "--checkpoint", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and "no checkpoint there" in bad.stderr


@pytest.mark.parametrize("kind", ["none", "rmt", "xl", "memformer", "lamemo", "infinity", "armt"])
def test_quickstart_config_trains_every_kind_with_one_switch(data_dir, tmp_path, kind):
    """`memscale train configs/quickstart.yaml --set model.memory.kind=K`: no other key needs changing (the
    quick start asks for memory_grad=truncated, which a kind without gradient through memory runs as detached)."""
    from memscale.config import load_config

    cfg = load_config(
        REPO / "configs" / "quickstart.yaml",
        [
            f"model.memory.kind={kind}",
            f"model.vocab_size={VOCAB}",
            f"data.dir={data_dir}",
            "data.segment_len=32",
            "train.max_steps=1",
            "train.eval_every=0",
            f"train.out_dir={tmp_path / kind}",
        ],
    )
    summary = Trainer(cfg, log=lambda _: None).train()
    assert summary.steps == 1 and math.isfinite(summary.final_loss)
