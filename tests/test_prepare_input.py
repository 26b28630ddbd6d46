"""`memscale data prepare --input`: your own JSONL / text / gzip files into shards, the same whatever the number of
workers, bad input reported with file and line, and nothing half-written after kill -9."""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from memscale.cli import main
from memscale.data.corpus import split_documents
from memscale.data.prepare import BUNDLED_CORPUS, InputOptions, prepare_inputs
from memscale.data.shards import load_split, read_meta, read_row
from memscale.data.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def _bundled() -> list[dict]:
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A folder of every input kind: JSONL with ids, gzip'ed JSONL with the text under another key and no
    ids, plain text files in a subfolder (one gzip'ed); returns it and {expected id: text}."""
    root = tmp_path_factory.mktemp("byo") / "in"
    (root / "books").mkdir(parents=True)
    docs = _bundled()
    expected = {}
    with open(root / "a.jsonl", "w", encoding="utf-8") as f:
        for d in docs[:15]:
            f.write(json.dumps({"id": d["id"], "body": d["text"]}) + "\n\n")  # blank lines are ignored
            expected[d["id"]] = d["text"]
    with gzip.open(root / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs[15:25]):
            f.write(json.dumps({"body": d["text"], "lang": "en"}) + "\n")
            expected[f"in/b.jsonl.gz:{i + 1}"] = d["text"]
    for i, d in enumerate(docs[25:]):
        name = f"book-{i:02d}.txt" + (".gz" if i == 0 else "")
        data = d["text"].encode()
        (root / "books" / name).write_bytes(gzip.compress(data) if i == 0 else data)
        expected[f"in/books/{name}"] = d["text"]
    return root, expected


@pytest.fixture(scope="module")
def tokenizer_file(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "data"
    prepare_inputs(out, [corpus[0]], vocab_size=600, options=InputOptions(text_key="body", workers=1))
    return out / "tokenizer.model"


def _stored_docs(data_dir: Path) -> dict[str, dict[str, list[int]]]:
    """{split: {document id: tokens without bos/eos}}, read back through the shard index."""
    docs: dict[str, dict[str, list[int]]] = {"train": {}, "val": {}}
    for split in docs:
        index = load_split(data_dir, split)
        for doc in range(index.num_docs):
            first = int(index.first_row[doc])
            rows = range(first, first + int((index.rows[:, 0] == doc).sum()))
            tokens = np.concatenate([read_row(index, r) for r in rows]).tolist()
            shard, offset = int(index.rows[first, 1]), int(index.rows[first, 2])
            with open(index.shard_paths[shard], "rb") as f:
                f.seek(offset + 512)  # the .json member's data follows its 512-byte tar header
                doc_id = json.loads(f.read(200).split(b"}")[0] + b"}")["id"]
            docs[split][doc_id] = tokens[1:-1]
    return docs


def test_jsonl_text_and_gzip_inputs_with_a_trained_then_reused_tokenizer(corpus, tokenizer_file, tmp_path):
    root, expected = corpus
    data = tokenizer_file.parent
    meta = read_meta(data)
    assert meta["source"] == "input" and meta["vocab_size"] == 600
    assert meta["input"]["files"] == 2 + len(expected) - 25 and meta["input"]["documents"] == len(expected)
    assert meta["splits"]["val"]["num_docs"] >= 4  # topped up as split_documents does
    tok = Tokenizer(tokenizer_file)
    by_split = _stored_docs(data)
    stored = {**by_split["train"], **by_split["val"]}
    assert stored.keys() == expected.keys() and len(stored) == len(by_split["train"]) + len(by_split["val"])
    # The split is the one split_documents makes of the same ids (by id hash, topped up to 4).
    _, val = split_documents([{"id": doc_id} for doc_id in expected], val_fraction=0.02)
    assert set(by_split["val"]) == {d["id"] for d in val}
    assert all(tok.decode(ids) == expected[doc_id] for doc_id, ids in stored.items())  # lossless, every kind
    # Reused: the same model file gives the same shards.
    again = tmp_path / "again"
    assert main(["data", "prepare", "--input", str(root), "--out", str(again), "--text-key", "body",
                 "--tokenizer", str(tokenizer_file), "--workers", "1"]) == 0  # fmt: skip
    assert read_meta(again)["splits"] == meta["splits"]
    assert read_meta(again)["tokenizer"]["sha256"] == meta["tokenizer"]["sha256"]


def test_reused_tokenizer_is_checked_against_the_config(corpus, tokenizer_file, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text((REPO / "configs" / "quickstart.yaml").read_text() + "\n")
    args = ["data", "prepare", "--input", str(corpus[0]), "--out", str(tmp_path / "o"), "--text-key", "body"]
    assert main([*args, "--tokenizer", str(tokenizer_file), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tokenizer_file) in err and str(config) in err
    assert "600 pieces" in err and "model.vocab_size=" in err
    assert main([*args, "--tokenizer", str(tmp_path / "none.model")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([*args, "--tokenizer", str(config)]) == 2
    assert "is not a sentencepiece model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_one_and_four_workers_write_identical_shards(corpus, tokenizer_file, tmp_path):
    metas = []
    for workers in (1, 4):
        out = tmp_path / f"w{workers}"
        opts = InputOptions(text_key="body", workers=workers)
        metas.append(prepare_inputs(out, [corpus[0]], tokenizer=tokenizer_file, options=opts))
    # Same shard and index checksums: the same tokens, documents, order and split.
    assert metas[0]["splits"] == metas[1]["splits"]
    assert len(metas[0]["splits"]["train"]["shards"]) >= 1 and metas[0]["splits"]["train"]["num_tokens"] > 0
    a, b = (load_split(tmp_path / f"w{w}", "train") for w in (1, 4))
    assert np.array_equal(a.rows, b.rows)


def _truncated_gzip() -> bytes:
    data = gzip.compress(b"".join(b'{"text": "%d"}\n' % i for i in range(5000)))
    return data[: len(data) // 2]


BAD_INPUTS = {
    # name: (file name, bytes, the line reported, what the message says)
    "not_utf8_jsonl": ("bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, "not UTF-8 (byte 0xe9"),
    "not_utf8_text": ("bad.txt", b"one\ntwo\nthr\xffee\n", 3, "not UTF-8 (byte 0xff at column 4)"),
    "not_json": ("bad.jsonl", b'{"text": "ok"}\n\n{"text": "no end"\n', 3, "not JSON"),
    "missing_text_key": (
        "bad.jsonl",
        b'{"text": "ok"}\n{"body": "x"}\n',
        2,
        "no string under --text-key 'text'",
    ),
    "text_not_a_string": ("bad.jsonl", b'{"text": null}\n', 1, "no string under --text-key 'text'"),
    "empty_file": ("bad.txt", b"", 1, "the file is empty"),
    "blank_text": ("bad.txt", b"  \n\n", 1, "the file is empty"),
    "empty_jsonl": ("bad.jsonl.gz", gzip.compress(b"\n\n"), 1, "the file is empty"),
    "corrupt_gzip": ("bad.jsonl.gz", _truncated_gzip(), 1, "gzip stream breaks"),
}
KIND = {"not_utf8_jsonl": "not_utf8", "not_utf8_text": "not_utf8", "text_not_a_string": "missing_text_key",
        "empty_jsonl": "empty_file", "blank_text": "empty_file"}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_reported_with_file_and_line(case, corpus, tokenizer_file, tmp_path, capsys):
    name, data, line, what = BAD_INPUTS[case]
    folder = tmp_path / "in"
    folder.mkdir()
    for i, text in enumerate(list(corpus[1].values())[:6]):  # good documents around the bad file
        (folder / f"good-{i}.txt").write_text(text)
    (folder / name).write_bytes(data)
    args = ["data", "prepare", "--input", str(folder), "--tokenizer", str(tokenizer_file), "--workers", "2"]
    assert main([*args, "--out", str(tmp_path / "stop")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"memscale: error: in/{name} line {line}: ") and what in err[-1], err[-1]
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "stop").exists()

    assert main([*args, "--out", str(tmp_path / "skip"), "--on-error", "skip"]) == 0
    err = capsys.readouterr().err
    skipped = read_meta(tmp_path / "skip")["input"]["skipped"]
    kind = KIND.get(case, case)
    assert skipped[kind]["count"] == 1 and skipped[kind]["first"][0].startswith(f"in/{name} line {line}: ")
    assert "skipped 1 " in err and f"in/{name} line {line}" in err
    assert re.search(r"MB 100\.0% \| [\d.]+ MB/s \| [\d.]+ M tokens/s \| ETA 0s", err)  # the progress line
    assert read_meta(tmp_path / "skip")["input"]["documents"] >= 6


def _big_corpus(path: Path, copies: int) -> None:
    """The bundled documents `copies` times over with distinct ids: a few seconds of work for one worker."""
    docs = _bundled()
    with open(path, "w", encoding="utf-8") as f:
        for c in range(copies):
            for d in docs:
                f.write(json.dumps({"id": f"{d['id']}#{c}", "text": d["text"]}) + "\n")


def _kill_during(args: list[str], delay: float) -> list[int]:
    """Start the CLI, and kill -9 it (not its workers) `delay` s after it starts tokenizing; the pids of its
    workers at that moment."""
    proc = subprocess.Popen([sys.executable, "-m", "memscale.cli", *args], cwd=REPO, stderr=subprocess.PIPE)
    for line in proc.stderr:
        if b"tokenizing with" in line:
            break
    time.sleep(delay)
    children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return children


def _wait_gone(pids: list[int], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_kill_9_leaves_no_data_dir_or_the_previous_one_and_a_rerun_succeeds(tokenizer_file, tmp_path):
    corpus = tmp_path / "big.jsonl"
    _big_corpus(corpus, copies=3)  # ~10 MB: ~1.5 s of tokenizing on two cores
    out = tmp_path / "data"
    args = ["data", "prepare", "--input", str(corpus), "--out", str(out), "--tokenizer", str(tokenizer_file),
            "--workers", "2"]  # fmt: skip
    rng = random.Random(1234)
    # A run from nothing, killed at a random moment: no data dir; the workers leave too.
    workers = _kill_during(args, rng.uniform(0.0, 0.8))
    assert not out.exists()
    assert _wait_gone(workers), "orphaned workers still running"
    assert main(args) == 0
    previous = read_meta(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl", "data"]  # the stale temp dir is gone
    # A run replacing it, killed: the complete previous data dir is still there, checksums and all.
    _kill_during([*args, "--overwrite"], rng.uniform(0.0, 0.8))
    assert read_meta(out) == previous and load_split(out, "train").num_docs > 0
    assert main([*args, "--overwrite"]) == 0
    assert read_meta(out)["splits"] == previous["splits"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl", "data"]


def test_a_data_dir_moved_aside_by_a_killed_run_is_put_back(tokenizer_file, corpus, tmp_path):
    """kill -9 between moving the old data dir aside and renaming the new one in: the next run restores it."""
    out = tmp_path / "data"
    opts = InputOptions(text_key="body", workers=1)
    meta = prepare_inputs(out, [corpus[0]], tokenizer=tokenizer_file, options=opts)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    out.rename(tmp_path / f".data.old-{int(dead.stdout)}")
    (tmp_path / f".data.partial-{int(dead.stdout)}").mkdir()
    with pytest.raises(ValueError, match="is not empty: pass --overwrite"):
        prepare_inputs(out, [corpus[0]], tokenizer=tokenizer_file, options=opts)
    assert read_meta(out) == meta and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_progress_rewrites_one_line_on_a_terminal(monkeypatch, capsys):
    from memscale.data import prepare as prepare_module

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    progress = prepare_module._ByteProgress(10_000_000, prepare_module._Progress())
    progress.last -= 1  # as if the last redraw was a second ago
    progress.update(2_500_000, 1000)
    err = capsys.readouterr().err
    assert err.startswith("\r2.5/10.0 MB  25.0% | ") and "MB/s" in err and "ETA" in err and "\n" not in err


def test_conflicting_flags_are_one_line_errors(corpus, tokenizer_file, tmp_path, capsys):
    out = ["data", "prepare", "--out", str(tmp_path / "o")]
    cases = [
        (["--input", str(corpus[0]), "--source", "bundled"], "--input and --source both given"),
        (["--source", "bundled", "--tokenizer", str(tokenizer_file)], "--tokenizer is for --input"),
        (
            ["--input", str(corpus[0]), "--tokenizer", str(tokenizer_file), "--vocab-size", "600"],
            "both given",
        ),
        (["--input", str(tmp_path / "nowhere")], "--input " + str(tmp_path / "nowhere") + " not found"),
    ]
    for flags, message in cases:
        assert main([*out, *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()
