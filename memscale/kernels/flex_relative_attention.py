"""Relative-position attention by FlexAttention (`model.attention=flex`), the GPU path: the same score, mask and
outputs as the blockwise kernel (memscale/kernels/relative_attention.py, whose docstring defines them), computed by
`torch.nn.attention.flex_attention`, compiled into one fused attention kernel for forward and one for backward.

How the score maps onto FlexAttention. FlexAttention computes softmax(scale * q k^T + score_mod) with score_mod a
pointwise function of (score, batch, head, query index, key index), and skips whole tiles that `mask_mod` hides.
Transformer-XL's position term BD_ij = qv_i . r[dist(i, j)] is a dot product per (query, distance), which a
pointwise function cannot form, so it is formed first, as one GEMM over every (query, distance) pair,

    raw[b, h, i, n] = scale * qv[b, h, i] . r[n, h]            (B x H x Q x R, "raw": before the shift)

and score_mod reads it at the pair's distance: raw[b, h, i, R - 1 - dist(i, j)] (the table is in descending
distance order). That is Transformer-XL's own first step (the BD matrix before `rel_shift`), but the shift, the
mask, the softmax and P v are fused: the scores and probabilities are never written out, and backward recomputes
them per tile from the saved log-sum-exp (FlashAttention's scheme, FlexAttention's backward). The gradient of
`raw` flows back through the GEMM to qv and r: FlexAttention differentiates captured tensors since torch 2.6 (its
backward kernel scatters d score into them with atomic adds; each entry of `raw` is read by at most one visible
(query, key) pair and hidden pairs add zero, so the gradient does not depend on the order of the adds, as
activation checkpointing and memory replay need). What is kept for
backward beyond q, k, v and the output is `raw` itself: one B x H x Q x R tensor in the compute dtype (bf16 on the
GPU path), where the reference path keeps about six float tensors of that size and the blockwise kernel one
(its probabilities).

Mask: key j is visible to query i iff 0 <= dist(i, j) (and dist < window, with a window) and key_valid[b, j];
out-of-range distances of hidden pairs are clamped before the read, so no index leaves the table.

Why not the blockwise kernel on GPU: it launches a dozen small kernels per block of 64 queries (the band matmul,
the strided placement, the in-place softmax), which suits CPU caches but not a GPU. Why not a hand-written Triton
kernel: FlexAttention generates exactly that kernel (tiles, online softmax, block skipping) from the two functions
below, and its backward too.

Limits: FlexAttention runs compiled; on CPU torch 2.13 compiles inference only (no backward, no log-sum-exp), so
training with `model.attention=flex` needs CUDA (config check), and the CPU tests check the forward output against
the blockwise kernel under no_grad (tests/test_flex_relative_attention.py); the GPU tests (tests/test_gpu.py) check
training windows of xl and lamemo against the reference path.

Legend: B batch, H heads, Q queries, N keys, K head width, R distances.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from memscale.kernels.relative_attention import check_arguments


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=False: one specialised kernel per shape; a run has few (the segment, the memory, the look-ahead).
    return torch.compile(flex_attention, dynamic=False)


def _lse_request():
    """FlexAttention's keyword for the log-sum-exp: `return_aux=AuxRequest(lse=True)` where it exists (torch >=
    2.9), `return_lse=True` before."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return {"return_lse": True}
    return {"return_aux": AuxRequest(lse=True)}


def flex_relative_attention(
    qu: Tensor,
    qv: Tensor,
    k: Tensor,
    v: Tensor,
    r_RHK: Tensor,
    *,
    shift: int,
    window: int = 0,
    key_valid_BN: Tensor | None = None,
    return_lse: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """softmax(scale * (qu k^T + qv r[dist]^T) + mask) v, and its log-sum-exp (float32) when `return_lse`.

    Same arguments and layouts as `relative_attention` (memscale/kernels/relative_attention.py). `return_lse=False`
    returns (o, None): the form CPU inference supports.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    check_arguments("flex_relative_attention", qu, qv, k, v, r_RHK, shift=shift)
    B, H, Q, K = qu.shape
    N, R = k.shape[2], r_RHK.shape[0]
    # One dtype for FlexAttention: the values' (under bf16 autocast the projections come out bf16, while q + u
    # is promoted to float32 by the float32 bias).
    dt = v.dtype
    qu, qv, k, r_RHK = qu.to(dt), qv.to(dt), k.to(dt), r_RHK.to(dt)
    scale = K**-0.5
    raw_BHQR = torch.einsum("bhqk,rhk->bhqr", qv * scale, r_RHK).to(dt)
    if key_valid_BN is not None and bool(key_valid_BN.all()):
        key_valid_BN = None  # every key valid: the block mask need not depend on the batch row

    def score_mod(score, b, h, q_idx, kv_idx):
        n = (R - 1 - shift) - q_idx + kv_idx  # R - 1 - dist
        return score + raw_BHQR[b, h, q_idx, n.clamp(0, R - 1)]

    def mask_mod(b, h, q_idx, kv_idx):
        visible = kv_idx <= q_idx + shift
        if window > 0:
            visible = visible & (kv_idx > q_idx + shift - window)
        if key_valid_BN is not None:
            visible = visible & key_valid_BN[b, kv_idx]
        return visible

    block_mask = create_block_mask(
        mask_mod, B if key_valid_BN is not None else None, None, Q, N, device=qu.device
    )
    flex = _compiled_flex()
    if not return_lse:
        return flex(qu, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale), None
    o, aux = flex(qu, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, **_lse_request())
    lse = aux if isinstance(aux, Tensor) else aux.lse
    return o, lse.float()
