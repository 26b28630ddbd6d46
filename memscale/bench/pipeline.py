"""Pipeline parallelism with memory: measured idle fraction per stage against the simulator's, and tokens/s.

    memscale bench pipeline                 # xl (per layer) and rmt (global) at P = 2 and 4, one thread per rank
    memscale bench pipeline --steps 3 --set model.d_model=128
    memscale bench pipeline --pp-layers even   # num_layers / P layers per stage only

Stages are cut as training cuts them (memscale/parallel/pipeline/balance.py `stage_layers`): by default each case
runs the cost-balanced split (the last stage also runs the head and the loss over the vocabulary, so it holds
fewer layers) and, where it differs, the even split beside it; `--pp-layers` picks one.

Each case runs the real `PipelineRuntime` (memscale/parallel/pipeline/runtime.py) in P processes (torchrun, gloo,
one thread each) on random tokens: G stream groups of `data.num_streams` streams, S segments per group per step,
BPTT windows of k segments for the kinds that carry gradient. Every rank times its computations (the runtime's
forward and backward of a segment) and the action loop of each step (from the moment the step's set-up is done,
which ends in a collective every rank waits for, to its last computation), after `--warmup` untimed steps:

    measured idle fraction = 1 - computing time / the step's span            (per rank, mean over timed steps)

where the span runs from the end of the set-up (all ranks together) to the last computation on any rank: the
simulator's makespan, and 1F1B's (P - 1) / (m + P - 1) is idle time over the same span.

The prediction runs the simulator (simulate.py) on the same schedule with this run's measured costs: the mean
forward and backward time of a segment on each stage, and the p2p latency and bandwidth of a ping-pong of the
activation message measured between ranks 0 and 1 before the steps. The bubble of independent micro-batches,
(P - 1) / (m + P - 1) for m = G x S segments per step, is printed beside it.

Tokens/s: the same model as one process with one thread, training the same streams with
`memscale.train.bptt.run_window` (S / k windows per step), against the pipeline (its slowest rank paces the
step), optimizer steps included in both. The two alternate for `--rounds` rounds (one process, pipeline, one
process, ...) and each side's median round counts: on this shared machine the same case measured 1.53x to
1.67x in three back-to-back runs of one round, so one round of each, minutes apart, measures the machine's drift
as much as the pipeline.

On a 2-core machine P = 4 runs four processes on two cores: each computation then shares its core, which the
measured forward/backward times (and so the prediction) include.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memscale.bench import machine_info, now, ping_pong, write_result

# (kind, P, G, memory_grad, k)
CASES = [
    ("xl", 2, 1, "detached", 1),
    ("rmt", 2, 2, "truncated", 2),
    ("xl", 4, 1, "detached", 1),
    ("rmt", 4, 4, "truncated", 2),
]
SHAPE = [
    "model.d_model=256",
    # Fifteen layers, so that a cut can be even: the head and the loss over the vocabulary cost 1.3 layers by
    # FLOPs and 0.6-1.0 in measured time (the fused loss computes its gradient in the forward), so 15 layers and
    # the head are ~16 layers' work: 8 + 7 and 4 + 4 + 4 + 3 balance. With four layers (3 + 1 or 2 + 2) one stage
    # waited ~30% of the step; with twelve (13 layers' work) no cut came closer than one layer (7 + 5 or 6 + 6:
    # 1.57x / 1.52x for rmt at P = 2 where fifteen gave 1.62x, bench/results/pipeline-2026-12-03-shape-*.json).
    "model.num_layers=15",
    "model.num_heads=4",
    "model.vocab_size=4096",
    "model.memory.num_tokens=8",
    "model.memory.mem_len=128",
    "data.segment_len=128",
    "data.num_streams=2",
]


def _config(kind: str, memory_grad: str, k: int, overrides: list[str]):
    from memscale.config import config_from_dict

    return config_from_dict(
        {},
        [
            *SHAPE,
            f"model.memory.kind={kind}",
            f"train.memory_grad={memory_grad}",
            f"train.bptt_segments={k}",
            *overrides,
        ],
    )


def _stage_counts(cfg, P: int, pp_layers: str) -> list[int]:
    """Layers per stage at P stages: `pp_layers` ("3,1"), or "" for the split training makes by default. (The case
    configs keep parallel.pp = 1: their data.num_streams is per group here, not split over groups.)"""
    from memscale.config import parse_pp_layers
    from memscale.parallel.pipeline.balance import stage_layers

    return parse_pp_layers(pp_layers, pp=P, num_layers=cfg.model.num_layers) or stage_layers(cfg, P)


def _splits(cfg, P: int, mode: str) -> list[tuple[str, str]]:
    """(name, layers per stage as "3,1") of the splits to run at P stages: balanced, even, or both where they
    differ."""
    L = cfg.model.num_layers
    even = ",".join([str(L // P)] * P) if L % P == 0 else ""
    balanced = ",".join(map(str, _stage_counts(cfg, P, "")))
    out = []
    if mode in ("both", "balanced"):
        out.append(("balanced", balanced))
    if mode in ("both", "even") and even and not (mode == "both" and even == balanced):
        out.append(("even", even))
    return out


def _batches(cfg, num_groups: int, num_segments: int, seed: int = 0):
    """`num_groups` groups of `data.num_streams` streams, `num_segments` segments each: random tokens, targets on
    every position, no resets after the first segment."""
    import torch

    from memscale.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    B, T, V = cfg.data.num_streams, cfg.data.segment_len, cfg.model.vocab_size
    out = []
    for _ in range(num_groups):
        segs = []
        for t in range(num_segments):
            tokens = torch.randint(0, V, (B, T), generator=g)
            segs.append(
                Batch(
                    tokens_BT=tokens,
                    targets_BT=torch.randint(0, V, (B, T), generator=g),
                    reset_B=torch.full((B,), t == 0),
                    doc_pos_B=torch.full((B,), t * T),
                )
            )
        out.append(segs)
    return out


def pipeline_worker(spec: dict) -> None:
    import torch
    import torch.distributed as dist

    from memscale.models import MemoryTransformer
    from memscale.parallel.pipeline.balance import stage_ranges
    from memscale.parallel.pipeline.runtime import PipelineRuntime
    from memscale.parallel.pipeline.schedule import generate, spec_for_kind
    from memscale.parallel.pipeline.simulate import CostModel, simulate

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, P = dist.get_rank(), dist.get_world_size()
    cfg = _config(spec["kind"], spec["memory_grad"], spec["k"], spec["overrides"])
    torch.manual_seed(0)
    layers = stage_ranges(_stage_counts(cfg, P, spec["pp_layers"]))[rank]
    stage = MemoryTransformer(cfg.model, segment_len=cfg.data.segment_len, layers=layers)
    sspec = spec_for_kind(
        spec["kind"],
        num_stages=P,
        num_groups=spec["G"],
        num_segments=spec["S"],
        bptt_segments=spec["k"],
        memory_grad=spec["memory_grad"],
    )
    schedule = generate(sspec)
    runtime = PipelineRuntime(stage, sspec)
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-4)
    batches = _batches(cfg, spec["G"], spec["S"])
    # The activation message: B x S_len x D floats (rmt adds 2K memory positions to the segment).
    extra = 2 * cfg.model.memory.num_tokens if spec["kind"] == "rmt" else 0
    msg = cfg.data.num_streams * (cfg.data.segment_len + extra) * cfg.model.d_model * 4
    small, big = ping_pong(4, 20), ping_pong(msg, 20)
    latency, bandwidth = small, msg / max(big - small, 1e-9)

    timing = {"F": [], "B": []}
    marks: dict[str, float] = {}

    def timed(fn, key):
        def run(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            t1 = time.perf_counter()
            timing[key].append(t1 - t0)
            marks["last"] = t1
            return out

        return run

    def loop_start(fn):
        def run(*a, **kw):
            out = fn(*a, **kw)
            marks["start"] = time.perf_counter()
            return out

        return run

    runtime._forward = timed(runtime._forward, "F")
    runtime._backward = timed(runtime._backward, "B")
    runtime._exchange_initial_memory = loop_start(runtime._exchange_initial_memory)
    states = None
    idle, steps = [], []
    for step in range(spec["warmup"] + spec["steps"]):
        for v in timing.values():
            v.clear()
        dist.barrier()
        t0 = time.perf_counter()
        result = runtime.run(schedule, batches, states)
        opt.step()
        opt.zero_grad(set_to_none=True)
        states = result.states
        step_s = time.perf_counter() - t0
        if step >= spec["warmup"]:
            busy = sum(timing["F"]) + sum(timing["B"])
            # The step's span over all ranks (the simulator's makespan): from the set-up collective, which every
            # rank leaves together, to the last computation on any rank. (perf_counter is CLOCK_MONOTONIC, one
            # clock for all processes of a machine.) A rank's own span would miss the time it waits at the end
            # for the others: the last stage, done first, waits while the first stage runs its last backward.
            spans: list = [None] * P
            dist.all_gather_object(spans, (marks["start"], marks["last"]))
            span = max(e for _, e in spans) - min(b for b, _ in spans)
            idle.append(1 - busy / span)
            steps.append(step_s)
            f_mean = sum(timing["F"]) / len(timing["F"])
            b_mean = sum(timing["B"]) / len(timing["B"])
    costs = [None] * P
    dist.all_gather_object(costs, (f_mean, b_mean))
    sim = simulate(
        schedule,
        sspec,
        CostModel(
            forward_s=[c[0] for c in costs],
            backward_s=[c[1] for c in costs],
            activation_bytes=[1] * P,
            state_bytes=[1] * P,
            activation_msg_bytes=[msg] * P,
            memory_msg_bytes=msg * cfg.model.memory.num_tokens // max(cfg.data.segment_len + extra, 1),
            p2p_latency_s=latency,
            p2p_bandwidth_Bps=bandwidth,
        ),
    )
    out = {
        "rank": rank,
        "measured_idle": sum(idle) / len(idle),
        "predicted_idle": sim.ranks[rank].bubble,
        "step_seconds": sorted(steps)[len(steps) // 2],
        "forward_s": f_mean,
        "backward_s": b_mean,
        "p2p_latency_s": latency,
        "p2p_bandwidth_Bps": bandwidth,
    }
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def one_process_worker(spec: dict) -> None:
    """The same model, streams and segments on one process (one thread): run_window over S / k windows per step."""
    import torch

    from memscale.models import MemoryTransformer
    from memscale.models.memory.base import MemoryState
    from memscale.train.bptt import run_window

    torch.set_num_threads(1)
    cfg = _config(spec["kind"], spec["memory_grad"], spec["k"], spec["overrides"])
    torch.manual_seed(0)
    model = MemoryTransformer(cfg.model, segment_len=cfg.data.segment_len)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    groups = _batches(cfg, spec["G"], spec["S"])
    # All groups' streams side by side: one batch of G x B rows per segment.
    segments = [
        type(groups[0][t])(
            *(
                torch.cat([getattr(g[t], f) for g in groups])
                for f in ("tokens_BT", "targets_BT", "reset_B", "doc_pos_B")
            )
        )
        for t in range(spec["S"])
    ]
    state: MemoryState = model.init_state(spec["G"] * cfg.data.num_streams)
    k, steps = spec["k"], []
    for step in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        total = sum(b.num_targets for b in segments)
        for w in range(0, spec["S"], k):
            window = segments[w : w + k]
            r = run_window(
                model,
                window,
                state,
                memory_grad=spec["memory_grad"],
                loss_scale=sum(b.num_targets for b in window) / total,
            )
            state = r.state
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= spec["warmup"]:
            steps.append(time.perf_counter() - t0)
    Path(spec["out"], "one.json").write_text(json.dumps({"step_seconds": sorted(steps)[len(steps) // 2]}))


def _launch(code: str, spec: dict, nproc: int, *, results: list[Path] = ()) -> None:
    """Run a worker; `results`: the files it writes before tearing down. A rank that aborts in teardown after
    every result is written (seen on this shared 2-core machine: "terminate called without an active exception"
    at exit) is reported, not fatal; any earlier failure is."""
    # The worker script lives in a temp dir, so `import memscale` there would find the installed package, not
    # this one (another checkout's code would run): put this package's root first on the path.
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    if nproc == 1:
        cmd = [sys.executable, "-c", code, json.dumps(spec)]
    else:
        script = Path(spec["out"]) / "worker.py"
        script.write_text(code)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        cmd += [str(script), json.dumps(spec)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0 and results and all(p.exists() for p in results):
        first = (r.stdout + r.stderr).strip().splitlines()[0]
        print(f"  note: {spec['kind']} P={nproc} exited {r.returncode} after writing its results ({first})")
        return
    if r.returncode != 0:
        # torchrun's summary fills the tail; the ranks' own error is earlier: keep the whole output.
        fd, log = tempfile.mkstemp(prefix="memscale-bench-pipeline-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(r.stdout + r.stderr)
        raise RuntimeError(
            f"{spec['kind']} P={nproc} failed (exit {r.returncode}; whole output in {log}):\n"
            f"{(r.stdout + r.stderr)[-2000:]}"
        )


def main(args) -> int:
    overrides = list(args.overrides)
    mode = getattr(args, "pp_layers", "both")
    runs = []  # (kind, P, G, grad, k, [(split name, pp_layers)])
    stages = getattr(args, "stages", (2, 4))
    unknown = sorted(set(stages) - {case[1] for case in CASES})
    if unknown:
        print(
            f"memscale bench pipeline: --stages {unknown[0]}: the bench runs P = 2 and 4; pass --stages 2,4 or one of them"
        )
        return 2
    for kind, P, G, grad, k in CASES:
        if P not in stages:
            continue
        cfg = _config(kind, grad, k, overrides)  # a bad key stops here, before any process starts
        splits = _splits(cfg, P, mode)
        if not splits:
            print(
                f"  {kind} P={P}: skipped, {cfg.model.num_layers} layers do not split evenly over {P} stages"
            )
            continue
        runs.append((kind, P, G, grad, k, splits))
    S = args.segments
    shape = _config("none", "detached", 1, overrides)
    print(
        f"bench pipeline: d_model {shape.model.d_model}, {shape.model.num_layers} layers, {S} segments of "
        f"{shape.data.segment_len} tokens per group per step, {shape.data.num_streams} streams per group, "
        f"{args.warmup} + {args.steps} steps, one thread per process",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="memscale-bench-pipeline-") as tmp:
        for kind, P, G, grad, k, splits in runs:
            code = "import json, sys\nfrom memscale.bench.pipeline import {}\n{}(json.loads(sys.argv[1]))"
            spec = {
                "kind": kind, "G": G, "S": S, "k": k, "memory_grad": grad, "overrides": overrides,
                "steps": args.steps, "warmup": args.warmup, "pp_layers": "",
            }  # fmt: skip
            ones, pipes = [], {name: [] for name, _ in splits}
            for rnd in range(args.rounds):
                one_dir = Path(tmp) / f"{kind}-P{P}-one-{rnd}"
                one_dir.mkdir()
                _launch(
                    code.format("one_process_worker", "one_process_worker"), {**spec, "out": str(one_dir)}, 1
                )
                ones.append(json.loads((one_dir / "one.json").read_text()))
                for name, layers in splits:
                    out = Path(tmp) / f"{kind}-P{P}-{name}-{rnd}"
                    out.mkdir()
                    run_spec = {**spec, "pp_layers": layers, "out": str(out)}
                    results = [out / f"rank{r}.json" for r in range(P)]
                    _launch(code.format("pipeline_worker", "pipeline_worker"), run_spec, P, results=results)
                    pipes[name].append([json.loads((out / f"rank{r}.json").read_text()) for r in range(P)])
                print(f"  {kind} P={P}: round {rnd + 1} of {args.rounds} done", flush=True)
            one = _median_by(ones, lambda o: o["step_seconds"])
            cfg = _config(kind, grad, k, overrides)
            tokens = G * S * cfg.data.num_streams * cfg.data.segment_len
            for name, layers in splits:
                ranks = _median_by(pipes[name], _pipeline_step)
                row = _row(kind, P, G, grad, k, S, name, layers, ranks, one, tokens)
                row["speedup_per_round"] = [
                    o["step_seconds"] / _pipeline_step(r) for o, r in zip(ones, pipes[name], strict=True)
                ]
                rows.append(row)
    print()
    print(
        f"{'case':<22} {'layers':<12} {'idle measured / predicted per stage':<40} {'1F1B':>5} {'x 1 proc':>9}"
    )
    for r in rows:
        pairs = " ".join(
            f"{a:.2f}/{b:.2f}"
            for a, b in zip(r["measured_idle_per_stage"], r["predicted_idle_per_stage"], strict=True)
        )
        case = f"{r['kind']} P={r['P']} G={r['G']} {r['memory_grad']}"
        split = f"{r['pp_layers']} {r['split'][:3]}"
        spread = "/".join(f"{x:.2f}" for x in r["speedup_per_round"])
        print(
            f"{case:<22} {split:<12} {pairs:<40} {r['independent_bubble']:>5.2f} {r['speedup']:>8.2f}x  ({spread})"
        )
    print(
        "layers: per stage, bal(anced by cost) or even; idle: 1 - computing time / step span (all ranks) per rank; "
        "1F1B: (P - 1) / (m + P - 1), m = G x S; x 1 proc: median round (each round's in brackets)"
    )
    result = {
        "benchmark": "pipeline", "date": now(), "machine": machine_info(), "overrides": overrides,
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "pp_layers": mode, "rows": rows,
    }  # fmt: skip
    write_result(result, args.out, "pipeline")
    return 0


def _pipeline_step(ranks: list[dict]) -> float:
    """A pipeline run's step time: its slowest rank paces the step."""
    return max(r["step_seconds"] for r in ranks)


def _median_by(runs: list, key):
    """The run with the median `key` (the lower middle one for an even count)."""
    return sorted(runs, key=key)[(len(runs) - 1) // 2]


def _row(kind, P, G, grad, k, S, split, layers, ranks, one, tokens) -> dict:
    m = G * S
    pp_step = _pipeline_step(ranks)
    return {
        "kind": kind,
        "P": P,
        "G": G,
        "segments_per_group": S,
        "memory_grad": grad,
        "k": k,
        "split": split,
        "pp_layers": layers,
        "measured_idle_per_stage": [r["measured_idle"] for r in ranks],
        "predicted_idle_per_stage": [r["predicted_idle"] for r in ranks],
        "independent_bubble": (P - 1) / (m + P - 1),
        "pipeline_tokens_per_s": tokens / pp_step,
        "one_process_tokens_per_s": tokens / one["step_seconds"],
        "speedup": one["step_seconds"] / pp_step,
        "ranks": ranks,
    }  # fmt: skip
