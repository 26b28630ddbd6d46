"""Single-process checkpoints: everything a run needs to continue exactly, written atomically.

Layout of `<out_dir>/checkpoints/step-000200/`:

    model.safetensors      weights (tied output projection stored once)
    memory.safetensors     the in-flight memory state of every stream, so a resumed run continues mid-document
    history.safetensors    with a sliding BPTT depth only: the segments the next step runs again (bptt.History)
    optimizer.pt           AdamW state (tensors, numbers, lists only: loaded with weights_only=True)
    rng.safetensors        CPU (and CUDA) generator states
    trainer.json           step, scheduler, loader position, config
    manifest.json          sha256 and size of every file above; written last

A checkpoint is built in a temporary sibling directory, every file fsync'ed, then renamed into place in one
`os.replace`; `latest` (a one-line file) is replaced the same way. A kill at any moment leaves either the old or the
new checkpoint, never a half-written one that `load` would accept. Re-saving a step that already exists swaps the
two directories in one atomic `renameat2(RENAME_EXCHANGE)`, so `latest` never names a missing directory.

Only finite weights and optimizer state are written (`NonFiniteError` otherwise): a diverging run cannot replace
or prune good checkpoints with NaN ones. Names read back from disk (`latest`, manifest entries) must be plain
names inside the checkpoint folder; anything else is refused with the file named.

Sharded checkpoints (megatron-core dist_checkpointing) build on the same `TrainState` gathering.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"step-(\d{6,})")
"""Checkpoint directory names: `step-` and the step number, zero-padded to at least six digits."""


class NonFiniteError(ValueError):
    """A tensor to be checkpointed holds NaN or inf; nothing was written."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def step_of(path: str | os.PathLike) -> int | None:
    """The step number of a checkpoint directory name, or None when the name is not one."""
    m = STEP_DIR.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoints(ckpt_root: str | os.PathLike) -> list[Path]:
    """Checkpoint directories under `ckpt_root`, oldest first by step number (not by name: step 1,000,000 sorts
    after 999,999 although its name is longer)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def has_any(ckpt_root: str | os.PathLike) -> bool:
    """Whether `ckpt_root` holds anything `--resume` could start from: a checkpoint directory or a `latest`
    pointer (even a damaged one, which `load_for_resume` reports rather than this function hiding it)."""
    root = Path(ckpt_root)
    return bool(checkpoints(root)) or (root / "latest").exists()


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
    history: dict[str, torch.Tensor] = field(default_factory=dict)
    """Sliding BPTT depth: `History.state_dict()` (memscale/train/bptt.py); empty otherwise, and not written."""


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


def _first_non_finite(tree: Any, prefix: str) -> str | None:
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            return prefix
        return None
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return None
    for k, v in items:
        bad = _first_non_finite(v, f"{prefix}.{k}")
        if bad is not None:
            return bad
    return None


def check_finite(ts: TrainState) -> None:
    """Raise NonFiniteError naming the first weight or optimizer tensor that holds NaN or inf."""
    for part in ("model", "optimizer", "memory", "history"):
        bad = _first_non_finite(getattr(ts, part), part)
        if bad is not None:
            raise NonFiniteError(f"step {ts.step}: {bad} holds NaN or inf: not written")


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where the OS or the file
    system cannot (the caller then falls back to two renames). Python's os module does not expose it."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def new_temp(ckpt_root: str | os.PathLike, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of `step`, after removing those of writers killed mid-save.
    One writer per run owns the folder (the run lock, memscale/train/rundir.py); in a multi-process run rank 0
    calls this and every rank writes its part into the directory before rank 0's `save(..., into=tmp)`."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(".step-*.tmp-*"), *root.glob(".step-*.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{step_dir_name(step)}.tmp-", dir=root))


def save(
    ckpt_root: str | os.PathLike, ts: TrainState, *, keep: int = 2, into: str | os.PathLike | None = None
) -> Path:
    """Write `ts` to `<ckpt_root>/step-<step>` atomically, point `latest` at it, keep the newest `keep` (by step
    number; the one just written is always kept). Raises NonFiniteError, writing nothing, when a weight, an
    optimizer tensor or the memory holds NaN or inf."""
    try:
        check_finite(ts)
    except NonFiniteError:
        if into is not None:
            shutil.rmtree(into, ignore_errors=True)
        raise
    root = Path(ckpt_root)
    final = root / step_dir_name(ts.step)
    # `into`: a temp dir from new_temp() that other ranks have already written their parts into.
    tmp = Path(into) if into is not None else new_temp(root, ts.step)
    try:
        model, aliases = _dedup_shared(ts.model)
        save_file(model, tmp / "model.safetensors")
        save_file({k: v.contiguous() for k, v in ts.memory.items()}, tmp / "memory.safetensors")
        save_file({k: v.contiguous() for k, v in ts.rng.items()}, tmp / "rng.safetensors")
        if ts.history:
            save_file({k: v.contiguous() for k, v in ts.history.items()}, tmp / "history.safetensors")
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
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        for name in files:
            _fsync_file(tmp / name)
        for sub in {(tmp / name).parent for name in files} - {tmp}:
            _fsync_dir(sub)
        manifest = {
            name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in files
        }
        (tmp / "manifest.json").write_text(json.dumps({"step": ts.step, "files": manifest}, indent=1))
        _fsync_file(tmp / "manifest.json")
        _fsync_dir(tmp)
        if not final.exists():
            os.replace(tmp, final)
        # Re-saving a step (e.g. preempted right after a resume): swap the two directories, drop the old one.
        elif _exchange(tmp, final):
            shutil.rmtree(tmp)
        else:  # no atomic exchange here: `final` is missing between these two renames
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=root))
            os.replace(final, old / "ckpt")
            os.replace(tmp, final)
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    _fsync_file(latest_tmp)
    os.replace(latest_tmp, root / "latest")
    _fsync_dir(root)
    _prune(root, keep=keep, current=final)
    return final


def _prune(root: Path, *, keep: int, current: Path) -> None:
    for old in checkpoints(root)[:-keep] if keep > 0 else []:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def latest_name(ckpt_root: str | os.PathLike) -> str | None:
    """What `<ckpt_root>/latest` names, checked to be a checkpoint directory name inside the folder; None when
    there is no `latest`."""
    pointer = Path(ckpt_root) / "latest"
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (UnicodeDecodeError, OSError) as e:
        raise ValueError(
            f"{pointer} cannot be read ({type(e).__name__}): delete it and resume with --resume-from STEP"
        ) from None
    if STEP_DIR.fullmatch(name) is None:
        shown = name[:40] + ("..." if len(name) > 40 else "")
        raise ValueError(
            f"{pointer} holds {shown!r}, not a checkpoint name like step-000300: "
            "delete it and resume with --resume-from STEP"
        )
    return name


def latest(ckpt_root: str | os.PathLike) -> Path | None:
    """The directory `latest` names, or None when there is no `latest` or it names a missing directory."""
    name = latest_name(ckpt_root)
    if name is None:
        return None
    path = Path(ckpt_root) / name
    return path if path.is_dir() else None


def _read_json(path: Path, *, fix: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not valid JSON: {fix}") from None


def verify(path: str | os.PathLike) -> dict:
    """Check every file against the manifest; raise ValueError naming the first bad file."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise ValueError(
            f"checkpoint {path} has no manifest.json: it is incomplete; resume from an earlier one"
        )
    fix = "the checkpoint is damaged; resume from another one (--resume-from STEP)"
    manifest = _read_json(manifest_path, fix=fix)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ValueError(f"{manifest_path} has no file list: {fix}")
    for name, info in files.items():
        parts = PurePosixPath(name).parts if isinstance(name, str) else ()
        if not parts or name.startswith("/") or any(x in (".", "..") for x in parts) or "\\" in name:
            raise ValueError(
                f"{manifest_path} lists {name!r}, which is not a file inside the checkpoint: {fix}"
            )
        if not isinstance(info, dict) or not {"bytes", "sha256"} <= set(info):
            raise ValueError(f"{manifest_path} entry {name!r} has no size and checksum: {fix}")
        f = path / name
        if not f.exists() or f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
            raise ValueError(
                f"checkpoint file {f} is missing or corrupt (checksum mismatch): resume from an earlier checkpoint"
            )
    return manifest


