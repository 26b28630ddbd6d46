"""Compute precision of a training run: `train.dtype`.

    float32    everything in float32 (the CPU path: bf16 matmuls are ~100x slower on CPUs without AMX/AVX512-BF16)
    bfloat16   the GPU path: matmuls, attention and the fused kernels in bf16 under `torch.autocast`, while the
               weights, their gradients, the optimizer state and the memory state stay float32

Why autocast and not a bf16 copy of the model: one mechanism serves every layout (one process, tensor, data and
pipeline parallel, ZeRO 0-3), and the weights the optimizer updates are the float32 masters themselves, so there
is no second copy to keep in step. Per parameter the bytes are the same as DeepSpeed's bf16 mode (4 weight + 4
gradient + 8 Adam here, against 2 + 2 + 12 there); the cost is that data-parallel gradients are reduced in float32
(twice the bytes on the wire).

Where a kind accumulates across segments its state stays float32: `MemoryTransformer.step` and the pipeline runtime
hand each new state back in the dtype it came in with (lamemo's log-normaliser and ∞-former's coefficients would
otherwise drift by bf16 rounding every segment), and autocast keeps reductions such as LayerNorm, softmax and the
loss in float32 by its own rules.
"""

from __future__ import annotations

import contextlib

import torch


def autocast(dtype: str, device: torch.device | str):
    """The context a training or evaluation forward runs in for `train.dtype` = `dtype` on `device`; backward
    and replay recomputation need nothing more (autograd and torch.utils.checkpoint restore the autocast state)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype != "bfloat16":
        raise ValueError(f"train.dtype={dtype!r} is not one of float32, bfloat16")
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
