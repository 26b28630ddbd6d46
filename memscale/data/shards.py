"""Token shards: webdataset tar files of tokenized documents, an index for random access, and meta.json.

A prepared data dir:

    meta.json               vocab size, special ids; per split: documents, tokens, shards (bytes, sha256)
    tokenizer.model
    train/shard-000000.tar  samples "<doc:08d>-<chunk:05d>": .json {"id", "chunk", "num_chunks", "start"}
                            and .npy (token ids, uint16, or int32 for vocabularies over 65536)
    train/index.npy         int64 rows (doc, shard, byte offset, tokens), one per sample, in document order
    val/...

A document is stored as [bos] + ids + [eos], whole in one sample, or in consecutive samples of `chunk_tokens`
when it is longer, so that a reader never has to hold a book-length document in memory. The shards are plain
webdataset: `webdataset.WebDataset(urls)` streams them sample by sample.

The index exists because the loader packs documents into streams that advance at different rates (stream 0
may spend a thousand steps in one long document while stream 1 goes through fifty short ones), so samples are
needed in an order that no sequential pass over the tars gives. The index keeps the byte offset of each
sample's first tar header, recorded while writing; `read_chunk` seeks there and lets webdataset's tar
iterator read that one sample. Seeking is the only part of tar handling done here rather than by webdataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from webdataset.tariterators import tar_file_iterator

from memscale.data.tokenizer import Tokenizer

FORMAT = "memscale-shards/1"
META_FILE = "meta.json"
INDEX_FILE = "index.npy"
DEFAULT_CHUNK_TOKENS = 1 << 16  # 128 KiB of uint16 a sample: most documents fit one
DEFAULT_SHARD_TOKENS = 1 << 21  # ~4 MiB shards: a few for the small corpora, many for large ones
_ROW = struct.Struct("<4q")  # an index row: doc, shard, byte offset, tokens


class ShardError(ValueError):
    """A shard or index that is missing, truncated or unlike meta.json; the message names file and fix."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def sample_key(doc: int, chunk: int) -> str:
    # webdataset cuts a member name at its first dot into key and extension, so keys are numbers; the
    # document's own id (with its slashes and dots) is in the .json member.
    return f"{doc:08d}-{chunk:05d}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def rebuild_hint(data_dir: Path, *, source: str | None = None) -> str:
    flag = f" --source {source}" if source else ""
    return f"rebuild it with `memscale data prepare --out {data_dir}{flag} --overwrite`"


# --------------------------------------------------------------------------------------------------------------
# Writing.


@dataclass
class SplitInfo:
    num_docs: int = 0
    num_tokens: int = 0
    num_chunks: int = 0
    num_empty_skipped: int = 0
    shards: list[dict] = field(default_factory=list)
    """{"path" (relative to the data dir), "bytes", "sha256"} per shard."""
    index: dict = field(default_factory=dict)
    """{"path", "sha256"} of the index file."""


def encode_documents(
    docs: Iterable[dict], tokenizer: Tokenizer, *, batch_size: int = 64
) -> Iterator[tuple[str, np.ndarray]]:
    """(id, token ids without bos/eos) per document, encoded in batches on sentencepiece's threads."""
    batch: list[dict] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == batch_size:
            yield from _encode_batch(batch, tokenizer)
            batch = []
    yield from _encode_batch(batch, tokenizer)


def _encode_batch(batch: list[dict], tokenizer: Tokenizer) -> Iterator[tuple[str, np.ndarray]]:
    for doc, ids in zip(batch, tokenizer.encode_batch(d["text"] for d in batch), strict=True):
        yield doc["id"], np.asarray(ids, dtype=np.int64)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()


