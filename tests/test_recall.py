"""The recall probe: documents of real text with a fact planted early and asked at the end (memscale/data/recall.py),
and its evaluation by distance (memscale/eval/recall.py), on the bundled corpus prepared for the session."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from memscale.config import ConfigError, config_from_dict
from memscale.data.batch import IGNORE_INDEX
from memscale.data.recall import VALUE_LEN, RecallLoader, RecallText
from memscale.eval.recall import evaluate_recall, parse_distances
from memscale.models import MemoryTransformer
from tests.conftest import VOCAB

T = 64


def _cli(*args):
    """Run `memscale ARGS` in a fresh process; it must succeed."""
    r = subprocess.run([sys.executable, "-m", "memscale.cli", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def _sets(data_dir, *extra):
    """The probe's tiny shape as KEY=VALUE overrides (later ones win)."""
    return [
        "model.d_model=32",
        "model.num_layers=2",
        "model.num_heads=2",
        f"model.vocab_size={VOCAB}",
        "model.memory.kind=rmt",
        "model.memory.num_tokens=4",
        f"data.dir={data_dir}",
        "data.source=recall",
        f"data.segment_len={T}",
        "data.num_streams=3",
        "data.task_segments=3",
        *extra,
    ]


def _cfg(data_dir, *extra):
    return config_from_dict({}, _sets(data_dir, *extra))


@pytest.fixture(scope="module")
def texts(data_dir):
    return {split: RecallText(str(data_dir), split) for split in ("train", "val")}


def _document(loader):
    """The first group of a loader as [rows, task_segments * T] tokens and targets."""
    batches = [next(iter(loader)) for _ in range(loader.task_segments)]
    return torch.cat([b.tokens_BT for b in batches], 1), torch.cat([b.targets_BT for b in batches], 1)


def test_fact_early_question_last_and_only_values_scored(data_dir, texts):
    loader = RecallLoader(_cfg(data_dir), "train", infinite=True, text=texts["train"])
    tokens, targets = _document(loader)
    ex = loader.examples
    for r in range(3):
        d = ex.draw(r)
        fact = texts["train"].fact_tokens(d["key"], d["value"])
        question = texts["train"].question_tokens(d["key"], d["value"])
        row = tokens[r].numpy()
        assert (row[d["fact_at"] : d["fact_at"] + len(fact)] == fact).all()
        assert d["fact_at"] + len(fact) <= T  # planted inside the first segment
        assert (row[-len(question) :] == question).all()
        scored = np.flatnonzero(targets[r].numpy() != IGNORE_INDEX)
        # The tokens before the two value tokens predict them, and nothing else is scored.
        assert list(scored) == [3 * T - VALUE_LEN - 1 + i for i in range(VALUE_LEN)]
        assert (targets[r, scored].numpy() == d["value"]).all()
        assert set(d["value"]) <= set(texts["train"].values) and d["key"] in set(texts["train"].keys)
    # Everything else is the split's text, read from the drawn offset (wrapping around).
    d = ex.draw(0)
    text = texts["train"].text
    filler = text[(d["offset"] + np.arange(3 * T)) % len(text)]
    row = tokens[0].numpy()
    outside = np.ones(3 * T, dtype=bool)
    outside[d["fact_at"] : d["fact_at"] + texts["train"].fact_len] = False
    outside[-texts["train"].question_len :] = False
    assert (row[outside] == filler[outside]).all()


def test_same_example_at_every_length_and_splits_differ(data_dir, texts):
    short = RecallLoader(_cfg(data_dir), "val", infinite=False, text=texts["val"])
    long = RecallLoader(_cfg(data_dir, "data.task_segments=5"), "val", infinite=False, text=texts["val"])
    a, _ = _document(short)
    b, _ = _document(long)
    qlen = texts["val"].question_len
    assert torch.equal(a[:, : 3 * T - qlen], b[:, : 3 * T - qlen])  # the longer document reads further
    train = RecallLoader(_cfg(data_dir), "train", infinite=False, text=texts["train"])
    assert [train.examples.draw(i)["offset"] for i in range(4)] != [
        short.examples.draw(i)["offset"] for i in range(4)
    ]


