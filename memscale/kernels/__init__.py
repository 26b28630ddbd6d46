"""Fused and memory-lean kernels, each with a plain PyTorch reference and a test against it.

Two backends compute the same functions:
  - "torch": plain PyTorch (the chunked cross-entropy of cross_entropy.py is fused by hand in torch ops), on any
    device; the reference and the CPU path;
  - "triton": Triton kernels (memscale/kernels/triton/), compiled for CUDA. On CPU they run only under Triton's
    interpreter (`TRITON_INTERPRET=1`), which is how the tests check them without a GPU.

`backend(device)` says which one a call on `device` uses: the process-wide choice set by `set_backend` from
`train.kernels` (auto | torch | triton; the trainer calls it), where auto means triton on CUDA when triton imports
and torch otherwise. Each kernel entry point (`fused_linear_cross_entropy`, `gaussian_read`, `slot_attention`)
asks it on every call.

What runs through a Triton kernel (each beside its torch reference):
  - the chunked linear cross-entropy's per-chunk softmax, loss, log-normaliser and d(loss)/d(logits) in one
    kernel (cross_entropy.py, triton/cross_entropy.py);
  - the ∞-former's Gaussian read against its basis, forward and backward (gaussian_read.py,
    triton/gaussian_read.py);
  - Memformer's slot-attention write, forward and backward (slot_attention.py, triton/slot_attention.py).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

CHOICES = ("auto", "torch", "triton")
_choice = "auto"


def interpreting() -> bool:
    """True under Triton's CPU interpreter (`TRITON_INTERPRET=1`, read when a kernel module is imported)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def set_backend(choice: str) -> None:
    """The process-wide kernel backend: `train.kernels` (auto | torch | triton)."""
    from memscale.config import ConfigError

    global _choice
    if choice not in CHOICES:
        raise ConfigError(f"train.kernels={choice!r} must be one of auto, torch, triton")
    if choice == "triton" and not triton_importable():
        raise ConfigError(
            "train.kernels=triton but triton does not import: pip install 'memscale[kernels]', "
            "or set train.kernels=auto"
        )
    _choice = choice


def get_backend_choice() -> str:
    return _choice


@contextmanager
def use_backend(choice: str) -> Iterator[None]:
    """Run a block with another backend choice (tests, benchmarks), restoring the previous one after."""
    before = _choice
    set_backend(choice)
    try:
        yield
    finally:
        set_backend(before)


def backend(device) -> str:
    """The backend ("torch" or "triton") that a kernel call on `device` (a torch.device or a string) uses."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    if _choice == "torch":
        return "torch"
    if _choice == "auto":
        return "triton" if kind == "cuda" and triton_importable() else "torch"
    if kind != "cuda" and not interpreting():
        raise ValueError(
            f"train.kernels=triton on a {kind} tensor: the Triton kernels compile for CUDA; set "
            "train.kernels=auto or torch (on CPU they run only under TRITON_INTERPRET=1, for tests)"
        )
    return "triton"
