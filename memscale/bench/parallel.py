"""Training on several processes: tokens/s and memory per rank for tp 1/2, dp 1/2 and ZeRO 0/1/2/3.

    memscale bench parallel                       # the quick start's model, 10 timed steps per layout
    memscale bench parallel --steps 4 --set model.d_model=128

Every layout runs the real `Trainer` loop (`memscale train` without the terminal), one thread per process, on the
bundled corpus: one process; tp=2; dp=2 with ZeRO 0, 1, 2 and 3. Each rank times its optimizer steps after
`--warmup` untimed ones, and counts the bytes it holds at the peak of a step, right before the optimizer update
(weights, gradients, optimizer state, DeepSpeed's buffers): a census of every live tensor's storage, each storage
once (the gc finds the Python-held tensors, and each parameter's `.grad`), so it measures what the engine
allocated, not a formula. Peak RSS per rank is reported beside it (it includes the ~0.5 GB of Python, torch,
megatron-core and DeepSpeed, which the census leaves out).

The expected ZeRO saving per rank against ZeRO-0 on the same dp, for fp32 AdamW (P parameters, 16 bytes each: 4
weight, 4 gradient, 8 moments), is the ZeRO paper's: stage 1 shards the moments, 8P(1 - 1/dp); stage 2 also the
gradients, 12P(1 - 1/dp); stage 3 also the weights, 16P(1 - 1/dp). DeepSpeed keeps one more fp32 copy of each
rank's partition (`single_partition_of_fp32_groups`, `fp32_partitioned_groups_flat`: the master weights of mixed
precision, cloned even when the model is fp32), 4P/dp per rank from stage 1 on; the table prints both.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memscale.bench import machine_info, now, write_result

LAYOUTS = [  # (name, processes, overrides)
    ("1 process", 1, []),
    ("tp=2", 2, ["parallel.tp=2"]),
    ("dp=2 ZeRO-0", 2, ["parallel.zero_stage=0"]),
    ("dp=2 ZeRO-1", 2, ["parallel.zero_stage=1"]),
    ("dp=2 ZeRO-2", 2, ["parallel.zero_stage=2"]),
    ("dp=2 ZeRO-3", 2, ["parallel.zero_stage=3"]),
]


# -- in each rank -------------------------------------------------------------------------------------------------
def live_tensor_bytes(optimizer=None) -> dict[str, int]:
    """Bytes of every live tensor storage reachable from Python, each storage once, by what holds it: "weights"
    (a parameter's storage: DeepSpeed's flat buffers that parameters view included), "grads" (a parameter's
    `.grad`), "optimizer" (the state of the torch optimizer inside `optimizer`'s wrappers), "other" (DeepSpeed's
    partitions and buckets, data, everything else)."""
    import torch

    owner: dict[int, tuple[str, int]] = {}
    rank = {"weights": 0, "grads": 1, "optimizer": 2, "other": 3}

    def add(t, what: str) -> None:
        if t is None or not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # storage-less tensors: none here
            return
        ptr = s.data_ptr()
        if not ptr:
            return
        old = owner.get(ptr)
        if old is None or rank[what] < rank[old[0]]:
            owner[ptr] = (what, max(s.nbytes(), old[1] if old else 0))

    inner = optimizer
    while inner is not None and not isinstance(inner, torch.optim.Optimizer):
        inner = getattr(inner, "optimizer", None)
    if inner is not None:
        for state in inner.state.values():
            for v in state.values():
                add(v, "optimizer")
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Parameter):
            add(obj, "weights")
            add(obj.grad, "grads")
        elif isinstance(obj, torch.Tensor):
            add(obj, "other")
    out = dict.fromkeys(rank, 0)
    for what, n in owner.values():
        out[what] += n
    out["total"] = sum(out[k] for k in rank)
    return out


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(spec: dict) -> None:
    """One rank: train `spec["steps"]` optimizer steps, record step times and the peak live bytes."""
    import torch

    from memscale.config import config_from_dict
    from memscale.train.trainer import Trainer

    torch.set_num_threads(1)
    cfg = config_from_dict(spec["config"], spec["overrides"])
    import deepspeed  # noqa: F401 - imported (as every layout but one imports it) before the RSS baseline
    import megatron.core  # noqa: F401

    rss_before = _rss_now()
    trainer = Trainer(cfg, log=lambda _: None)
    marks: list[float] = []
    peak: dict[str, int] = {}

    def measured(step):
        def run(*a, **k):
            # After backward, before the update: gradients are live (the largest steady point of a step).
            now_bytes = live_tensor_bytes(trainer.optimizer)
            if now_bytes["total"] > peak.get("total", -1):
                peak.update(now_bytes)
            out = step(*a, **k)
            marks.append(time.perf_counter())
            return out

        return run

    if trainer.dist is None:
        trainer.optimizer.step = measured(trainer.optimizer.step)
    else:
        trainer.dist.step = measured(trainer.dist.step)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    warm = spec["warmup"]
    timed = marks[warm:]
    result = {
        "rank": rank,
        "num_params": trainer.num_params,
        "step_seconds": (timed[-1] - marks[warm - 1]) / len(timed) if warm and timed else float("nan"),
        "peak_tensor_bytes": peak["total"],
        "tensor_bytes_by_holder": peak,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_growth_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before,
    }
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(result))


# -- the driver ---------------------------------------------------------------------------------------------------
def expected_saving(stage: int, num_params: int, dp: int) -> tuple[int, int]:
    """(the ZeRO paper's saving per rank against stage 0, DeepSpeed's with its fp32 partition copy), in bytes."""
    per = {0: 0, 1: 8, 2: 12, 3: 16}[stage]
    paper = int(per * num_params * (1 - 1 / dp))
    return paper, paper - (int(4 * num_params / dp) if stage else 0)


def _run_layout(name, nproc, overrides, *, base, data_dir, steps, warmup, work: Path) -> list[dict]:
    out = work / name.replace(" ", "_").replace("=", "")
    out.mkdir(parents=True)
    spec = {
        "config": base,
        "overrides": [
            f"data.dir={data_dir}",
            f"train.max_steps={steps + warmup}",
            "train.eval_every=0",
            "train.save_every=0",
            f"train.log_every={steps + warmup}",
            "train.threads=1",
            f"train.out_dir={out / 'run'}",
            *overrides,
        ],
        "steps": steps,
        "warmup": warmup,
        "out": str(out),
    }
    code = "import json, sys\nfrom memscale.bench.parallel import worker\nworker(json.loads(sys.argv[1]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-c", code, json.dumps(spec)]
    else:
        script = out / "worker.py"
        script.write_text(code)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        cmd += [str(script), json.dumps(spec)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stdout + r.stderr)[-2000:]
        raise RuntimeError(f"layout {name!r} failed (exit {r.returncode}):\n{tail}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def _data_dir(given: str | None, vocab: int) -> str:
    if given:
        return given
    from memscale.data.prepare import prepare

    cache = Path(os.path.expanduser("~/.cache/memscale/bench-data")) / f"bundled-{vocab}"
    if not (cache / "meta.json").exists():
        prepare(cache, source="bundled", vocab_size=vocab, overwrite=True)
    return str(cache)


def main(args) -> int:
    import yaml

    from memscale.config import config_from_dict

    base = yaml.safe_load(Path(args.config).read_text())
    cfg = config_from_dict(base, args.overrides)  # a bad key stops here, before any process starts
    overrides = list(args.overrides)
    data_dir = _data_dir(args.data_dir, cfg.model.vocab_size)
    print(
        f"bench parallel: {cfg.model.memory.kind}, d_model {cfg.model.d_model}, {cfg.model.num_layers} layers, "
        f"{cfg.data.num_streams} streams x {cfg.train.bptt_segments} segments x {cfg.data.segment_len} tokens "
        f"per rank per step; {args.warmup} + {args.steps} steps per layout, one thread per process",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="memscale-bench-parallel-") as tmp:
        for name, nproc, extra in LAYOUTS:
            t0 = time.perf_counter()
            ranks = _run_layout(
                name,
                nproc,
                [*overrides, *extra],
                base=base,
                data_dir=data_dir,
                steps=args.steps,
                warmup=args.warmup,
                work=Path(tmp),
            )
            dp = nproc if "dp=" in name else 1
            tokens = cfg.data.num_streams * cfg.train.bptt_segments * cfg.data.segment_len * dp
            step_s = max(r["step_seconds"] for r in ranks)  # the slowest rank paces the step
            rows.append(
                {
                    "layout": name,
                    "processes": nproc,
                    "dp": dp,
                    "zero_stage": int(name[-1]) if "ZeRO" in name else None,
                    "num_params": ranks[0]["num_params"],
                    "step_seconds": step_s,
                    "tokens_per_s": tokens / step_s,
                    "peak_tensor_bytes_per_rank": max(r["peak_tensor_bytes"] for r in ranks),
                    "tensor_bytes_by_holder_rank0": ranks[0]["tensor_bytes_by_holder"],
                    "peak_rss_bytes_per_rank": max(r["peak_rss_bytes"] for r in ranks),
                    "peak_rss_growth_bytes_per_rank": max(r["peak_rss_growth_bytes"] for r in ranks),
                    "wall_seconds": time.perf_counter() - t0,
                }
            )
            print(f"  {name}: {tokens / step_s:,.0f} tokens/s", flush=True)
    one = rows[0]
    zero0 = next(r for r in rows if r["zero_stage"] == 0)
    for r in rows:
        r["speedup_vs_one_process"] = r["tokens_per_s"] / one["tokens_per_s"]
        if r["zero_stage"] is not None:
            paper, ds = expected_saving(r["zero_stage"], r["num_params"], r["dp"])
            measured = zero0["peak_tensor_bytes_per_rank"] - r["peak_tensor_bytes_per_rank"]
            r["measured_rss_saving_bytes"] = (
                zero0["peak_rss_growth_bytes_per_rank"] - r["peak_rss_growth_bytes_per_rank"]
            )
            r.update(
                expected_saving_bytes=paper,
                expected_saving_deepspeed_bytes=ds,
                measured_saving_bytes=measured,
                measured_over_expected=measured / paper if paper else None,
                measured_over_deepspeed=measured / ds if ds else None,
            )
    print()
    print(
        f"{'layout':<13} {'tokens/s':>9} {'x 1 proc':>8} {'MB/rank':>8} {'W/G/O/other MB':>22} {'RSS+ MB':>8} "
        f"{'saving':>7} {'RSS sav':>7} {'paper':>6} {'ratio':>6} {'DS exp':>6} {'ratio':>6}"
    )
    mb = 1 / 2**20
    for r in rows:
        h = r["tensor_bytes_by_holder_rank0"]
        split = "/".join(f"{h[k] * mb:.1f}" for k in ("weights", "grads", "optimizer", "other"))
        line = (
            f"{r['layout']:<13} {r['tokens_per_s']:>9,.0f} {r['speedup_vs_one_process']:>7.2f}x "
            f"{r['peak_tensor_bytes_per_rank'] * mb:>8.1f} {split:>22} {r['peak_rss_growth_bytes_per_rank'] * mb:>8.1f}"
        )
        if r.get("expected_saving_bytes"):
            line += (
                f" {r['measured_saving_bytes'] * mb:>7.1f} {r['measured_rss_saving_bytes'] * mb:>7.1f}"
                f" {r['expected_saving_bytes'] * mb:>6.1f} {r['measured_over_expected']:>6.2f}"
                f" {r['expected_saving_deepspeed_bytes'] * mb:>6.1f} {r['measured_over_deepspeed']:>6.2f}"
            )
        print(line)
    print(
        "MB/rank: live tensors at the step's peak (weights/grads/optimizer state/other); RSS+: peak RSS growth "
        "over the process after imports; saving: against dp=2 ZeRO-0; paper: the ZeRO paper's expected saving; "
        "DS exp: with DeepSpeed's fp32 partition copy (4P/dp)"
    )
    result = {
        "benchmark": "parallel",
        "date": now(),
        "machine": machine_info(),
        "config": args.config,
        "overrides": overrides,
        "steps": args.steps,
        "warmup": args.warmup,
        "rows": rows,
    }
    write_result(result, args.out, "parallel")
    return 0
