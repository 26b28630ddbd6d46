"""Relative-position attention (Transformer-XL's score, LaMemo's look-ahead) trained without materialising the
full score matrix: one `torch.autograd.Function`, blockwise over queries, with the backward of FlashAttention
(Dao et al. 2022: the softmax gradient from the output and the log-sum-exp), written for plain PyTorch tensors
because FlexAttention has no backward on CPU.

The score of query i and key j (Dai et al. 2019, §3.3, terms (a)+(c) and (b)+(d)):

    s(i, j) = scale * ( qu_i . k_j  +  qv_i . r[dist(i, j)] ),    dist(i, j) = i - j + shift

with qu = q + u and qv = q + v (the content and position biases already added), and r the projected sinusoid of
each distance. Key j is visible iff 0 <= dist(i, j), dist(i, j) < window (when window > 0: Transformer-XL's
same_length) and key_valid[b, j]. Every query must see at least one key (softmax of nothing is undefined; the
callers' diagonal key is always visible).

Why this is faster than the reference (xl.py, lamemo.py). The reference forms BD for all T x C (query, distance)
pairs, shifts it into place with two copies (`rel_shift`), and hands AC's bias BD * scale + mask to SDPA as a
float mask that needs a gradient, which sends SDPA to its math path: B x H x T x C scores, probabilities and their
gradients are kept and passed over many times. Here, per block of `block` queries:

  * only the keys a query of the block can see are touched (fully masked key ranges are skipped);
  * BD is formed for the band of distances that block needs (block + keys - 1 of them), as one matmul over
    [H, B * block] rows, and moved into place by a strided view (entry (i, j) is raw[i, block - 1 - i + j]: rows
    of raw read with a stride one less than their length), not by pad-and-copy;
  * AC + BD, mask, softmax and P v are done in place on one block-sized buffer;
  * backward reuses each block's probabilities (`KEEP_PROBABILITIES`) or recomputes them from q, k, v, r and the
    saved log-sum-exp (`keep=False`: then nothing of size T x C outlives the forward).

Position dropout and `clamp_len` live in the table r (the caller drops or clamps its rows), `same_length` in the
window; attention-probability dropout is not implemented (the callers take their reference path then).

Not taken: the sinusoid is separable (sin((i-j)w) = sin(iw)cos(jw) - cos(iw)sin(jw)), so BD could be one plain
dot product and the whole score SDPA's fused kernel. But BD_ij = (W_r^T (q_i + v)) . R_{i-j} runs over all D
sinusoid dimensions per head: the augmented head width is K + D (64 + 512 at the default shape), a 9x larger
QK^T, and clamp_len and position dropout break the separation. The band costs X + Y - 1 rows per block instead.

Where the time goes, and what did not help (CPU, 2 threads, the default shape, fwd+bwd of one call, side by side):
the matmuls take ~73% of the kernel's time, at ~130 GFLOP/s in place against 170-190 for the same shapes alone
(194 for a large square one); the elementwise passes take the rest. Rewrites of the backward that measured
slower: accumulating dk, dv and dr inside the GEMM (`baddbmm_` into their slices, which on CPU fell back to a loop
of `addmm_`, ~21 per call) together with the two below, 1.06-1.07x; writing dq and dqv with `bmm(out=...)` and
zeroing only the two triangles of each band buffer that `place` does not reach, instead of all of it, 1.01-1.06x.

The log-sum-exp is returned (float32) and is differentiable: LaMemo's memory interpolation weighs the old and the
look-ahead attention by their normalisers (d lse_i / d s_ij = p_ij, added to the softmax backward).

Conventions: q*, o [B, H, Q, K]; k, v [B, H, N, K]; r [R, H, K] in *descending* distance order, row n holding
distance R - 1 - n (the order of Transformer-XL's `pos_seq = arange(klen - 1, -1, -1)`), with R - 1 >= the largest
visible distance; key_valid [B, N] bool or None (all valid). The Function is deterministic (the same matmuls in the
same order on every call), as activation checkpointing and memory replay need when they recompute a layer.

Reference: the explicit formula in tests/test_relative_attention.py and the kinds' own reference paths
(`model.attention=reference`).
Legend: B batch, H heads, Q queries, N keys, K head width, R distances, X block queries, Y block keys,
W = X + Y - 1 block distances.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_BLOCK = 64
"""Queries per block. Measured fwd+bwd at the default shape (B 4, H 8, T 512, M 512, K 64, one thread, side by
side): 64 and 96 equal, 128 +5%, 256 +40%, 512 (one block) +2x: small blocks skip more of the masked keys and keep
the band of distances short (X + Y - 1 per block of X queries over Y keys)."""
KEEP_PROBABILITIES = True
"""Keep each block's probabilities for backward (B x H x T x ~(M + T/2) floats per call, ~50 MB per layer at the
default shape, against ~6 such tensors in the reference) rather than recompute them from the saved log-sum-exp
(FlashAttention's choice, which keeps only O(T) per query): recomputing measured 5-17% slower fwd+bwd on CPU.
`keep=False` is the recompute path (tested alike)."""


def _key_range(i0: int, i1: int, *, N: int, shift: int, window: int) -> tuple[int, int]:
    """Keys [lo, hi) that some query of [i0, i1) can see by distance alone."""
    hi = min(N, i1 + shift)  # dist >= 0  <=>  j <= i + shift
    lo = max(0, i0 + shift - window + 1) if window > 0 else 0  # dist < window  <=>  j > i + shift - window
    return lo, hi


def _distance_masks(i0: int, i1: int, lo: int, hi: int, *, shift: int, window: int, device):
    """(c0, c1, X x (c1 - c0) bool) for the key columns [c0, c1) of the block (counted from lo) where the distance
    hides some key: the diagonal's future (dist < 0) and, with a window, its far edge (dist >= window). Only those
    columns are masked, not the whole X x Y block."""
    spans = [(max(lo, i0 + shift + 1), hi)]  # some row's future: j > i0 + shift
    if window > 0:
        spans.append((lo, min(hi, i1 + shift - window)))  # some row's far edge: j <= i1 - 1 + shift - window
    masks = []
    for j0, j1 in spans:
        if j0 < j1:
            dist_XC = torch.arange(i0 + shift, i1 + shift, device=device)[:, None] - torch.arange(
                j0, j1, device=device
            )
            hidden_XC = (dist_XC < 0) | (dist_XC >= window) if window > 0 else dist_XC < 0
            masks.append((j0 - lo, j1 - lo, hidden_XC))
    return masks


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp is kept in float32 at least (LaMemo's normaliser state is float32), float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


class _Block:
    """Geometry of one query block: its keys, its band of distances and the strided view that places BD."""

    def __init__(self, i0: int, i1: int, *, N: int, R: int, shift: int, window: int, device):
        self.i0, self.i1 = i0, i1
        self.lo, self.hi = _key_range(i0, i1, N=N, shift=shift, window=window)
        X, Y = i1 - i0, self.hi - self.lo
        self.W = X + Y - 1
        # Band of distances, largest first: d_max = i1 - 1 - lo + shift down to d_max - W + 1 (>= -(X - 1)); in the
        # descending table (padded with X - 1 zero rows for the negative, always hidden, distances) that is rows
        # R - 1 - d_max .. R - 1 - d_max + W - 1.
        d_max = i1 - 1 - self.lo + shift
        self.r0 = R - 1 - d_max
        self.hidden = _distance_masks(i0, i1, self.lo, self.hi, shift=shift, window=window, device=device)

    def place(self, raw_HXBW: Tensor, B: int, H: int) -> Tensor:
        """The B x H x X x Y view of raw (H x X x B x W, contiguous) with entry (i, j) = raw[i, X - 1 - i + j].

        Distinct (i, j) read distinct entries, so the view can also be written through (backward does)."""
        X, W = self.i1 - self.i0, self.W
        return raw_HXBW.as_strided(
            (B, H, X, W - X + 1), (W, X * B * W, B * W - 1, 1), raw_HXBW.storage_offset() + X - 1
        )


def _probabilities(blk, qu, qv_HQBK, k, r_HRK, key_hidden_B11N, B, H, lse_BHQ=None):
    """The block's softmax probabilities (in place in one buffer), and its log-sum-exp when `lse_BHQ` is None.
    qu and qv come scaled by 1 / sqrt(K)."""
    i0, i1, lo, hi = blk.i0, blk.i1, blk.lo, blk.hi
    X = i1 - i0
    s_BHXY = torch.matmul(qu[:, :, i0:i1], k[:, :, lo:hi].transpose(-1, -2))
    qv_HZK = qv_HQBK[:, i0:i1].flatten(1, 2)  # rows (i, b) of the block: a contiguous slice, no copy
    band_HWK = r_HRK[:, blk.r0 : blk.r0 + blk.W]
    raw_HXBW = torch.bmm(qv_HZK, band_HWK.transpose(1, 2)).view(H, X, B, blk.W)
    s_BHXY.add_(blk.place(raw_HXBW, B, H))
    for c0, c1, hidden_XC in blk.hidden:
        s_BHXY[..., c0:c1].masked_fill_(hidden_XC, float("-inf"))
    if key_hidden_B11N is not None:
        s_BHXY.masked_fill_(key_hidden_B11N[..., lo:hi], float("-inf"))
    if lse_BHQ is None:
        m_BHX1 = s_BHXY.amax(dim=-1, keepdim=True)
        p_BHXY = s_BHXY.sub_(m_BHX1).exp_()
        z_BHX1 = p_BHXY.sum(dim=-1, keepdim=True)
        p_BHXY.div_(z_BHX1)
        return p_BHXY, (m_BHX1 + z_BHX1.log()).squeeze(-1).to(_lse_dtype(s_BHXY.dtype))
    return s_BHXY.sub_(lse_BHQ[:, :, i0:i1, None].to(s_BHXY.dtype)).exp_(), None


class _RelativeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qu, qv, k, v, r_RHK, key_valid_BN, shift: int, window: int, block: int, keep: bool):
        B, H, Q, K = qu.shape
        N, R = k.shape[2], r_RHK.shape[0]
        blocks = [
            _Block(i0, min(Q, i0 + block), N=N, R=R, shift=shift, window=window, device=qu.device)
            for i0 in range(0, Q, block)
        ]
        # The scale goes on the queries (exact for a power-of-two head width), not on every score.
        scale = K**-0.5
        qu = qu * scale
        qv_HQBK = (qv * scale).permute(1, 2, 0, 3).contiguous()
        # r per head, padded with block - 1 zero rows for the negative distances a diagonal block's band reaches.
        r_HRK = torch.cat([r_RHK, r_RHK.new_zeros(block - 1, H, K)]).transpose(0, 1).contiguous()
        key_hidden = None if key_valid_BN is None else ~key_valid_BN[:, None, None, :]
        o = torch.empty_like(qu)
        lse_BHQ = torch.empty(B, H, Q, dtype=_lse_dtype(qu.dtype), device=qu.device)
        kept = []
        for blk in blocks:
            p_BHXY, lse_BHQ[:, :, blk.i0 : blk.i1] = _probabilities(
                blk, qu, qv_HQBK, k, r_HRK, key_hidden, B, H
            )
            o[:, :, blk.i0 : blk.i1] = torch.matmul(p_BHXY, v[:, :, blk.lo : blk.hi])
            if keep:
                kept.append(p_BHXY)
        ctx.save_for_backward(qu, qv_HQBK, k, v, r_HRK, key_hidden, o, lse_BHQ, *kept)
        ctx.blocks, ctx.scale, ctx.R = blocks, scale, R
        return o, lse_BHQ

    @staticmethod
    def backward(ctx, do, dlse_BHQ):
        qu, qv_HQBK, k, v, r_HRK, key_hidden, o, lse_BHQ, *kept = ctx.saved_tensors
        B, H, Q, K = qu.shape
        do = do.contiguous()
        # d s_ij = p_ij (dp_ij - delta_i + dlse_i), delta_i = sum_k do_ik o_ik (FlashAttention-2's D_i).
        delta_BHQ = (do * o).sum(dim=-1, dtype=lse_BHQ.dtype)
        if dlse_BHQ is not None:
            delta_BHQ = delta_BHQ - dlse_BHQ
        delta_BHQ1 = delta_BHQ.to(qu.dtype)[..., None]
        dqu, dk, dv = torch.empty_like(qu), torch.zeros_like(k), torch.zeros_like(v)
        dqv_HQBK = torch.empty_like(qv_HQBK)
        dr_HRK = torch.zeros_like(r_HRK)
        for n, blk in enumerate(ctx.blocks):
            i0, i1, lo, hi = blk.i0, blk.i1, blk.lo, blk.hi
            X = i1 - i0
            if kept:
                p_BHXY = kept[n]
            else:
                p_BHXY, _ = _probabilities(blk, qu, qv_HQBK, k, r_HRK, key_hidden, B, H, lse_BHQ)
            do_BHXK = do[:, :, i0:i1]
            dv[:, :, lo:hi] += torch.matmul(p_BHXY.transpose(-1, -2), do_BHXK)
            ds_BHXY = torch.matmul(do_BHXK, v[:, :, lo:hi].transpose(-1, -2))
            ds_BHXY.sub_(delta_BHQ1[:, :, i0:i1]).mul_(p_BHXY)  # d(scaled score); the scale is applied below
            dqu[:, :, i0:i1] = torch.matmul(ds_BHXY, k[:, :, lo:hi])
            dk[:, :, lo:hi] += torch.matmul(ds_BHXY.transpose(-1, -2), qu[:, :, i0:i1])
            # BD's gradient goes back through the strided placement: each band entry feeds at most one (i, j).
            draw_HXBW = ds_BHXY.new_zeros(H, X, B, blk.W)
            blk.place(draw_HXBW, B, H).copy_(ds_BHXY)
            draw_HZW = draw_HXBW.view(H, X * B, blk.W)
            band_HWK = r_HRK[:, blk.r0 : blk.r0 + blk.W]
            dqv_HQBK[:, i0:i1] = torch.bmm(draw_HZW, band_HWK).view(H, X, B, K)
            dr_HRK[:, blk.r0 : blk.r0 + blk.W] += torch.bmm(
                draw_HZW.transpose(1, 2), qv_HQBK[:, i0:i1].flatten(1, 2)
            )
        scale = ctx.scale
        dqv = dqv_HQBK.permute(2, 0, 1, 3).mul_(scale)
        dr_RHK = dr_HRK[:, : ctx.R].transpose(0, 1)  # qv came scaled: dr is already d loss / d r
        return dqu.mul_(scale), dqv, dk, dv, dr_RHK, None, None, None, None, None


def check_arguments(
    name: str, qu: Tensor, qv: Tensor, k: Tensor, v: Tensor, r_RHK: Tensor, *, shift: int
) -> None:
    """The layouts of the module docstring, and a distance table long enough for every visible pair."""
    B, H, Q, K = qu.shape
    N = k.shape[2]
    if qv.shape != qu.shape or k.shape != (B, H, N, K) or v.shape != k.shape:
        raise ValueError(f"{name}: shapes qu {qu.shape}, qv {qv.shape}, k {k.shape}, v {v.shape}")
    if r_RHK.dim() != 3 or r_RHK.shape[1:] != (H, K):
        raise ValueError(f"{name}: r must be [R, {H}, {K}], got {tuple(r_RHK.shape)}")
    if Q - 1 + shift > r_RHK.shape[0] - 1:
        raise ValueError(
            f"{name}: distances reach {Q - 1 + shift} but r has {r_RHK.shape[0]} rows (0 .. R-1)"
        )


def relative_attention(
    qu: Tensor,
    qv: Tensor,
    k: Tensor,
    v: Tensor,
    r_RHK: Tensor,
    *,
    shift: int,
    window: int = 0,
    key_valid_BN: Tensor | None = None,
    block: int | None = None,
    keep: bool | None = None,
    return_lse: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """softmax(scale * (qu k^T + qv r[dist]^T) + mask) v and its log-sum-exp, each query's normaliser.

    See the module docstring for the score, the mask and the layouts. Returns o [B, H, Q, K] and lse [B, H, Q]
    (float32, or float64 for float64 inputs). `block`: queries per block (DEFAULT_BLOCK). `keep`: keep each
    block's probabilities for backward instead of recomputing them (KEEP_PROBABILITIES). `return_lse=False`
    returns (o, None) (the signature FlexAttention's path shares; the kernel forms the log-sum-exp anyway).
    """
    Q = qu.shape[2]
    check_arguments("relative_attention", qu, qv, k, v, r_RHK, shift=shift)
    block = DEFAULT_BLOCK if block is None else block
    keep = KEEP_PROBABILITIES if keep is None else keep
    if block < 1:
        raise ValueError(f"relative_attention: block={block} must be >= 1")
    if key_valid_BN is not None and bool(key_valid_BN.all()):
        key_valid_BN = None  # every key valid (a full memory): no per-key mask pass
    o, lse = _RelativeAttention.apply(
        qu.contiguous(),
        qv.contiguous(),
        k.contiguous(),
        v.contiguous(),
        r_RHK,
        key_valid_BN,
        shift,
        window,
        min(block, Q),
        keep,
    )
    return o, (lse if return_lse else None)