def load(path: str | os.PathLike) -> TrainState:
    path = Path(path)
    files = verify(path)["files"]
    meta = _read_json(
        path / "trainer.json", fix="the checkpoint is damaged; resume from another one (--resume-from STEP)"
    )
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(
            f"{path / 'trainer.json'} has format {version}, expected {FORMAT_VERSION}: "
            "it was written by another memscale version"
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
        history=load_file(path / "history.safetensors") if "history.safetensors" in files else {},
    )


def load_weights(model: torch.nn.Module, path: str | os.PathLike, weights: dict[str, torch.Tensor]) -> None:
    """`model.load_state_dict(weights)` for the checkpoint at `path`, with a one-line error naming its files when
    the weights do not fit the model its config describes."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        path = Path(path)
        first = str(e).strip().splitlines()[-1].strip()[:160]
        raise ValueError(
            f"{path / 'model.safetensors'} does not fit the model described by {path / 'trainer.json'} ({first}): "
            "it was written by another memscale version or edited; use another checkpoint"
        ) from None


def load_for_resume(ckpt_root: str | os.PathLike, *, say=print) -> tuple[Path, TrainState]:
    """The checkpoint `--resume` continues from: the one `latest` names when it loads, verifies and is finite,
    otherwise the newest (by step) that does. Every checkpoint passed over is reported through `say` with the
    reason; ValueError when none is usable."""
    root = Path(ckpt_root)
    candidates = list(reversed(checkpoints(root)))
    try:
        named = latest_name(root)
    except ValueError as e:
        say(f"resume: ignoring {e}")
        named = None
    if named is not None:
        if (root / named).is_dir():
            candidates.remove(root / named)
            candidates.insert(0, root / named)
        else:
            say(f"resume: {root / 'latest'} names {named}, which does not exist")
    if not candidates:
        raise ValueError(f"--resume: no checkpoint under {root}: start without --resume")
    for path in candidates:
        try:
            ts = load(path)
            check_finite(ts)
        except (ValueError, OSError) as e:
            say(f"resume: skipping {path.name}: {e}")
            continue
        return path, ts
    raise ValueError(
        f"--resume: none of the {len(candidates)} checkpoints under {root} is usable (see the lines above): "
        "start a new run"
    )


def resolve(ckpt_root: str | os.PathLike, step_or_path: str) -> Path:
    """`--resume-from` argument -> checkpoint directory: a step number (`300`) of this run, or a path."""
    text = str(step_or_path).strip()
    path = Path(ckpt_root) / step_dir_name(int(text)) if text.isdigit() else Path(text)
    if not (path / "manifest.json").is_file():
        have = ", ".join(str(step_of(p)) for p in checkpoints(ckpt_root)) or "none"
        raise ValueError(
            f"--resume-from {text}: {path} is not a checkpoint (steps available under {ckpt_root}: {have})"
        )
    return path