class SplitWriter:
    """Writes one split's shards and index document by document (`add`), so that a caller streaming a corpus
    holds one document at a time; `close` writes the index and returns the split's SplitInfo."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        *,
        vocab_size: int,
        bos_id: int,
        eos_id: int,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
    ) -> None:
        if chunk_tokens < 1 or shard_tokens < 1:
            raise ValueError(f"chunk_tokens={chunk_tokens} and shard_tokens={shard_tokens} must be >= 1")
        self.root = Path(data_dir)
        self.split_dir = self.root / split
        self.split_dir.mkdir(parents=True, exist_ok=True)
        self.vocab_size, self.bos_id, self.eos_id = vocab_size, bos_id, eos_id
        self.chunk_tokens, self.shard_tokens = chunk_tokens, shard_tokens
        self.dtype = token_dtype(vocab_size)
        self.info = SplitInfo()
        # Index rows go to disk as they are made and become index.npy at close: a corpus of a billion short
        # documents has a billion rows, too many to hold.
        self._rows_path = self.split_dir / f"{INDEX_FILE}.rows"
        self._rows = open(self._rows_path, "wb")  # noqa: SIM115 (closed in close())
        self._num_rows = 0
        self._writer: wds.TarWriter | None = None
        self._shard_fill = 0

    def _shard_path(self) -> Path:
        return self.split_dir / f"shard-{len(self.info.shards):06d}.tar"

    def _close_shard(self) -> None:
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        path = self._shard_path()
        self.info.shards.append(
            {
                "path": str(path.relative_to(self.root)),
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )

    def add(self, doc_id: str, ids: np.ndarray) -> None:
        """Append one document (token ids without bos/eos); a document without tokens is skipped and counted."""
        info = self.info
        if len(ids) == 0:
            info.num_empty_skipped += 1
            return
        if int(np.max(ids)) >= self.vocab_size or int(np.min(ids)) < 0:
            raise ValueError(f"document {doc_id!r} has token ids outside [0, vocab_size={self.vocab_size})")
        tokens = np.concatenate([[self.bos_id], ids, [self.eos_id]]).astype(self.dtype)
        chunk_tokens = self.chunk_tokens
        num_chunks = -(-len(tokens) // chunk_tokens)
        for chunk in range(num_chunks):
            if self._writer is None or self._shard_fill >= self.shard_tokens:
                if self._writer is not None:
                    self._close_shard()
                # A fixed mtime makes the same corpus give byte-identical shards, hence stable checksums.
                self._writer = wds.TarWriter(
                    str(self._shard_path()), encoder=False, mtime=0, user="memscale", group="memscale"
                )
                self._shard_fill = 0
            part = tokens[chunk * chunk_tokens : (chunk + 1) * chunk_tokens]
            header = {"id": doc_id, "chunk": chunk, "num_chunks": num_chunks, "start": chunk * chunk_tokens}
            # tarstream.offset is where the next member's header will start: the byte a reader seeks to.
            row = (info.num_docs, len(info.shards), self._writer.tarstream.offset, len(part))
            self._rows.write(_ROW.pack(*row))
            self._num_rows += 1
            sample = {"json": json.dumps(header).encode(), "npy": _npy_bytes(part)}
            self._writer.write({"__key__": sample_key(info.num_docs, chunk), **sample})
            self._shard_fill += len(part)
        info.num_docs += 1
        info.num_tokens += len(tokens)
        info.num_chunks += num_chunks

    def close(self) -> SplitInfo:
        """Close the last shard and write `index.npy`."""
        if self._writer is not None:
            self._close_shard()
        self._rows.close()
        index_path = self.split_dir / INDEX_FILE
        # Byte for byte what np.save writes for the int64 [rows, 4] array, streamed from the rows file.
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<i8")), "fortran_order": False}
        with open(index_path, "wb") as out, open(self._rows_path, "rb") as rows:
            np.lib.format.write_array_header_1_0(out, {**header, "shape": (self._num_rows, 4)})
            shutil.copyfileobj(rows, out, 1 << 20)
        self._rows_path.unlink()
        self.info.index = {"path": str(index_path.relative_to(self.root)), "sha256": sha256_file(index_path)}
        return self.info


def write_split(
    data_dir: str | Path,
    split: str,
    docs: Iterable[tuple[str, np.ndarray]],
    *,
    vocab_size: int,
    bos_id: int,
    eos_id: int,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> SplitInfo:
    """Write `data_dir/split/shard-*.tar` and `index.npy` from (id, token ids) pairs, each document as
    [bos] + ids + [eos]. Documents without tokens are skipped and counted."""
    writer = SplitWriter(
        data_dir,
        split,
        vocab_size=vocab_size,
        bos_id=bos_id,
        eos_id=eos_id,
        chunk_tokens=chunk_tokens,
        shard_tokens=shard_tokens,
    )
    for doc_id, ids in docs:
        writer.add(doc_id, ids)
    return writer.close()


def write_meta(
    data_dir: str | Path,
    *,
    vocab_size: int,
    pad_id: int,
    bos_id: int,
    eos_id: int,
    chunk_tokens: int,
    splits: dict[str, SplitInfo],
    extra: dict | None = None,
) -> dict:
    """Write meta.json: what a reader must know about the shards, plus `extra` (how they were made)."""
    meta = {
        "format": FORMAT,
        "vocab_size": vocab_size,
        "pad_id": pad_id,
        "bos_id": bos_id,
        "eos_id": eos_id,
        "dtype": token_dtype(vocab_size).name,
        "chunk_tokens": chunk_tokens,
        "splits": {name: asdict(info) for name, info in splits.items()},
        **(extra or {}),
    }
    Path(data_dir, META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# --------------------------------------------------------------------------------------------------------------
# Reading.


def read_meta(data_dir: str | Path) -> dict:
    root = Path(data_dir)
    prepare = f"run `memscale data prepare --out {root}` first"
    if not root.is_dir():
        raise FileNotFoundError(f"data dir {root} not found: {prepare}")
    path = root / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {prepare}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ValueError(f"{path} is not valid JSON: {rebuild_hint(root)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} meta file: {rebuild_hint(root)}")
    return meta


# (path, size, mtime_ns) -> sha256: a validation loader is built for every evaluation, its shards hashed once.
_VERIFIED: dict[tuple[str, int, int], str] = {}


def verify_file(path: Path, *, sha256: str, size: int | None = None, hint: str) -> None:
    """Raise ShardError unless `path` exists with the recorded size and checksum."""
    if not path.is_file():
        raise ShardError(f"{path} is missing: {hint}")
    stat = path.stat()
    if size is not None and stat.st_size != size:
        raise ShardError(
            f"{path} is truncated or corrupt ({stat.st_size} bytes, meta.json says {size}): {hint}"
        )
    cache_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _VERIFIED:
        _VERIFIED[cache_key] = sha256_file(path)
    if _VERIFIED[cache_key] != sha256:
        raise ShardError(f"{path} is corrupt (its sha256 differs from meta.json): {hint}")


@dataclass
class SplitIndex:
    """Where each chunk of each document of a split lives: chunk k of document d is row `first_row[d] + k`."""

    split: str
    shard_paths: list[Path]
    rows: np.ndarray
    """int64 [num_chunks, 4]: doc, shard, byte offset, tokens."""
    first_row: np.ndarray
    doc_tokens: np.ndarray
    chunk_tokens: int
    pad_id: int
    fingerprint: str
    """sha256 of the index file: names the data that a saved loader position refers to."""

    @property
    def num_docs(self) -> int:
        return len(self.first_row)


def load_split(data_dir: str | Path, split: str) -> SplitIndex:
    """Read meta.json and the split's index, after checking every shard's size and checksum."""
    root = Path(data_dir)
    meta = read_meta(root)
    if split not in meta["splits"]:
        have = ", ".join(sorted(meta["splits"])) or "none"
        raise ValueError(f"split '{split}' not in {root / META_FILE} (it has: {have}): {rebuild_hint(root)}")
    info = meta["splits"][split]
    hint = rebuild_hint(root, source=meta.get("source"))
    shard_paths = []
    for shard in info["shards"]:
        path = root / shard["path"]
        verify_file(path, sha256=shard["sha256"], size=shard["bytes"], hint=hint)
        shard_paths.append(path)
    index_path = root / info["index"]["path"]
    verify_file(index_path, sha256=info["index"]["sha256"], hint=hint)
    rows = np.load(index_path, allow_pickle=False)
    first_row = np.searchsorted(rows[:, 0], np.arange(info["num_docs"]))
    doc_tokens = np.add.reduceat(rows[:, 3], first_row) if len(rows) else np.zeros(0, dtype=np.int64)
    return SplitIndex(
        split=split,
        shard_paths=shard_paths,
        rows=rows,
        first_row=first_row,
        doc_tokens=doc_tokens,
        chunk_tokens=int(meta["chunk_tokens"]),
        pad_id=int(meta["pad_id"]),
        fingerprint=info["index"]["sha256"],
    )


def read_chunk(path: Path, offset: int, *, key: str) -> np.ndarray:
    """Token ids of sample `key`, whose first tar header is at byte `offset` of shard `path`."""
    sample: dict[str, bytes] = {}
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            for member in tar_file_iterator(f):
                member_key, _, ext = member["fname"].partition(".")
                if member_key != key:
                    break
                sample[ext] = member["data"]
                if len(sample) == 2:  # .json and .npy: stop before reading the next sample's header
                    break
        return np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
    except (tarfile.TarError, OSError, KeyError, ValueError) as e:
        raise ShardError(
            f"{path} is truncated or corrupt (sample {key} at byte {offset}: {type(e).__name__}): "
            f"{rebuild_hint(path.parent.parent)}"
        ) from None


def read_row(index: SplitIndex, row: int) -> np.ndarray:
    """Token ids of chunk `row` of a split (index row order: documents in order, chunks in order)."""
    doc, shard, offset, num_tokens = (int(v) for v in index.rows[row])
    key = sample_key(doc, row - int(index.first_row[doc]))
    tokens = read_chunk(index.shard_paths[shard], offset, key=key)
    if len(tokens) != num_tokens:
        raise ShardError(
            f"{index.shard_paths[shard]}: sample {key} has {len(tokens)} tokens, the index says {num_tokens}: "
            f"{rebuild_hint(index.shard_paths[shard].parent.parent)}"
        )
    return tokens
