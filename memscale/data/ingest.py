"""Reading a corpus the user brings: JSONL and plain text files, folders of them, gzip-compressed or not.

    files = find_inputs(["corpus/", "extra.jsonl.gz"])
    for task in read_tasks(files, text_key="text"):   # ~1 MiB blocks of whole lines, or whole text files
        for record in parse_task(task, files, text_key="text", id_key="id"):
            ...                                          # Document(id, text) or Problem(kind, file, line, ...)

The corpus is streamed: the reader cuts each file into blocks of whole lines (JSONL) or takes a text file whole,
and only the blocks in flight are in memory. Decoding and parsing happen in `parse_task`, which runs in the
tokenizer's worker processes, so the reading process only moves bytes. Every record carries its file and line,
and bad input becomes a `Problem` with both: never an exception from deep inside a worker.

What counts as what:
- `*.jsonl` and `*.ndjson` (optionally `.gz`) are JSONL: a document per line, its text under `text_key`, its id
  under `id_key` when present (else "<file>:<line>"). Blank lines are ignored.
- Any other file is plain text, one document per file (its id is its name). A document is the unit the model
  streams through its memory, so a book stays whole; a single text file is therefore held in memory while it is
  encoded (use JSONL for corpora whose documents are larger than memory allows).
- Gzip is recognised by its magic bytes, not the name.
- Folders are walked recursively in sorted order; hidden files and folders (".name") are skipped.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

JSONL_SUFFIXES = (".jsonl", ".ndjson")
BLOCK_BYTES = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"

ProblemKind = Literal["not_utf8", "not_json", "missing_text_key", "empty_file", "corrupt_gzip"]
PROBLEM_LABELS: dict[str, str] = {
    "not_utf8": "undecodable bytes (not UTF-8)",
    "not_json": "lines that are not JSON",
    "missing_text_key": "records without a text",
    "empty_file": "empty files",
    "corrupt_gzip": "truncated or corrupt gzip files",
}


@dataclass(frozen=True)
class InputFile:
    path: Path
    name: str
    """The file's path from its input argument on (the folder's own name included): stable ids, whatever the
    current directory."""
    kind: Literal["jsonl", "text"]
    size: int
    """Bytes on disk (compressed for gzip): the unit of the progress bar."""


@dataclass(frozen=True)
class Task:
    """A block of one file: whole JSONL lines starting at `first_line`, or a whole text file."""

    file: int
    first_line: int
    data: bytes
    done_bytes: int
    """Bytes of the input (on disk) read up to the end of this block, over all files: the progress position."""


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True)
class Problem:
    kind: ProblemKind
    file: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.file} line {self.line}: {self.what}"


def _file_kind(path: Path) -> Literal["jsonl", "text"]:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else "text"


def find_inputs(paths: list[str | Path]) -> list[InputFile]:
    """The files named by `paths` (files, or folders walked recursively in sorted order), in order."""
    files: list[InputFile] = []
    for arg in paths:
        root = Path(arg)
        if root.is_dir():
            found = sorted(
                p
                for p in root.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
            )
            if not found:
                raise ValueError(f"--input {root} holds no files: point it at JSONL or text files")
            base = root.resolve().parent
        elif root.is_file():
            found, base = [root], root.resolve().parent
        else:
            raise FileNotFoundError(f"--input {root} not found: check the path")
        for path in found:
            name = path.resolve().relative_to(base).as_posix()
            files.append(InputFile(path=path, name=name, kind=_file_kind(path), size=path.stat().st_size))
    return files


def _open(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """(raw file, reader): the reader decompresses when the file starts with the gzip magic."""
    raw = open(path, "rb")  # noqa: SIM115 (closed by the caller)
    if raw.read(2) == GZIP_MAGIC:
        raw.seek(0)
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")
    raw.seek(0)
    return raw, raw


def read_tasks(files: list[InputFile], *, block_bytes: int = BLOCK_BYTES) -> Iterator[Task | Problem]:
    """Blocks of the input in order. A file that is empty (or only whitespace) or whose gzip stream breaks
    yields a Problem at the line where it ends; what came before it was yielded as blocks."""
    done_before = 0
    for index, file in enumerate(files):
        raw, reader = _open(file.path)
        line = 1
        seen_text = False
        try:
            with raw:
                while True:
                    if file.kind == "jsonl":
                        # A block ends at a line end, so that no record is cut between two workers.
                        data = reader.read(block_bytes)
                        if data and not data.endswith(b"\n"):
                            data += reader.readline()
                    else:
                        data = reader.read()
                    if not data:
                        break
                    seen_text = seen_text or not data.isspace()
                    if file.kind == "text" and data.isspace():
                        break  # an empty document, reported below
                    yield Task(index, line, data, done_before + raw.tell())
                    line += data.count(b"\n")
                    if file.kind == "text":
                        break
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
            yield Problem("corrupt_gzip", file.name, line, f"gzip stream breaks here ({type(e).__name__})")
            seen_text = True  # reported once, as corrupt
        if not seen_text:
            yield Problem("empty_file", file.name, 1, "the file is empty")
        done_before += file.size


def _decode(data: bytes, file: str, first_line: int) -> str | Problem:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        return Problem("not_utf8", file, line, f"not UTF-8 (byte {data[e.start]:#04x} at column {column})")


def parse_task(
    task: Task, files: list[InputFile], *, text_key: str, id_key: str | None
) -> list[Document | Problem]:
    """The documents of one block, in order, with a Problem in place of each bad record."""
    file = files[task.file]
    if file.kind == "text":
        text = _decode(task.data, file.name, task.first_line)
        return [text if isinstance(text, Problem) else Document(file.name, text)]
    out: list[Document | Problem] = []
    for offset, raw in enumerate(task.data.split(b"\n")):
        line = task.first_line + offset
        if not raw.strip():
            continue
        decoded = _decode(raw, file.name, line)
        if isinstance(decoded, Problem):
            out.append(decoded)
            continue
        try:
            record = json.loads(decoded)
        except json.JSONDecodeError as e:
            out.append(Problem("not_json", file.name, line, f"not JSON ({e.msg} at column {e.colno})"))
            continue
        text = record.get(text_key) if isinstance(record, dict) else None
        if not isinstance(text, str):
            got = (
                f"keys {sorted(record)[:8]}"
                if isinstance(record, dict)
                else f"a JSON {type(record).__name__}"
            )
            what = f"no string under --text-key {text_key!r} ({got})"
            out.append(Problem("missing_text_key", file.name, line, what))
            continue
        doc_id = record.get(id_key) if id_key else None
        out.append(Document(str(doc_id) if doc_id is not None else f"{file.name}:{line}", text))
    return out
