"""The ∞-former's continuous read against its Gaussian basis, fused: forward and backward Triton kernels.

For each query t (of one batch row and head, g) with density N(mu_t, s_t) and each basis function n (centre c_n,
width w_n), the expectation of the basis function under the density is, in closed form (memscale/models/memory/
infinity.py, `gaussian_expectation`),

    r_tn = exp(-(mu_t - c_n)^2 / (2 v_tn)) / sqrt(2 pi v_tn),    v_tn = s_t + w_n^2,

and the context is out_t = sum_n r_tn V_n (V: the heads' values of the basis coefficients, N x K). The torch path
forms r (B x H x T x N) and keeps it for backward; these kernels recompute r block by block and never store it.

Backward, with dO the incoming gradient (T x K):
    dr_tn  = dO_t . V_n
    dmu_t  = sum_n dr_tn r_tn (-(mu_t - c_n) / v_tn)
    ds_t   = sum_n dr_tn r_tn ((mu_t - c_n)^2 / (2 v_tn^2) - 1 / (2 v_tn))
    dV_n   = sum_t r_tn dO_t
The first two run over blocks of queries (one program owns a block of t and loops over n), the last over blocks of
basis functions (one program owns a block of n and loops over t), so no program writes where another does and no
atomics are needed (the split of flash-attention's backward into a dq pass and a dk/dv pass).

Every product is formed and summed in float32 with exact fp32 dots (`input_precision="ieee"`, not TF32), whatever
the input dtype, and only the results are rounded to the input dtype: the dots are T x N x K per head, small
beside the layer's other matmuls, so tensor-core speed does not matter here. It also keeps the kernels
checkable on CPU: Triton 3.9's interpreter computes a bf16 x bf16 dot wrongly (measured: garbage), an fp32 one
right.

Legend: G = B x H rows of queries, T queries per row, N basis functions, K head width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _weights(mu, s, c, w, n_mask):
    """r_tn for a block of queries (mu, s: [BT]) and of basis functions (c, w: [BN]); zero on masked n. Also
    d = mu - c and v = s + w^2, which the backward needs."""
    v = s[:, None] + (w * w)[None, :]
    d = mu[:, None] - c[None, :]
    r = tl.exp(-0.5 * d * d / v) * (0.3989422804014327 / tl.sqrt(v))  # 1 / sqrt(2 pi)
    return tl.where(n_mask[None, :], r, 0.0), d, v


@triton.jit
def _gaussian_read_fwd(
    mu_ptr, s_ptr, c_ptr, w_ptr, v_ptr, out_ptr, T, N, K,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.arange(0, BLOCK_K)
    t_mask, k_mask = t < T, k < K
    mu = tl.load(mu_ptr + g * T + t, mask=t_mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + g * T + t, mask=t_mask, other=1.0).to(tl.float32)
    acc = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < N
        c = tl.load(c_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + n, mask=n_mask, other=1.0).to(tl.float32)
        r, _, _ = _weights(mu, s, c, w, n_mask)
        vals = tl.load(
            v_ptr + g * N * K + n[:, None] * K + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0
        )
        acc += tl.dot(r, vals.to(tl.float32), input_precision="ieee")
    tl.store(out_ptr + g * T * K + t[:, None] * K + k[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=t_mask[:, None] & k_mask[None, :])  # fmt: skip


@triton.jit
def _gaussian_read_bwd_queries(
    mu_ptr, s_ptr, c_ptr, w_ptr, v_ptr, dout_ptr, dmu_ptr, ds_ptr, T, N, K,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.arange(0, BLOCK_K)
    t_mask, k_mask = t < T, k < K
    mu = tl.load(mu_ptr + g * T + t, mask=t_mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + g * T + t, mask=t_mask, other=1.0).to(tl.float32)
    dout = tl.load(
        dout_ptr + g * T * K + t[:, None] * K + k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0
    ).to(tl.float32)
    dmu = tl.zeros((BLOCK_T,), tl.float32)
    ds = tl.zeros((BLOCK_T,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < N
        c = tl.load(c_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + n, mask=n_mask, other=1.0).to(tl.float32)
        r, d, v = _weights(mu, s, c, w, n_mask)
        vals = tl.load(
            v_ptr + g * N * K + n[:, None] * K + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0
        )
        dr_r = (
            tl.dot(dout, tl.trans(vals.to(tl.float32)), input_precision="ieee") * r
        )  # dr_tn r_tn, zero on masked n
        inv_v = 1.0 / v
        dmu += tl.sum(-dr_r * d * inv_v, axis=1)
        ds += tl.sum(dr_r * (0.5 * d * d * inv_v - 0.5) * inv_v, axis=1)
    tl.store(dmu_ptr + g * T + t, dmu.to(dmu_ptr.dtype.element_ty), mask=t_mask)
    tl.store(ds_ptr + g * T + t, ds.to(ds_ptr.dtype.element_ty), mask=t_mask)


@triton.jit
def _gaussian_read_bwd_values(
    mu_ptr, s_ptr, c_ptr, w_ptr, dout_ptr, dv_ptr, T, N, K,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    n_mask, k_mask = n < N, k < K
    c = tl.load(c_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + n, mask=n_mask, other=1.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_mask = t < T
        mu = tl.load(mu_ptr + g * T + t, mask=t_mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + g * T + t, mask=t_mask, other=1.0).to(tl.float32)
        r, _, _ = _weights(mu, s, c, w, n_mask)
        r = tl.where(t_mask[:, None], r, 0.0)
        dout = tl.load(
            dout_ptr + g * T * K + t[:, None] * K + k[None, :],
            mask=t_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(tl.trans(r), dout, input_precision="ieee")
    tl.store(dv_ptr + g * N * K + n[:, None] * K + k[None, :], acc.to(dv_ptr.dtype.element_ty),
             mask=n_mask[:, None] & k_mask[None, :])  # fmt: skip


def _blocks(T: int, N: int, K: int, blocks: tuple[int, int] | None) -> tuple[int, int, int]:
    # tl.dot wants every dimension >= 16 on the GPU.
    bt, bn = blocks or (
        min(64, max(16, triton.next_power_of_2(T))),
        min(64, max(16, triton.next_power_of_2(N))),
    )
    return bt, bn, max(16, triton.next_power_of_2(K))


def gaussian_read_fwd(mu_GT, s_GT, c_N, w_N, v_GNK, *, blocks=None) -> Tensor:
    G, T = mu_GT.shape
    N, K = v_GNK.shape[1:]
    BT, BN, BK = _blocks(T, N, K, blocks)
    out_GTK = torch.empty(G, T, K, dtype=v_GNK.dtype, device=v_GNK.device)
    _gaussian_read_fwd[(G, triton.cdiv(T, BT))](
        mu_GT, s_GT, c_N, w_N, v_GNK, out_GTK, T, N, K,
        BLOCK_T=BT, BLOCK_N=BN, BLOCK_K=BK,
    )  # fmt: skip
    return out_GTK


def gaussian_read_bwd(
    mu_GT, s_GT, c_N, w_N, v_GNK, dout_GTK, *, blocks=None
) -> tuple[Tensor, Tensor, Tensor]:
    G, T = mu_GT.shape
    N, K = v_GNK.shape[1:]
    BT, BN, BK = _blocks(T, N, K, blocks)
    dmu_GT, ds_GT, dv_GNK = torch.empty_like(mu_GT), torch.empty_like(s_GT), torch.empty_like(v_GNK)
    _gaussian_read_bwd_queries[(G, triton.cdiv(T, BT))](
        mu_GT, s_GT, c_N, w_N, v_GNK, dout_GTK, dmu_GT, ds_GT, T, N, K,
        BLOCK_T=BT, BLOCK_N=BN, BLOCK_K=BK,
    )  # fmt: skip
    _gaussian_read_bwd_values[(G, triton.cdiv(N, BN))](
        mu_GT, s_GT, c_N, w_N, dout_GTK, dv_GNK, T, N, K,
        BLOCK_T=BT, BLOCK_N=BN, BLOCK_K=BK,
    )  # fmt: skip
    return dmu_GT, ds_GT, dv_GNK