def test_loader_resumes_exactly(data_dir, texts):
    cfg = _cfg(data_dir)
    a = RecallLoader(cfg, "train", infinite=True, text=texts["train"])
    it = iter(a)
    for _ in range(4):
        next(it)
    b = RecallLoader(cfg, "train", infinite=True, text=texts["train"])
    b.load_state_dict(a.state_dict())
    it_b = iter(b)
    for _ in range(3):  # crosses into the next group (3 segments per example)
        x, y = next(it), next(it_b)
        assert torch.equal(x.tokens_BT, y.tokens_BT) and torch.equal(x.targets_BT, y.targets_BT)
        assert torch.equal(x.reset_B, y.reset_B)


@pytest.mark.parametrize("kind", ["rmt", "xl"])
def test_branching_evaluation_equals_documents_of_each_length(data_dir, texts, kind):
    """The pass that asks at several distances scores exactly what a document of that length scores."""
    cfg = _cfg(data_dir, f"model.memory.kind={kind}")
    torch.manual_seed(0)
    model = MemoryTransformer(cfg.model, segment_len=T).eval()
    val = RecallLoader(cfg, "val", infinite=False, text=texts["val"])
    got = evaluate_recall(
        model, val.examples, distances=[T, 2 * T, 4 * T], num_examples=3, num_streams=3, keep_logits=True
    )
    assert [r.distance for r in got] == [T, 2 * T, 4 * T] and all(r.num_examples == 3 for r in got)
    for r in got:
        n = r.distance // T
        loader = RecallLoader(
            _cfg(data_dir, f"model.memory.kind={kind}", f"data.task_segments={n}"),
            "val",
            infinite=False,
            text=texts["val"],
        )
        state = model.init_state(3)
        with torch.no_grad():
            for batch in [next(iter(loader)) for _ in range(n)]:
                out = model.step(batch.tokens_BT, state, reset_B=batch.reset_B)
                state = out.state
        rows = slice(T - VALUE_LEN - 1, T - 1)
        torch.testing.assert_close(r.value_logits, out.logits_BTV[:, rows], rtol=1e-5, atol=1e-5)
        pred = out.logits_BTV[:, rows].argmax(-1)
        assert r.exact_match == (pred == batch.targets_BT[:, rows]).all(1).float().mean().item()


def test_config_errors_are_one_line_and_name_the_fix(data_dir, texts):
    with pytest.raises(
        ConfigError, match="data.segment_len=16 is too short for the recall probe.*segment_len >="
    ):
        RecallLoader(_cfg(data_dir, "data.segment_len=16"), "train", infinite=True, text=texts["train"])
    with pytest.raises(ConfigError, match="model.vocab_size=100 differs from the tokenizer.*vocab_size=512"):
        RecallLoader(_cfg(data_dir, "model.vocab_size=100"), "train", infinite=True, text=texts["train"])
    with pytest.raises(ConfigError, match="--distances 4k: give comma-separated token counts"):
        parse_distances("4k", T)
    with pytest.raises(ConfigError, match=r"\[100\] must be positive multiples of data.segment_len=64"):
        parse_distances("128,100", T)


def test_train_and_eval_commands_on_the_probe(data_dir, tmp_path):
    """`memscale train` and `memscale eval` take data.source=recall end to end on real files."""
    sets = _sets(
        data_dir,
        "model.num_layers=1",
        "data.num_streams=2",
        "data.task_segments=2",
        "train.bptt_segments=2",
        "train.memory_grad=replay",
        "train.max_steps=3",
        "train.eval_every=3",
        "train.eval_segments=2",
        f"train.out_dir={tmp_path / 'run'}",
    )
    config = tmp_path / "probe.yaml"
    config.write_text("train:\n  lr: 0.001\n")
    args = [str(config), *(a for s in sets for a in ("--set", s))]
    _cli("train", *args)
    r = _cli(
        "eval", *args, "--checkpoint", str(tmp_path / "run"), "--distances", f"{T},{3 * T}", "--segments", "4"
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("recall at")]
    assert (
        len(lines) == 2 and "64 tokens" in lines[0] and "192 tokens" in lines[1] and "4 documents" in lines[0]
    )


