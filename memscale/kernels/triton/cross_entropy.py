"""Softmax cross-entropy of a chunk of logits and its gradient, in one Triton kernel, in place.

One program per row, two passes over the vocabulary in blocks of BLOCK_V (the last one masked):
  1. online max and normaliser (m, z), so lse = m + log z with one read of the row;
  2. d(loss)/d(logits) = softmax - onehot(target) = exp(logits - lse) - onehot, written over the logits.
The loss (lse - logit of the target) and lse are written per row; rows whose target is IGNORE_INDEX get loss 0
and a zero gradient. The chunk's logits are never kept for a backward pass: backward only scales the gradient
this pass wrote, as in Liger-Kernel's fused linear cross-entropy (linkedin/Liger-Kernel,
`ops/cross_entropy.py`: the gradient is computed in the forward kernel and stored in the logits' buffer). The
torch path of memscale/kernels/cross_entropy.py does the same with four in-place torch passes.

Legend: N rows, V vocabulary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_BLOCK_V = 4096
"""Widest vocabulary block a program loads at once (16 KB of fp32 per row block; V=16000 takes four)."""


@triton.jit
def _ce_loss_grad_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    loss_ptr,
    lse_ptr,
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    y = tl.load(targets_ptr + row)
    # Pass 1: running max m and normaliser z = sum(exp(x - m)); the first block has at least one valid entry,
    # so m is finite from there on and the masked tail adds exp(-inf) = 0.
    m = tl.full((), float("-inf"), tl.float32)
    z = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(z)
    valid = y != ignore_index
    y_safe = tl.where(valid, y, 0)
    picked = tl.load(row_ptr + y_safe).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
    tl.store(lse_ptr + row, lse)
    if WRITE_GRAD:
        keep = tl.where(valid, 1.0, 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(cols == y_safe, 1.0, 0.0)) * keep
            tl.store(row_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)


def cross_entropy_loss_grad_(
    logits_NV: Tensor, targets_N: Tensor, *, ignore_index: int, write_grad: bool, block_v: int | None = None
) -> tuple[Tensor, Tensor]:
    """Per-row loss and log-normaliser (float32, N each) of `logits_NV` against `targets_N`; with `write_grad`
    the logits are overwritten by d(loss_n)/d(logits_n) (softmax - onehot; zero on ignored rows).

    `logits_NV` must have unit stride along V (a chunk of `h @ W.T` has); `block_v` (a power of two) overrides
    the vocabulary block, so that tests can cover several blocks and a masked tail at a small V.
    """
    N, V = logits_NV.shape
    if logits_NV.stride(1) != 1:
        raise ValueError("cross_entropy_loss_grad_: the logits need unit stride along the vocabulary")
    block = block_v or min(triton.next_power_of_2(V), MAX_BLOCK_V)
    loss_N = torch.empty(N, dtype=torch.float32, device=logits_NV.device)
    lse_N = torch.empty(N, dtype=torch.float32, device=logits_NV.device)
    if N:
        _ce_loss_grad_kernel[(N,)](
            logits_NV,
            logits_NV.stride(0),
            targets_N.contiguous(),
            loss_N,
            lse_N,
            V,
            ignore_index,
            BLOCK_V=block,
            WRITE_GRAD=write_grad,
            num_warps=8 if block >= 2048 else 4,
        )
    return loss_N, lse_N
