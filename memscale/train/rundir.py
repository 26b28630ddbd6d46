"""One writer per run directory: an exclusive lock on `train.out_dir`, and the refusal to write into a non-empty one.

The lock is `flock` on `<out_dir>/.lock`, which holds the owner's PID and host. The kernel releases it when the
process ends, however it ends (kill -9 included), so a dead run never blocks the next one; the file itself stays
(removing it would let a second process lock a fresh inode while a third still holds the old one). In a
multi-process run only global rank 0 takes it: the other ranks write through their rank-0 peer's directory or
into per-rank files that the lock already covers.

flock is advisory and local to one machine's kernel (and to NFS servers that support it): it keeps two memscale
runs apart, not other programs.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from memscale.config import ConfigError

LOCK_NAME = ".lock"


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return "another process"
    return text or "another process"


def _busy(out_dir: Path, holder: str) -> ConfigError:
    return ConfigError(
        f"train.out_dir={out_dir} is in use by another memscale run ({holder}): wait for it to end, "
        "or choose another train.out_dir"
    )


def locked_by_other(out_dir: Path) -> str | None:
    """Who holds the lock of `out_dir` (e.g. "pid 4242 on node-1"), or None when nobody does. Creates nothing."""
    path = out_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(path)
    finally:
        os.close(fd)  # closing releases a lock this probe may have taken
    return None


def check_out_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a directory that another run holds, or that holds files this run was not told it may touch."""
    holder = locked_by_other(out_dir)
    if holder is not None:
        raise _busy(out_dir, holder)
    if resume or overwrite or not out_dir.exists():
        return
    if any(p.name != LOCK_NAME for p in out_dir.iterdir()):
        raise ConfigError(
            f"train.out_dir={out_dir} already holds files: pass --resume to continue that run, "
            "choose another train.out_dir, or set train.overwrite=true"
        )


class RunLock:
    """Exclusive ownership of a run directory for the life of the process (or until `release`)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(self.out_dir, _holder(self.path)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
