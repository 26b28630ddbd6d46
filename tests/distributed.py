"""Run a function in N real processes (spawned, gloo) and collect what each returns.

    results = run_distributed(worker, 2, arg)     # results[rank] = worker(arg) in process `rank`

Each process gets the environment torchrun would give it (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT on a free
port), one intra-op thread, and TORCH_EXTENSIONS_DIR pointing at the shared cache of DeepSpeed's JIT ops. A worker
that raises fails the test with its traceback; a worker that hangs is killed after `timeout` seconds.
"""

from __future__ import annotations

import os
import queue
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from memscale.parallel.dims import free_port

EXTENSIONS_DIR = os.path.expanduser("~/.cache/memscale/torch_extensions")


def _entry(fn: Callable, rank: int, world_size: int, port: int, results: Any, args: tuple, env: dict) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
    )
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS_DIR)
    os.environ.update(env)
    try:
        import torch

        torch.set_num_threads(1)
        out = fn(*args)
        results.put((rank, True, out))
    except BaseException:  # the parent reports it; a worker must never die silently
        results.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable, world_size: int, *args: Any, timeout: float = 240.0, env: dict | None = None
) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, world_size, port, results, args, env or {}), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: list[str] = []
    try:
        while len(out) + len(errors) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(
                    f"{world_size - len(out)} worker(s) gave no result within {timeout} s"
                ) from None
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break  # the others may now wait forever in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [out[r] for r in range(world_size)]