def test_bench_recall_runs_end_to_end(data_dir, tmp_path):
    args = (
        f"bench recall --kinds none,rmt --data-dir {data_dir} --segments 2 --max-steps 2 --eval-every 1 "
        f"--distances {T},{2 * T} --examples 2 --eval-streams 2 --set data.segment_len={T} "
        "--set model.d_model=32 --set model.num_layers=1 --set model.num_heads=2 --set data.num_streams=2 "
        f"--memory-noise 0.1 --carry-reset 0.5 --cooldown 0.5 --seed 3 --save --out {tmp_path}"
    )
    r = _cli(*args.split())
    (path,) = tmp_path.glob("recall-*.json")
    result = json.loads(path.read_text())
    training = result["training"]
    assert (training["carry_reset"], training["cooldown"], training["memory_noise"]) == (0.5, 0.5, 0.1)
    assert (
        training["max_steps"] == 2 and training["seed"] == 3 and "model.d_model=32" in training["overrides"]
    )
    assert [row["kind"] for row in result["rows"]] == ["none", "rmt"]
    for row in result["rows"]:
        assert [a["distance"] for a in row["recall"]] == [T, 2 * T]
        assert all(0 <= a["exact_match"] <= 1 and a["num_examples"] == 2 for a in row["recall"])
    # The kept model answers `memscale eval` with the same numbers.
    rmt = tmp_path / "recall-rmt"
    r = _cli(
        "eval",
        str(rmt / "config.yaml"),
        "--checkpoint",
        str(rmt),
        "--distances",
        f"{T},{2 * T}",
        "--segments",
        "2",
        "--set",
        "data.num_streams=2",
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("recall at")]
    want = result["rows"][1]["recall"]
    assert [float(ln.split("exact match ")[1].split(" ")[0]) for ln in lines] == [
        a["exact_match"] for a in want
    ]
    # ... and so does `bench recall --load`, which evaluates it without training.
    again = tmp_path / "again"
    args = args.replace(f"--out {tmp_path}", f"--out {again}").replace("--kinds none,rmt", "--kinds rmt")
    r = _cli(*args.split(), "--load", str(tmp_path))
    (path,) = again.glob("recall-*.json")
    row = json.loads(path.read_text())["rows"][0]
    assert row["recall"] == want and row["steps"] == 2


def test_training_window_regularisers():
    """Without regularisers the probe's window is run_window; the stationarity penalty only acts on memory
    changes across text-only segments (none in a 2-segment document) and never enters the reported loss."""
    from memscale.bench.recall import _train_window
    from memscale.train.bptt import run_window
    from tests.helpers import random_batches, tiny_model

    def grads(window, **kw):
        model = tiny_model("rmt")
        out = _train_window(model, window, "truncated", kw.get("noise", 0.0), kw.get("stationarity", 0.0))
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    four, two = random_batches(4), random_batches(2)
    plain, g_plain = grads(four)
    model = tiny_model("rmt")
    ref = run_window(model, four, model.init_state(2), memory_grad="truncated")
    assert plain.loss_sum == ref.loss_sum
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_plain[n], p.grad, rtol=0, atol=0)
    held, g_held = grads(four, stationarity=1.0)
    assert held.loss_sum == pytest.approx(plain.loss_sum, rel=1e-6)
    assert any(not torch.allclose(g_held[n], g_plain[n]) for n in g_plain)
    _, g_two = grads(two)
    _, g_two_held = grads(two, stationarity=1.0)
    for n in g_two:
        torch.testing.assert_close(g_two_held[n], g_two[n], rtol=1e-6, atol=1e-7)


