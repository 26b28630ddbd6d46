"""The planner's cost model against measured CPU training steps: predicted vs measured step time.

    memscale bench plan                  # ~3 minutes on 2 cores: 1 process, dp=2 and tp=2 on the bundled corpus
    memscale bench plan --runs one       # only the single-process run
    memscale bench plan --runs one --steps 2 --set model.d_model=64   # a smaller shape (the tests' smoke run)

Method. The same formula as `memscale plan` (memscale/parallel/plan.py), with this machine's numbers measured in
the same run: the best of several matmul samples (PeakMeter) with 2 threads (the single-process run) and with 1
(each of the two processes of the dp=2 / tp=2 runs, which share the 2 cores), gloo p2p latency and bandwidth and
the all-reduce rate between two local processes, and the memory copy rate (the optimizer step). Then real steps of
`memscale train` (a fresh process each, on the bundled corpus prepared into a temp dir) at the bench shape below;
the measured step time is the trainer's own average over the last `--steps / 2` steps (tokens/step / tokens/s).
The planner's CPU efficiency (`CPU_MFU`, the fraction of the matmul peak a training step reaches) is an assumption,
not fitted: the ratio predicted / measured is the residual it leaves.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import yaml

from memscale.bench import machine_info, now, ping_pong, write_result

# The quickstart model, widened so that one step is compute-bound enough to time (~0.5-1 s on 2 cores).
SHAPE = [
    "model.vocab_size=4096",
    "model.d_model=512",
    "model.num_layers=4",
    "model.num_heads=8",
    "model.memory.kind=rmt",
    "model.memory.num_tokens=8",
    "data.segment_len=256",
    "train.bptt_segments=2",
    "train.memory_grad=truncated",
    "train.eval_every=0",
]

RUNS = {
    # name: (processes, threads per process, overrides)
    "one": (1, 2, ["data.num_streams=4"]),
    "dp2": (2, 1, ["data.num_streams=2", "parallel.zero_stage=1"]),
    "tp2": (2, 1, ["data.num_streams=4", "parallel.tp=2"]),
}


# -- measurements of this machine -------------------------------------------------------------------------------------
def _peak(threads: int, samples: int = 5) -> float:
    import torch

    from memscale.utils.flops import PeakMeter

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        meter = PeakMeter()
        for _ in range(samples):
            meter.sample()
        return meter.best
    finally:
        torch.set_num_threads(before)


def _copy_Bps() -> float:
    """Memory bandwidth as the optimizer sees it: read + write of a 256 MB fp32 buffer, best of 5."""
    import torch

    a = torch.ones(64 * 2**20)
    b = torch.empty_like(a)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = max(best, 2 * a.numel() * 4 / (time.perf_counter() - t0))
    return best


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, port: int, out: str) -> None:
    """Rank 0 and 1 over gloo: ping-pong latency (8 bytes) and bandwidth (16 MB), and all-reduce of 16 MB."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ping_pong(16 * 2**20, 2)  # warm-up
        lat = min(ping_pong(8, 50) for _ in range(3))
        big = 16 * 2**20
        t_big = min(ping_pong(big, 5) for _ in range(3))
        x = torch.ones(big // 4)
        dist.all_reduce(x)
        times = []
        for _ in range(5):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        if rank == 0:
            Path(out).write_text(
                yaml.safe_dump(
                    {
                        "latency_s": lat,
                        "p2p_Bps": big / max(t_big - lat, 1e-9),
                        "allreduce_16MB_s": min(times),
                    }
                )
            )
    finally:
        dist.destroy_process_group()


def measure_gloo() -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "gloo.yaml")
        mp.spawn(_gloo_worker, args=(_free_port(), out), nprocs=2, join=True)
        r = yaml.safe_load(Path(out).read_text())
    # Ring all-reduce over n = 2: 2 (n - 1) / n x bytes / Bps + 2 (n - 1) x latency = bytes / Bps + 2 latency.
    r["allreduce_Bps"] = 16 * 2**20 / max(r["allreduce_16MB_s"] - 2 * r["latency_s"], 1e-9)
    return r


# -- real training steps ----------------------------------------------------------------------------------------------
_DONE = re.compile(r"done: .*\| ([\d.]+) tok/s")


