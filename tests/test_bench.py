"""The benchmark commands run end to end at tiny shapes and write their JSON (numbers are not asserted: they are
measurements, compared only within one run)."""

import json
import subprocess
import sys

TINY = "--set model.d_model=32 --set model.num_layers=1 --set model.num_heads=2".split()


def _run(*args):
    r = subprocess.run([sys.executable, "-m", "memscale.cli", "bench", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_bench_throughput(tmp_path):
    args = "throughput --kinds none,rmt,xl --steps 1 --rounds 1 --hf off --set model.vocab_size=100"
    out = _run(*args.split(), *TINY, "--set", "data.segment_len=16", "--out", str(tmp_path))
    assert "MFU" in out
    (path,) = tmp_path.glob("throughput-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["kind"] for r in rows] == ["none", "rmt", "xl"]
    assert all(r["fwd_bwd_tokens_per_s"] > 0 and 0 < r["mfu_fwd_bwd"] for r in rows)


def test_bench_tasks(tmp_path):
    args = "tasks --kinds none,rmt --tasks copy --segments 4 --max-steps 4 --eval-every 2 --set data.num_streams=2"
    _run(*args.split(), *TINY, "--out", str(tmp_path))
    (path,) = tmp_path.glob("tasks-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert {(r["kind"], r["segments"]) for r in rows} == {("none", 4), ("rmt", 4)}
    assert all(r["steps"] == 4 and 0 <= r["accuracy"] <= 1 for r in rows)


def test_bench_long(tmp_path):
    args = "long --tokens 512,2048 --train-kinds rmt --eval-kinds none --set data.segment_len=128"
    _run(*args.split(), *TINY, "--set", "model.vocab_size=256", "--out", str(tmp_path))
    (path,) = tmp_path.glob("long-*.json")
    rows = json.loads(path.read_text())["rows"]
    train = [r for r in rows if r["mode"] == "train"]
    assert [r["tokens"] for r in train] == [512, 2048] and all(r["memory_grad"] == "replay" for r in train)
    assert all(r["peak_pss_mb"] > 0 and r["tokens_per_s"] > 0 for r in rows)


def test_bench_prepare(tmp_path):
    out = _run("prepare", "--size-mb", "2", "--small-mb", "1", "--workers", "1,2", "--vocab-size", "1000",
               "--out", str(tmp_path))  # fmt: skip
    assert "sentencepiece MB/s" in out
    (path,) = tmp_path.glob("prepare-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["workers"], "ratio" in r) for r in rows] == [(1, True), (2, True), (1, False), (2, False)]
    assert rows[0]["corpus_mb"] > rows[2]["corpus_mb"] > 0.9
    assert all(r["tokens"] > 0 and r["prepare_mb_per_s"] > 0 and r["peak_pss_mb"] > 0 for r in rows)
    # prepare and sentencepiece encoded the same text into the same number of tokens (checked by the bench).
    assert rows[0]["tokens"] == rows[1]["tokens"]
