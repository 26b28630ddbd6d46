"""Benchmarks: each prints a table and writes `bench/results/<name>-<date>.json`."""

from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
from pathlib import Path


def machine_info() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def write_result(result: dict, out_dir: str | Path, name: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{datetime.date.today().isoformat()}.json"
    # Atomically: an earlier result of the same day is replaced whole or not at all.
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(result, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"wrote {path}")
    return path