def _train(name: str, data_dir: Path, work: Path, steps: int, shape: list[str]) -> tuple[float, dict]:
    """Run `memscale train` for `steps` steps; the measured seconds per step and the config used."""
    from memscale.config import load_config, to_dict

    nproc, threads, extra = RUNS[name]
    overrides = [
        *shape,
        *extra,
        f"data.dir={data_dir}",
        f"train.max_steps={steps}",
        f"train.log_every={max(1, steps // 2)}",
        f"train.threads={threads}",
        f"train.out_dir={work / name}",
        "train.warmup_steps=1",
    ]
    cfg = load_config(None, overrides)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    cmd = [sys.executable, "-m", "memscale.cli", "train", str(path)]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = {**os.environ}
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/memscale/torch_extensions"))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    m = _DONE.search(r.stdout)
    if r.returncode != 0 or m is None:
        tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
        raise RuntimeError(f"bench plan: the {name} run failed (exit {r.returncode}): {' | '.join(tail)}")
    dp = cfg.parallel.dp or (nproc // cfg.parallel.tp)
    tokens_per_step = cfg.train.bptt_segments * cfg.data.num_streams * cfg.data.segment_len * dp
    return tokens_per_step / float(m.group(1)), {"config": cfg, "nproc": nproc, "threads": threads}


def _predict(cfg, *, nproc: int, peak: float, gloo: dict, copy_Bps: float):
    from memscale.parallel.plan import Cluster, ModelShape, Network, config_layout, cpu_device, estimate

    link = Network("gloo, measured", gloo["allreduce_Bps"], gloo["latency_s"])
    dev = cpu_device(peak_flops=peak, link=link, hbm_Bps=copy_Bps)
    cluster = Cluster.make("cpu", num_gpus=nproc, gpus_per_node=nproc, device=dev)
    shape = ModelShape.from_config(cfg)
    lay = config_layout(cfg)
    if lay.dp * lay.tp != nproc:
        lay = replace(lay, dp=nproc // lay.tp)
    return estimate(shape, lay, cluster, global_streams=cfg.data.num_streams * lay.dp)


def main(args) -> int:
    from memscale.data.prepare import prepare
    from memscale.parallel.plan import CPU_MFU

    runs = [r.strip() for r in args.runs.split(",")]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        raise ValueError(f"--runs {args.runs}: unknown {', '.join(bad)}; choose from {', '.join(RUNS)}")
    print(
        "measuring this machine: matmul peak (2 threads, 1 thread), memory copy, gloo between 2 processes ..."
    )
    peaks = {2: _peak(2), 1: _peak(1)}
    copy_Bps = _copy_Bps()
    gloo = measure_gloo()
    print(
        f"  matmul peak {peaks[2] / 1e9:.0f} GFLOP/s (2 threads), {peaks[1] / 1e9:.0f} (1 thread); copy "
        f"{copy_Bps / 1e9:.1f} GB/s; gloo latency {gloo['latency_s'] * 1e6:.0f} us, p2p "
        f"{gloo['p2p_Bps'] / 1e9:.2f} GB/s, all-reduce {gloo['allreduce_Bps'] / 1e9:.2f} GB/s"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="memscale-bench-plan-") as tmp:
        work = Path(tmp)
        data_dir = work / "data"
        prepare(data_dir, source="bundled", vocab_size=4096)
        for name in runs:
            measured, info = _train(name, data_dir, work, args.steps, [*SHAPE, *args.overrides])
            nproc, threads = info["nproc"], info["threads"]
            # Re-sample the peak right after the run: the rate wanders within minutes (FIELD-NOTES).
            peak = max(peaks[threads], _peak(threads, samples=2))
            peaks[threads] = peak
            e = _predict(info["config"], nproc=nproc, peak=peak, gloo=gloo, copy_Bps=copy_Bps)
            rows.append(
                {
                    "run": name,
                    "layout": str(e.layout),
                    "processes": nproc,
                    "threads_per_process": threads,
                    "predicted_step_s": e.step_s,
                    "measured_step_s": measured,
                    "ratio": e.step_s / measured,
                    "implied_efficiency": CPU_MFU * e.step_s / measured,
                    "predicted_parts_s": e.parts,
                    "matmul_peak_flops": peak,
                }
            )
            print(f"  {name}: predicted {e.step_s:.3f} s, measured {measured:.3f} s")
    print()
    print(
        "| run | layout | processes x threads | predicted s/step | measured s/step | predicted / measured |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['run']} | {r['layout']} | {r['processes']} x {r['threads_per_process']} | "
            f"{r['predicted_step_s']:.3f} | {r['measured_step_s']:.3f} | {r['ratio']:.2f} |"
        )
    result = {
        "bench": "plan",
        "time": now(),
        "machine": machine_info(),
        "shape": [*SHAPE, *args.overrides],
        "steps": args.steps,
        "assumed_cpu_mfu": CPU_MFU,
        "matmul_peak_flops": {str(k): v for k, v in peaks.items()},
        "copy_Bps": copy_Bps,
        "gloo": gloo,
        "runs": rows,
    }
    write_result(result, args.out, "plan")
    return 0
