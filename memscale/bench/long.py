"""One long document, end to end: peak RSS and tokens/s for training with BPTT through every segment boundary
(memory replay) and for evaluation, at 16K, 128K and 1M tokens.

    memscale bench long                                   # 16K / 128K / 1M tokens, rmt + memformer train, all eval
    memscale bench long --tokens 16384,131072 --train-kinds rmt --eval-kinds none,rmt

Each measurement runs in its own process (so peak RSS is that run's alone) through the real paths: a data
directory holding one document of N tokens (random ids; the cost does not depend on the text) is written with
memscale's shard writer, then `Trainer` runs ONE optimizer step whose window is the whole document
(`train.bptt_segments = N / segment_len`, `train.memory_grad=replay`, one stream), or `evaluate_lm` streams the
whole document. Training by replay keeps one memory state per boundary (2,048 at 1M tokens) and one segment's
activations; the ratio of peak RSS between 1M and 16K tokens shows whether memory stays flat.

The shape is reduced (d_model 128, 2 layers, vocab 4096, segment 512) so that a million-token step finishes in
minutes on two CPU cores; time grows linearly with the document and with model FLOPs, memory does not.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from memscale.bench import machine_info, now, write_result

LONG_SHAPE = [
    "model.d_model=128",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.vocab_size=4096",
    "model.memory.num_tokens=16",
    "data.segment_len=512",
    "data.num_streams=1",
]


def _setting(key: str, overrides: list[str]) -> int:
    """The value of `key` after the overrides (the last assignment wins, as in the config loader)."""
    return [int(o.split("=", 1)[1]) for o in [*LONG_SHAPE, *overrides] if o.startswith(key + "=")][-1]


def write_long_document(data_dir: Path, *, tokens: int, vocab_size: int, seed: int = 0) -> None:
    """A data dir whose train and val splits hold one document giving exactly `tokens` input tokens."""
    from memscale.data.shards import write_meta, write_split

    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab_size, size=tokens - 1)  # + bos = `tokens` inputs; + eos = `tokens` targets
    splits = {}
    for split in ("train", "val"):
        splits[split] = write_split(
            data_dir, split, [("long-0", ids)], vocab_size=vocab_size, bos_id=2, eos_id=3
        )
    write_meta(
        data_dir,
        vocab_size=vocab_size,
        pad_id=0,
        bos_id=2,
        eos_id=3,
        chunk_tokens=65536,
        splits=splits,
        extra={"source": "bench-long"},
    )


def _worker(mode: str, kind: str, tokens: int, data_dir: str, overrides: list[str]) -> dict:
    import torch

    from memscale.config import GRAD_CARRYING_KINDS, config_from_dict

    seg = _setting("data.segment_len", overrides)
    grad = "replay" if mode == "train" and kind in GRAD_CARRYING_KINDS else "detached"
    with tempfile.TemporaryDirectory() as out:
        cfg = config_from_dict(
            {},
            [
                *LONG_SHAPE,
                *overrides,
                f"model.memory.kind={kind}",
                f"data.dir={data_dir}",
                f"train.bptt_segments={tokens // seg}",
                f"train.memory_grad={grad}",
                "train.max_steps=1",
                "train.warmup_steps=0",
                "train.eval_every=0",
                "train.log_every=1",
                f"train.out_dir={out}/run",
            ],
        )
        if mode == "train":
            from memscale.train.trainer import Trainer

            summary = Trainer(cfg, log=lambda _msg: None).train()
            tok_s = summary.tokens_per_s
        else:
            from memscale.data.sources import build_loader
            from memscale.eval.evaluate import evaluate_lm
            from memscale.models import MemoryTransformer

            torch.manual_seed(0)
            model = MemoryTransformer(cfg.model, segment_len=cfg.data.segment_len)
            t0 = time.perf_counter()
            ev = evaluate_lm(
                model, build_loader(cfg, "val", infinite=False), num_segments=None, num_streams=1
            )
            tok_s = ev.num_tokens / (time.perf_counter() - t0)
    return {
        "mode": mode,
        "kind": kind,
        "tokens": tokens,
        "memory_grad": grad,
        "tokens_per_s": tok_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _measure(mode: str, kind: str, tokens: int, data_dir: Path, overrides: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "memscale.bench.long",
        "--worker",
        mode,
        kind,
        str(tokens),
        str(data_dir),
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench long worker failed ({mode} {kind} {tokens}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(result: dict) -> str:
    head = f"{'mode':<6} {'kind':<10} {'tokens':>9} {'tok/s':>8} {'peak RSS MB':>12} {'RSS / smallest':>15}"
    lines = [head, "-" * len(head)]
    base = {}
    for r in result["rows"]:
        key = (r["mode"], r["kind"])
        base.setdefault(key, r["peak_rss_mb"])
        lines.append(
            f"{r['mode']:<6} {r['kind']:<10} {r['tokens']:>9} {r['tokens_per_s']:>8.0f} "
            f"{r['peak_rss_mb']:>12.0f} {r['peak_rss_mb'] / base[key]:>15.3f}"
        )
    return "\n".join(lines)


def run(*, tokens: list[int], train_kinds: list[str], eval_kinds: list[str], overrides: list[str], log=print):
    rows = []
    vocab = _setting("model.vocab_size", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        for n in tokens:
            data_dir = Path(tmp) / f"doc-{n}"
            write_long_document(data_dir, tokens=n, vocab_size=vocab)
            for mode, kinds in (("train", train_kinds), ("eval", eval_kinds)):
                for kind in kinds:
                    t0 = time.perf_counter()
                    row = _measure(mode, kind, n, data_dir, overrides)
                    rows.append(row)
                    log(
                        f"  {mode:<5} {kind:<10} {n:>8} tokens: {row['tokens_per_s']:7.0f} tok/s, "
                        f"peak RSS {row['peak_rss_mb']:.0f} MB ({time.perf_counter() - t0:.0f}s)"
                    )
    rows.sort(key=lambda r: (r["mode"] != "train", r["kind"], r["tokens"]))
    return rows


def main(args) -> int:

    tokens = [int(t) for t in args.tokens.split(",")]
    train_kinds = [k for k in args.train_kinds.split(",") if k]
    eval_kinds = [k for k in args.eval_kinds.split(",") if k]
    rows = run(tokens=tokens, train_kinds=train_kinds, eval_kinds=eval_kinds, overrides=args.overrides)
    result = {
        "benchmark": "long",
        "date": now(),
        "machine": machine_info(),
        "shape": [*LONG_SHAPE, *args.overrides],
        "rows": rows,
    }
    print(format_table(result))
    write_result(result, args.out, "long")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 6 and sys.argv[1] == "--worker":
        mode, kind, n, data_dir, *extra = sys.argv[2:]
        print(json.dumps(_worker(mode, kind, int(n), data_dir, extra)))
    else:
        sys.exit("usage: memscale bench long (this module's --worker form is internal)")
