"""Nothing lost: divergence, two writers, preemption, a changed config on resume, late errors, damaged checkpoints.

Each test drives `memscale train` / `memscale eval` as a user would, in real processes on real files. Where a
fault has to be forced (a non-finite loss, a failing validation), a small driver process patches that one function
and then runs the ordinary CLI entry point.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from memscale.checkpoint import simple as ckpt
from memscale.config import to_dict
from memscale.data.corpus import read_jsonl
from memscale.train.optim import lr_at
from memscale.train.trainer import EXIT_DIVERGED, EXIT_PREEMPTED
from tests.test_checkpoint import _state
from tests.test_train import _cfg, _events

REPO = Path(__file__).resolve().parents[1]


def _config_file(tmp_path, data_dir, out, *extra, name="c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(to_dict(_cfg(data_dir, out, "train.threads=1", *extra))))
    return path


def _run(*args, driver: str | None = None, **kw) -> subprocess.CompletedProcess:
    """`memscale ARGS` in a fresh process; `driver` is Python run first in that process (a fault to inject)."""
    code = f"{driver or ''}\nimport sys\nfrom memscale.cli import main\nsys.exit(main({list(args)!r}))"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300, **kw
    )


CLI = "import sys\nfrom memscale.cli import main\nsys.exit(main(sys.argv[1:]))"


def _popen(*args, **kw) -> subprocess.Popen:
    """`memscale ARGS` in a fresh process, its stdout readable line by line."""
    return subprocess.Popen([sys.executable, "-c", CLI, *args], text=True, cwd=REPO, **kw)


def _stop_at(args, line_prefix: str, *, timeout: float = 120, **kw) -> tuple[int, str]:
    """Run `memscale ARGS`, send SIGTERM when a stdout line starts with `line_prefix`; (exit code, the rest of
    stdout)."""
    proc = _popen(*args, stdout=subprocess.PIPE, **kw)
    try:
        for line in proc.stdout:
            if line.startswith(line_prefix):
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.stdout.read()
        return proc.wait(timeout=timeout), rest
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(path).model


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


# -- finite or stop -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override", ["train.lr=inf", "train.grad_clip=nan", "train.weight_decay=nan", "train.beta2=nan"]
)
def test_non_finite_optimizer_values_are_refused_at_load(data_dir, tmp_path, override):
    out = tmp_path / "run"
    r = _run("train", str(_config_file(tmp_path, data_dir, out)), "--set", override)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and f"{override.split('=')[0]}=" in lines[0] and "must be a finite number" in lines[0]
    )
    assert not out.exists()


NAN_FROM_STEP_5 = """
import math
import memscale.train.trainer as trainer
real = trainer.run_window
calls = []
def run_window(model, batches, state, **kw):  # from the 5th window on, the loss and every gradient are NaN
    result = real(model, batches, state, **kw)
    calls.append(1)
    if len(calls) >= 5:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.fill_(math.nan)
        result.loss_sum = math.nan
    return result
