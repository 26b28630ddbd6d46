"""`memscale data prepare --input` throughput against sentencepiece's own batch encoding, and its peak memory.

    memscale bench prepare                          # a 500 MB corpus (and a 100 MB one), 1 and 2 workers
    memscale bench prepare --size-mb 20 --small-mb 5 --workers 1

A JSONL corpus of `--size-mb` (and a smaller one, its first `--small-mb`) is generated in a temp dir from the
bundled corpus's paragraphs, shuffled into documents of 20-200 KB by a seeded generator. A 16k BPE tokenizer is
trained once on the bundled corpus and reused, so every run times the same work: reading, parsing, encoding and
writing shards.

- prepare: the real command (`memscale data prepare --input ... --tokenizer ... --workers N`) in a subprocess,
  timed end to end (start-up included); its peak memory is the largest sum of PSS (proportional set size:
  shared pages split between the processes sharing them) over the process and its workers, sampled every
  50 ms. The data stack's imports (torch, through webdataset) are ~200 MB of it.
- sentencepiece: `SentencePieceProcessor.encode(list_of_texts, num_threads=N)` over the same texts in 32 MB
  batches, only the encode calls timed (reading and parsing the JSON are not): the speed limit for any
  pipeline that encodes with sentencepiece.

Runs alternate (sentencepiece N, prepare N, ...) so that both see the same state of a shared machine. On a
machine shared with other jobs the wall-clock ratio moves with their load, so CPU seconds are reported too
(prepare: the command and its workers, from the rusage of waited-for children; sentencepiece: this process's
CPU time during the encode calls): their ratio says how much work prepare adds to the encoding itself. The
token counts of the two must agree (prepare adds bos/eos to each document); the benchmark fails otherwise.
"""

from __future__ import annotations

import gzip
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from memscale.bench import machine_info, now, write_result

BASELINE_BATCH_BYTES = 32 << 20
DOC_BYTES = (20_000, 200_000)


def generate_corpus(paths_and_sizes: list[tuple[Path, int]], *, seed: int = 0) -> list[dict]:
    """Write JSONL corpora of the given sizes (bytes): the same document stream, each file a prefix of it.
    Returns {"path", "bytes", "docs"} per file."""
    from memscale.data.prepare import BUNDLED_CORPUS

    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        paragraphs = [p for line in f for p in json.loads(line)["text"].split("\n\n") if p.strip()]
    rng = np.random.default_rng(seed)
    order = sorted(paths_and_sizes, key=lambda ps: ps[1])
    files = [open(path, "w", encoding="utf-8") for path, _ in order]  # noqa: SIM115 (closed below)
    written = [0] * len(files)
    docs = [0] * len(files)
    try:
        doc = 0
        while True:
            open_files = [i for i, (_, size) in enumerate(order) if written[i] < size]
            if not open_files:
                break
            target = int(rng.integers(*DOC_BYTES))
            parts, size = [], 0
            while size < target:
                part = paragraphs[int(rng.integers(len(paragraphs)))]
                parts.append(part)
                size += len(part) + 2
            line = json.dumps({"id": f"doc-{doc:07d}", "text": "\n\n".join(parts)}, ensure_ascii=False) + "\n"
            data = line.encode()
            for i in open_files:
                files[i].write(line)
                written[i] += len(data)
                docs[i] += 1
            doc += 1
    finally:
        for f in files:
            f.close()
    return [{"path": str(p), "bytes": written[i], "docs": docs[i]} for i, (p, _) in enumerate(order)]


