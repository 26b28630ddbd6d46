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