def _train_two_stages(data_dir, texts, **kw):
    """A tiny rmt through the probe's training: 6 steps, stages of 1 and 2 segments (3 steps each)."""
    from memscale.bench import recall as bench

    return bench.train_recall(
        "rmt",
        segments=2,
        max_steps=6,
        advance_at=2.0,
        eval_every=100,
        data_dir=str(data_dir),
        overrides=["model.d_model=32", "model.num_layers=1", "model.num_heads=2", f"data.segment_len={T}"],
        texts=texts,
        mixed_lengths=False,
        log=lambda *a: None,
        **kw,
    )


@pytest.mark.parametrize("carry_reset", [0.0, 1.0])
def test_training_carries_memory_between_documents(data_dir, texts, monkeypatch, carry_reset):
    """--carry-reset P: from stage 2 on, a training document starts from the memory the previous one left, its
    rows reset with probability P (0: never, 1: always); stage 1 always starts from the initial memory."""
    from memscale.bench import recall as bench

    seen = []
    real = bench._train_window

    def spy(model, window, *args):
        out = real(model, window, *args)
        seen.append((len(window), args[-1], window[0].reset_B.clone(), out.state))
        return out

    monkeypatch.setattr(bench, "_train_window", spy)
    _train_two_stages(data_dir, texts, carry_reset=carry_reset)
    assert [n for n, *_ in seen] == [1, 1, 1, 2, 2, 2]
    assert all(state is None for _, state, _, _ in seen[:3])
    for (_, _, _, before), (_, state, reset, _) in zip(seen[2:-1], seen[3:], strict=True):
        assert state is before  # the previous document's memory, as it left it
        assert bool(reset.all()) if carry_reset == 1.0 else not bool(reset.any())


@pytest.mark.parametrize("value", ["1.5", "-0.1", "x"])
def test_carry_reset_must_be_a_probability(value):
    r = subprocess.run(
        [sys.executable, "-m", "memscale.cli", "bench", "recall", "--carry-reset", value],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].endswith(f"{value} is not a probability: use a value in [0, 1]")


def test_cooldown_schedule():
    """--cooldown: the last `decay` steps of the last stage anneal linearly from lr to lr / decay; 0: constant."""
    from memscale.bench.recall import cooldown_lr

    assert [cooldown_lr(1.0, i, 10, 4) for i in range(10)] == [1.0] * 7 + [0.75, 0.5, 0.25]
    assert [cooldown_lr(1.0, i, 3, 0) for i in range(3)] == [1.0] * 3
    assert [cooldown_lr(2.0, i, 2, 2) for i in range(2)] == [2.0, 1.0]


def test_training_cools_down_in_the_last_stage_only(data_dir, texts, monkeypatch):
    """With --cooldown 0.5 over 6 steps of 2 stages, stage 1 runs at the configured rate and the last stage's
    3 steps (its whole budget) anneal; the record says how many steps annealed."""
    from memscale.bench import recall as bench

    rates = []
    real = bench._train_window

    def spy(model, window, *args):
        rates.append(spy.opt_lr())
        return real(model, window, *args)

    real_build = bench.build_optimizer

    def build(model, cfg):
        opt = real_build(model, cfg)
        spy.opt_lr = lambda: [g["lr"] for g in opt.param_groups]
        return opt

    monkeypatch.setattr(bench, "_train_window", spy)
    monkeypatch.setattr(bench, "build_optimizer", build)
    _, trained = _train_two_stages(data_dir, texts, cooldown=0.5)
    lr = 1e-3  # RECALL_SHAPE's train.lr
    assert [r[0] for r in rates] == pytest.approx([lr, lr, lr, lr, lr * 2 / 3, lr / 3])
    assert all(len(set(r)) == 1 for r in rates)
    assert trained["cooldown_steps"] == 3


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_cooldown_must_be_a_fraction(value):
    r = subprocess.run(
        [sys.executable, "-m", "memscale.cli", "bench", "recall", "--cooldown", value],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--cooldown" in r.stderr