trainer.run_window = run_window
"""


def test_divergence_skips_steps_stops_and_keeps_good_checkpoints(data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _config_file(
        tmp_path,
        data_dir,
        out,
        "train.max_steps=20",
        "train.save_every=2",
        "train.keep_checkpoints=2",
        "train.max_bad_steps=3",
        "train.log_every=1",
        "train.eval_every=0",
    )
    r = _run("train", str(cfg), driver=NAN_FROM_STEP_5)
    assert r.returncode == EXIT_DIVERGED, r.stderr
    assert r.stdout.count("optimizer step skipped") == 3
    assert "step 7: loss nan, grad norm nan: not finite, optimizer step skipped (3 in a row" in r.stdout
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "training diverged: 3 optimizer steps in a row" in err[0]
    assert "step-000004" in err[0] and "--resume-from 4" in err[0]
    # Steps 5-7 were skipped: no checkpoint of step 6 was written, the good ones were not pruned.
    root = out / "checkpoints"
    assert [p.name for p in ckpt.checkpoints(root)] == ["step-000002", "step-000004"]
    assert ckpt.latest(root).name == "step-000004"
    ts = ckpt.load(root / "step-000004")
    ckpt.check_finite(ts)
    skipped = _events(out).Scalars("train/skipped_steps")
    assert max(e.value for e in skipped) == 3
    # The skipped steps left weights and optimizer as they were: resuming from step 4 without the fault
    # trains on.
    r = _run("train", str(cfg), "--resume-from", "4", "--set", "train.max_steps=6")
    assert r.returncode == 0, r.stderr
    assert "done: 6 steps" in r.stdout


def test_non_finite_state_is_never_written(tmp_path):
    good = ckpt.save(tmp_path, _state(1))
    bad = _state(2)
    next(iter(bad.model.values())).view(-1)[0] = float("nan")
    with pytest.raises(ckpt.NonFiniteError, match=r"step 2: model\.\S+ holds NaN or inf"):
        ckpt.save(tmp_path, bad, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", good.name]
    assert ckpt.latest(tmp_path) == good


# -- one writer per run directory -----------------------------------------------------------------------------


def test_two_runs_on_one_out_dir_one_runs_the_other_refuses(data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _config_file(
        tmp_path, data_dir, out, "train.max_steps=100000", "train.eval_every=0", "train.log_every=1"
    )
    procs = [_popen("train", str(cfg), stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    try:
        deadline = time.time() + 120
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.2)
        done = [p for p in procs if p.poll() is not None]
        assert len(done) == 1, "neither run refused"
        loser, winner = done[0], next(p for p in procs if p is not done[0])
        err = loser.stderr.read().strip().splitlines()
        assert loser.returncode == 2 and len(err) == 1, err
        assert f"is in use by another memscale run (pid {winner.pid} on " in err[0]
        # The running one is not disturbed: it stops cleanly on SIGTERM with its own checkpoint.
        while not (out / "tb").exists():
            time.sleep(0.1)
        winner.send_signal(signal.SIGTERM)
        assert winner.wait(timeout=120) == EXIT_PREEMPTED
        path = ckpt.latest(out / "checkpoints")
        assert path is not None and ckpt.load(path).config["train"]["out_dir"] == str(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdout.close()
            p.stderr.close()
    # The lock went with the process: the directory can be resumed at once.
    r = _run("train", str(cfg), "--resume", "--set", f"train.max_steps={ckpt.step_of(path) + 1}")
    assert r.returncode == 0, r.stderr


# -- preemption --------------------------------------------------------------------------------------------------


def test_sigterm_checkpoints_and_resume_is_bitwise_equal(data_dir, tmp_path):
    """SIGTERM mid-run -> checkpoint + exit 75 -> --resume ends with the same weights as a run never stopped.

    Bitwise: both runs execute the same ops in the same order on one thread, with the RNG and loader position
    restored; validation runs under its own RNG state, so it does not matter that the stopped run skipped one.
    """
    extra = ("train.max_steps=12", "train.log_every=1", "train.eval_every=5", "model.dropout=0.1")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    r = _run("train", str(_config_file(tmp_path, data_dir, straight, *extra, name="a.yaml")))
    assert r.returncode == 0, r.stderr
    cfg = _config_file(tmp_path, data_dir, stopped, *extra, name="b.yaml")
    rc, rest = _stop_at(["train", str(cfg)], "step      3/12")
    assert rc == EXIT_PREEMPTED
    assert "SIGTERM received: stopped after step" in rest
    step = ckpt.step_of(ckpt.latest(stopped / "checkpoints"))
    assert 3 <= step < 12
    r = _run("train", str(cfg), "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resume: {stopped / 'checkpoints' / ckpt.step_dir_name(step)} at step {step}" in r.stdout
    _assert_same_weights(straight / "checkpoints" / "step-000012", stopped / "checkpoints" / "step-000012")


def test_resume_without_any_checkpoint_starts_at_step_0(data_dir, tmp_path):
    """A job script passes --resume on every start: the first start trains from step 0 and says so; a directory
    whose only trace is a `latest` pointer is damaged, not new, and is refused."""
    out = tmp_path / "run"
    cfg = _config_file(tmp_path, data_dir, out, "train.max_steps=2", "train.eval_every=0")
    r = _run("train", str(cfg), "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resume: no checkpoint under {out / 'checkpoints'} yet: starting at step 0" in r.stdout
    assert "done: 2 steps" in r.stdout and ckpt.latest(out / "checkpoints").name == "step-000002"
    damaged = tmp_path / "damaged"
    (damaged / "checkpoints").mkdir(parents=True)
    (damaged / "checkpoints" / "latest").write_text("step-000004\n")
    r = _run("train", str(cfg), "--resume", "--set", f"train.out_dir={damaged}")
    assert (
        r.returncode == 2
        and "no checkpoint under" in r.stderr
        and "step-000004, which does not exist" in r.stdout
    )


# -- resume says what changed ---------------------------------------------------------------------------------


def test_changed_lr_on_resume_follows_the_new_schedule(data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _config_file(
        tmp_path, data_dir, out, "train.log_every=1", "train.eval_every=0", "train.max_steps=4"
    )
    assert _run("train", str(cfg)).returncode == 0
    r = _run(
        "train",
        str(cfg),
        "--resume",
        "--set",
        "train.max_steps=8",
        "--set",
        "train.lr=0.0005",
        "--set",
        "train.weight_decay=0.0",
    )
    assert r.returncode == 0, r.stderr
    assert (
        "config changed since step-000004: train.lr 0.001 -> 0.0005; train.max_steps 4 -> 8; "
        "train.weight_decay 0.1 -> 0.0" in r.stdout
    )
    # The rule: lr at step s is the current config's schedule at s (warmup 2, cosine from 5e-4 over 8 steps).
    new = _cfg(data_dir, out, "train.max_steps=8", "train.lr=0.0005").train
    logged = {e.step: e.value for e in _events(out).Scalars("train/lr")}
    for step in range(5, 9):
        assert logged[step] == pytest.approx(lr_at(step - 1, new), rel=1e-6), step
    old = _cfg(data_dir, out, "train.max_steps=4").train
    for step in range(1, 5):
        assert logged[step] == pytest.approx(lr_at(step - 1, old), rel=1e-6), step
    groups = ckpt.load(out / "checkpoints" / "step-000008").optimizer["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0] and groups[0]["lr"] == pytest.approx(
        lr_at(7, new)
    )


def test_changed_architecture_on_resume_is_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _config_file(tmp_path, data_dir, out, "train.eval_every=0", "train.max_steps=2")
    assert _run("train", str(cfg)).returncode == 0
    r = _run("train", str(cfg), "--resume", "--set", "model.d_model=64")
    assert r.returncode == 2 and "the model config differs" in r.stderr


# -- fail early, save before risk ------------------------------------------------------------------------------


def test_corrupt_validation_shard_stops_before_step_1(data_dir, tmp_path):
    import shutil

    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    shard = sorted((broken / "val").glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different checksum
    shard.write_bytes(bytes(data))
    out = tmp_path / "run"
    r = _run("train", str(_config_file(tmp_path, broken, out)))
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and shard.name in err[0] and "corrupt" in err[0]
    assert not out.exists()


FAILING_VALIDATION = """
import memscale.train.trainer as trainer
def evaluate_lm(*a, **k):
    raise RuntimeError("validation exploded")
