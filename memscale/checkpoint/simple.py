"""Single-process checkpoints: everything a run needs to continue exactly, written atomically.

Layout of `<out_dir>/checkpoints/step-000200/`:

    model.safetensors      weights (tied output projection stored once)
    memory.safetensors     the in-flight memory state of every stream, so a resumed run continues mid-document
    optimizer.pt           AdamW state (tensors, numbers, lists only: loaded with weights_only=True)
    rng.safetensors        CPU (and CUDA) generator states
    trainer.json           step, scheduler, loader position, config
    manifest.json          sha256 and size of every file above; written last

A checkpoint is built in a temporary sibling directory, every file fsync'ed, then renamed into place in one
`os.replace`; `latest` (a one-line file) is replaced the same way. A kill at any moment leaves either the old or the
new checkpoint, never a half-written one that `load` would accept.

Sharded checkpoints (megatron-core dist_checkpointing) build on the same `TrainState` gathering.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


@dataclass
class TrainState:
    """What a run needs to continue exactly; gathered in one place by the trainer."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    loader: dict[str, Any]
    memory: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dedup_shared(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share storage (a tied embedding/head): keep one, remember the alias."""
    seen: dict[tuple, str] = {}
    kept, aliases = {}, {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            kept[name] = t.detach().cpu().contiguous()
    return kept, aliases


def rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(ckpt_root: str | os.PathLike, ts: TrainState, *, keep: int = 2) -> Path:
    """Write `ts` to `<ckpt_root>/step-<step>` atomically, point `latest` at it, keep the newest `keep`."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{ts.step:06d}"
    for stale in root.glob(".step-*.tmp-*"):  # left by a writer killed mid-save; one writer per run owns root
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        model, aliases = _dedup_shared(ts.model)
        save_file(model, tmp / "model.safetensors")
        save_file({k: v.contiguous() for k, v in ts.memory.items()}, tmp / "memory.safetensors")
        save_file({k: v.contiguous() for k, v in ts.rng.items()}, tmp / "rng.safetensors")
        torch.save(ts.optimizer, tmp / "optimizer.pt")
        meta = {
            "format_version": FORMAT_VERSION,
            "step": ts.step,
            "scheduler": ts.scheduler,
            "loader": ts.loader,
            "config": ts.config,
            "tied": aliases,
            "extra": ts.extra,
        }
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:
            _fsync_file(tmp / name)
        manifest = {
            name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in files
        }
        (tmp / "manifest.json").write_text(json.dumps({"step": ts.step, "files": manifest}, indent=1))
        _fsync_file(tmp / "manifest.json")
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it as a whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    _fsync_file(latest_tmp)
    os.replace(latest_tmp, root / "latest")
    _fsync_dir(root)
    _prune(root, keep=keep)
    return final


def _prune(root: Path, *, keep: int) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest(ckpt_root: str | os.PathLike) -> Path | None:
    root = Path(ckpt_root)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def verify(path: str | os.PathLike) -> dict:
    """Check every file against the manifest; raise ValueError naming the first bad file."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise ValueError(
            f"checkpoint {path} has no manifest.json: it is incomplete; resume from an earlier one"
        )
    manifest = json.loads(manifest_path.read_text())
    for name, info in manifest["files"].items():
        f = path / name
        if not f.exists() or f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
            raise ValueError(
                f"checkpoint file {f} is missing or corrupt (checksum mismatch): resume from an earlier checkpoint"
            )
    return manifest


def load(path: str | os.PathLike) -> TrainState:
    path = Path(path)
    verify(path)
    meta = json.loads((path / "trainer.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format {meta.get('format_version')}, expected {FORMAT_VERSION}"
        )
    model = load_file(path / "model.safetensors")
    for alias, target in meta["tied"].items():
        model[alias] = model[target]
    return TrainState(
        step=meta["step"],
        model=model,
        optimizer=torch.load(path / "optimizer.pt", weights_only=True),
        scheduler=meta["scheduler"],
        loader=meta["loader"],
        memory=load_file(path / "memory.safetensors"),
        rng=load_file(path / "rng.safetensors"),
        config=meta["config"],
        extra=meta.get("extra", {}),
    )
