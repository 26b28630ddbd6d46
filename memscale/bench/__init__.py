"""Benchmarks: each prints a table and writes `bench/results/<name>-<date>.json`."""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

from memscale.utils.files import write_text_atomic


def machine_info() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def ping_pong(nbytes: int, rounds: int) -> float:
    """One-way time of a message of `nbytes` between ranks 0 and 1 of the default process group, measured by
    rank 0 over `rounds` round trips and returned on every rank (the other ranks wait at the barriers). Used by
    the pipeline bench (p2p cost of its activation message) and the planner bench (latency and bandwidth)."""
    import time

    import torch
    import torch.distributed as dist

    x = torch.zeros(max(nbytes // 4, 1))
    rank = dist.get_rank()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(rounds):
        if rank == 0:
            dist.send(x, 1)
            dist.recv(x, 1)
        elif rank == 1:
            dist.recv(x, 0)
            dist.send(x, 0)
    box = [(time.perf_counter() - t0) / (2 * rounds)]
    dist.barrier()
    dist.broadcast_object_list(box, src=0)
    return box[0]


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def write_result(result: dict, out_dir: str | Path, name: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{datetime.date.today().isoformat()}.json"
    # Atomically: an earlier result of the same day is replaced whole or not at all.
    write_text_atomic(path, json.dumps(result, indent=1))
    print(f"wrote {path}")
    return path