trainer.evaluate_lm = evaluate_lm
"""


def test_checkpoint_before_final_validation_and_error_log(data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _config_file(tmp_path, data_dir, out, "train.max_steps=3", "train.eval_every=100")
    r = _run("train", str(cfg), driver=FAILING_VALIDATION)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr
    assert "internal error: RuntimeError: validation exploded" in err[0] and str(out / "error.log") in err[0]
    log = (out / "error.log").read_text()
    assert "Traceback" in log and "validation exploded" in log
    # The final checkpoint was written before the validation that failed, and the run can be resumed.
    assert ckpt.latest(out / "checkpoints").name == "step-000003"
    r = _run("train", str(cfg), "--resume")
    assert r.returncode == 0 and "nothing to do: step 3 already reaches train.max_steps=3" in r.stdout


# -- recovery ------------------------------------------------------------------------------------------------------


def test_corrupt_latest_falls_back_to_the_previous_checkpoint(data_dir, tmp_path):
    extra = ("train.max_steps=9", "train.save_every=3", "train.keep_checkpoints=3", "train.eval_every=0")
    straight = tmp_path / "straight"
    assert (
        _run("train", str(_config_file(tmp_path, data_dir, straight, *extra, name="a.yaml"))).returncode == 0
    )
    want = straight / "checkpoints" / "step-000009"
    out = tmp_path / "run"
    cfg = _config_file(tmp_path, data_dir, out, *extra, name="b.yaml")
    assert _run("train", str(cfg)).returncode == 0
    target = out / "checkpoints" / "step-000009" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF
    target.write_bytes(bytes(data))
    # --resume passes over the damaged step 9, continues from step 6 and writes step 9 again, over the bad one.
    r = _run("train", str(cfg), "--resume")
    assert r.returncode == 0, r.stderr
    assert "resume: skipping step-000009: checkpoint file" in r.stdout and "model.safetensors" in r.stdout
    assert "step-000006 at step 6" in r.stdout
    _assert_same_weights(want, out / "checkpoints" / "step-000009")
    # Garbage in `latest`: said, and the newest checkpoint that verifies is used.
    (out / "checkpoints" / "latest").write_text("../../etc\n")
    r = _run("train", str(cfg), "--resume")
    assert r.returncode == 0, r.stderr
    assert (
        "latest holds '../../etc', not a checkpoint name" in r.stdout and "nothing to do: step 9" in r.stdout
    )
    # --resume-from picks one: from step 3, trained again to 9, equal to the straight run bitwise.
    r = _run("train", str(cfg), "--resume-from", "3")
    assert r.returncode == 0, r.stderr
    _assert_same_weights(want, out / "checkpoints" / "step-000009")
    r = _run("train", str(cfg), "--resume-from", "4")
    assert r.returncode == 2 and "steps available under" in r.stderr and "3, 6, 9" in r.stderr


def test_kill_9_during_resave_of_latest_step(tmp_path):
    """Re-saving the step `latest` names, killed with SIGKILL right before each file-system change the save makes
    (every rename, exchange and removal, in turn): after each kill, `latest` names a checkpoint that loads."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from memscale.checkpoint import simple as ckpt
        from tests.test_checkpoint import _state
        root, kill_at = sys.argv[1], int(sys.argv[2])
        ckpt.save(root, _state(1), keep=3)
        ckpt.save(root, _state(2), keep=3)
        state = _state(2)
        calls = 0
        def armed(fn):
            def wrapper(*a, **k):
                global calls
                calls += 1
                if calls == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return fn(*a, **k)
            return wrapper
        ckpt.os.replace = armed(os.replace)
        ckpt.shutil.rmtree = armed(ckpt.shutil.rmtree)
        ckpt._exchange = armed(ckpt._exchange)
        ckpt.save(root, state, keep=3)
        print("finished after", calls, "changes")
    """)
    for kill_at in range(1, 20):
        root = tmp_path / f"kill-{kill_at}"
        r = subprocess.run(
            [sys.executable, "-c", script, str(root), str(kill_at)], capture_output=True, text=True
        )
        assert ckpt.latest(root).name == "step-000002", kill_at
        path, ts = ckpt.load_for_resume(root, say=pytest.fail)  # nothing skipped
        assert path.name == "step-000002" and ts.step == 2
        if r.returncode == 0:
            assert "finished after" in r.stdout and kill_at > 3
            break
        assert r.returncode == -signal.SIGKILL, r.stderr
    else:
        pytest.fail("the re-save never finished")


def test_pruning_orders_by_step_number_past_one_million(tmp_path):
    state = _state(0)
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        state.step = step
        ckpt.save(tmp_path, state, keep=2)
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["step-1000000", "step-1000001"]
    assert ckpt.latest(tmp_path).name == "step-1000001"


def test_names_read_from_disk_are_confined_to_the_checkpoint_folder(tmp_path):
    (tmp_path / "latest").write_text("/etc\n")
    with pytest.raises(ValueError, match=r"latest holds '/etc', not a checkpoint name"):
        ckpt.latest(tmp_path)
    path = ckpt.save(tmp_path, _state(1))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["../outside"] = {"sha256": "0", "bytes": 0}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest.json lists '../outside', which is not a file inside"):
        ckpt.load(path)


# -- every error names its file --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["manifest.json", "trainer.json"])
def test_garbage_json_in_a_checkpoint_is_named(tmp_path, name):
    path = ckpt.save(tmp_path, _state(1))
    (path / name).write_bytes(b"\xff{not json")
    if name == "trainer.json":  # keep the manifest consistent, so that the parse itself is what fails
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["files"][name] = {"sha256": ckpt._sha256(path / name), "bytes": (path / name).stat().st_size}
        (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"{name} is not valid JSON"):
        ckpt.load(path)


def test_bad_jsonl_lines_name_file_and_line(tmp_path):
    plain = tmp_path / "docs.jsonl"
    good = json.dumps({"id": "a", "source": "s", "text": "t"}).encode()
    plain.write_bytes(good + b"\n" + good + b"\n" + b'{"id": "c", "text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl line 3 is not UTF-8 \(byte 0xe9 at column 25\)"):
        list(read_jsonl(plain))
    plain.write_bytes(good + b"\n" + b'{"id": "b", "text": "no source"}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl line 2: expected .* got keys \['id', 'text'\]"):
        list(read_jsonl(plain))
    packed = tmp_path / "docs.jsonl.gz"
    packed.write_bytes(gzip.compress(good + b"\n" * 2000)[:40])
    with pytest.raises(ValueError, match=r"docs.jsonl.gz is truncated or not gzip"):
        list(read_jsonl(packed))


def test_eval_of_checkpoint_whose_weights_do_not_fit_its_config(data_dir, tmp_path):
    ts = _state(1)  # weights of a d_model=32 model ...
    cfg = _cfg(data_dir, tmp_path / "run", "model.d_model=64", "model.vocab_size=50")
    ts.config = to_dict(cfg)  # ... saved with a config that says 64
    path = ckpt.save(tmp_path / "ckpts", ts)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(to_dict(cfg)))
    r = _run("eval", str(cfg_file), "--checkpoint", str(path))
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "model.safetensors does not fit the model described by" in err[0]
    assert str(path / "trainer.json") in err[0]


def test_unexpected_error_outside_a_run_goes_to_a_temp_log(tmp_path):
    driver = "import memscale.data.prepare as p\ndef boom(*a, **k): raise KeyError('x')\np.prepare = boom"
    r = _run(
        "data",
        "prepare",
        "--out",
        str(tmp_path / "d"),
        driver=driver,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "internal error: KeyError: 'x' (full traceback in" in err[0]
    logs = list(tmp_path.glob("memscale-error-*.log"))
    assert len(logs) == 1 and "KeyError" in logs[0].read_text()
