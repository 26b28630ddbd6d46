"""Single-process checkpoints: exact round trip, corruption detected, atomic under failure and kill -9."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from memscale.checkpoint import simple as ckpt
from tests.helpers import tiny_model


def _state(step, model=None):
    model = model or tiny_model("rmt")
    opt = torch.optim.AdamW(model.parameters())
    model(
        torch.zeros(2, 8, dtype=torch.long),
        model.init_state(2),
        targets_BT=torch.ones(2, 8, dtype=torch.long),
    ).loss_sum.backward()
    opt.step()
    return ckpt.TrainState(
        step=step,
        model=model.state_dict(),
        optimizer=opt.state_dict(),
        scheduler={"last_epoch": step},
        loader={"pos": [1, 2, 3]},
        memory={"mem": torch.randn(2, 4, 32)},
        rng=ckpt.rng_state(),
        config={"k": 1},
    )


def test_roundtrip_exact(tmp_path):
    ts = _state(7)
    path = ckpt.save(tmp_path, ts)
    assert ckpt.latest(tmp_path) == path
    back = ckpt.load(path)
    assert back.step == 7 and back.loader == ts.loader and back.config == ts.config
    for k, v in ts.model.items():
        assert torch.equal(back.model[k], v), k
    assert back.model["head.weight"].data_ptr() == back.model["embed.weight"].data_ptr()  # tie restored
    assert torch.equal(back.memory["mem"], ts.memory["mem"])
    assert torch.equal(back.rng["cpu"], ts.rng["cpu"])
    s0, s1 = ts.optimizer["state"][0], back.optimizer["state"][0]
    assert torch.equal(s0["exp_avg"], s1["exp_avg"])


def test_corruption_is_named(tmp_path):
    path = ckpt.save(tmp_path, _state(1))
    target = path / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors is missing or corrupt"):
        ckpt.load(path)


def test_failed_save_leaves_previous_intact(tmp_path, monkeypatch):
    good = ckpt.save(tmp_path, _state(1))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(OSError):
        ckpt.save(tmp_path, _state(2))
    assert ckpt.latest(tmp_path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", good.name]  # no temp dir left behind
    ckpt.load(good)


def test_keep_prunes_old(tmp_path):
    for step in (1, 2, 3):
        ckpt.save(tmp_path, _state(step), keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000002", "step-000003"]


def test_kill_9_during_saves_leaves_a_loadable_latest(tmp_path):
    """A writer process saving in a loop is killed at an arbitrary moment; `latest` still loads and verifies."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.getcwd()!r})
        from memscale.checkpoint import simple as ckpt
        from tests.test_checkpoint import _state
        step = 0
        while True:
            step += 1
            ckpt.save({str(tmp_path)!r}, _state(step), keep=3)
            print(step, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # wait until a few saves completed, then kill in the middle of the next ones
            assert proc.stdout.readline(), "writer died"
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    path = ckpt.latest(tmp_path)
    assert path is not None
    ts = ckpt.load(path)
    assert ts.step >= 3
    ckpt.save(tmp_path, _state(ts.step + 1))  # the next save sweeps temp dirs of the killed writer
    assert not list(tmp_path.glob(".step-*"))