def _texts(path: Path, batch_bytes: int) -> Iterator[list[str]]:
    batch, size = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            size += len(line)
            if size >= batch_bytes:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def time_sentencepiece(model: Path, corpus: Path, *, threads: int) -> dict:
    """Seconds spent in sentencepiece's batch encode over the corpus, and the tokens it returned."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    seconds, cpu_seconds, tokens = 0.0, 0.0, 0
    for batch in _texts(corpus, BASELINE_BATCH_BYTES):
        start, cpu_start = time.perf_counter(), time.process_time()
        ids = sp.encode(batch, num_threads=threads)
        seconds += time.perf_counter() - start
        cpu_seconds += time.process_time() - cpu_start  # all of this process's threads
        tokens += sum(len(x) for x in ids)
        del ids
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": tokens}


def _tree_memory(proc) -> int:
    """Bytes of memory held by `proc` and its descendants: the sum of their PSS (a page shared by n
    processes counts 1/n to each, so forked workers are not charged for their parent's pages), or of their
    RSS where the system does not report PSS."""
    import psutil

    total = 0
    try:
        root = psutil.Process(proc.pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                info = p.memory_full_info()
                total += getattr(info, "pss", info.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    except psutil.NoSuchProcess:
        pass
    return total


def time_prepare(model: Path, corpus: Path, out: Path, *, workers: int) -> dict:
    """Run `memscale data prepare --input` in a subprocess: wall seconds, peak PSS of its tree, its meta.json."""
    cmd = [sys.executable, "-m", "memscale.cli", "data", "prepare", "--input", str(corpus), "--out", str(out),
           "--tokenizer", str(model), "--workers", str(workers), "--overwrite"]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_memory(proc))
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    # The command and its workers (which it waits for): CPU seconds, whatever else shares the machine.
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    err = proc.stderr.read()
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"memscale data prepare failed ({proc.returncode}): {err.strip()[-500:]}")
    meta = json.loads((out / "meta.json").read_text())
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_pss_mb": peak / 2**20, "meta": meta}


def main(args) -> int:
    from memscale.data.corpus import read_jsonl
    from memscale.data.prepare import BUNDLED_CORPUS
    from memscale.data.tokenizer import train_tokenizer_on_texts

    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    small_mb = args.small_mb if args.small_mb is not None else args.size_mb / 5
    rows = []
    with tempfile.TemporaryDirectory(prefix="memscale-bench-prepare-", dir=args.tmp_dir) as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        corpora = generate_corpus(
            [(tmp / "small.jsonl", int(small_mb * 1e6)), (tmp / "corpus.jsonl", int(args.size_mb * 1e6))]
        )
        sizes = ", ".join(f"{c['bytes'] / 1e6:.0f} MB ({c['docs']} docs)" for c in corpora)
        print(f"generated {sizes} in {time.perf_counter() - start:.0f} s", flush=True)
        model = tmp / "tokenizer.model"
        texts = (d["text"] for d in read_jsonl(BUNDLED_CORPUS))
        train_tokenizer_on_texts(texts, model, vocab_size=args.vocab_size, source=str(BUNDLED_CORPUS))
        for corpus in reversed(corpora):  # the full size first: the throughput rows
            path, mb = Path(corpus["path"]), corpus["bytes"] / 1e6
            for n in workers:
                base = time_sentencepiece(model, path, threads=n) if path.name == "corpus.jsonl" else None
                run = time_prepare(model, path, tmp / "out", workers=n)
                splits = run["meta"]["splits"].values()
                tokens = sum(s["num_tokens"] for s in splits) - 2 * sum(s["num_docs"] for s in splits)
                row = {
                    "corpus_mb": round(mb, 1),
                    "docs": corpus["docs"],
                    "workers": n,
                    "prepare_s": round(run["seconds"], 2),
                    "prepare_cpu_s": round(run["cpu_seconds"], 2),
                    "prepare_mb_per_s": mb / run["seconds"],
                    "prepare_tokens_per_s": tokens / run["seconds"],
                    "peak_pss_mb": round(run["peak_pss_mb"], 1),
                    "tokens": tokens,
                }
                if base is not None:
                    if base["tokens"] != tokens:
                        raise RuntimeError(
                            f"prepare wrote {tokens} tokens, sentencepiece gave {base['tokens']}"
                        )
                    row.update(
                        spm_s=round(base["seconds"], 2),
                        spm_cpu_s=round(base["cpu_seconds"], 2),
                        cpu_ratio=base["cpu_seconds"] / run["cpu_seconds"],
                        spm_mb_per_s=mb / base["seconds"],
                        spm_tokens_per_s=tokens / base["seconds"],
                        ratio=base["seconds"] / run["seconds"],
                    )
                rows.append(row)
                print(_row_line(row), flush=True)
    print()
    print(
        "| corpus | workers | prepare MB/s | prepare M tok/s | sentencepiece MB/s | speed ratio | CPU ratio "
        "| peak memory (PSS) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        spm = f"{r['spm_mb_per_s']:.2f}" if "spm_s" in r else "-"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        cpu_ratio = f"{r['cpu_ratio']:.2f}x" if "cpu_ratio" in r else "-"
        print(f"| {r['corpus_mb']:.0f} MB | {r['workers']} | {r['prepare_mb_per_s']:.2f} | "
              f"{r['prepare_tokens_per_s'] / 1e6:.2f} | {spm} | {ratio} | {cpu_ratio} | "
              f"{r['peak_pss_mb']:.0f} MB |")  # fmt: skip
    result = {
        "benchmark": "prepare",
        "date": now(),
        "machine": machine_info(),
        "vocab_size": args.vocab_size,
        "rows": rows,
    }
    write_result(result, args.out, "prepare")
    return 0


def _row_line(r: dict) -> str:
    line = (
        f"{r['corpus_mb']:.0f} MB, {r['workers']} worker(s): prepare {r['prepare_s']:.1f} s, "
        f"{r['prepare_mb_per_s']:.2f} MB/s, {r['prepare_tokens_per_s'] / 1e6:.2f} M tok/s, "
        f"peak PSS {r['peak_pss_mb']:.0f} MB"
    )
    if "spm_s" in r:
        line += (
            f" | sentencepiece {r['spm_s']:.1f} s, {r['spm_mb_per_s']:.2f} MB/s: ratio {r['ratio']:.2f}x"
            f" (CPU seconds {r['prepare_cpu_s']:.1f} vs {r['spm_cpu_s']:.1f}: {r['cpu_ratio']:.2f}x)"
        )
    return line
