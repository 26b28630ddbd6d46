"""Memformer's slot-attention write, fused: forward and backward Triton kernels (flash-attention style).

Slot i of a batch row and head (g) attends to its own key and to the T token keys, never to the other slots
(memscale/models/memory/memformer.py, `MemoryWrite`):

    o_i = softmax_j(s_ij) v_j over j in {i} + tokens,    s_ij = scale q_i . k_j,

with keys and values laid out [M slots; T tokens] (S = M + T). The torch path runs SDPA with an M x S boolean mask
(identity block, then ones) and computes the M x M scores of which it keeps only the diagonal. Here the own key is
one row-wise dot product and the tokens are streamed in blocks with an online softmax; forward stores the output
and each row's log-normaliser (lse) and nothing of size M x S.

Backward, with dO the incoming gradient and D_i = dO_i . o_i (computed in torch):
    p_ij = exp(s_ij - lse_i),   dp_ij = dO_i . v_j,   ds_ij = p_ij (dp_ij - D_i)
    dq_i = scale sum_j ds_ij k_j,   dk_j = scale sum_i ds_ij q_i,   dv_j = sum_i p_ij dO_i
The own-key terms (j = i) and dq run over blocks of slots (one program owns a block of i and loops over the
tokens); the token keys' dk and dv over blocks of tokens (one program owns a block of j and loops over the slots),
so no two programs write the same row and no atomics are needed (FlashAttention-2's split, Dao 2023).

As in the Gaussian read (gaussian_read.py), every product is formed and summed in float32 (`input_precision=
"ieee"`) and only the results are rounded to the input dtype: the scores are M x T per head, small beside the
layer's matmuls, and Triton 3.9's interpreter gets a bf16 dot wrong.

Legend: G = B x H rows, M slots (queries), T tokens, S = M + T keys, K head width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rows(ptr, base, rows, kk, K, mask):
    """Rows `rows` (columns kk) of the row-major [*, K] matrix at `ptr + base`, in float32; zero where masked."""
    return tl.load(ptr + base + rows[:, None] * K + kk[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _slot_attention_fwd(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, M, T, K, scale,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK_K)
    m_mask, k_mask = m < M, kk < K
    S = M + T
    mk_mask = m_mask[:, None] & k_mask[None, :]
    q = _rows(q_ptr, g * M * K, m, kk, K, mk_mask)
    k_own = _rows(k_ptr, g * S * K, m, kk, K, mk_mask)
    v_own = _rows(v_ptr, g * S * K, m, kk, K, mk_mask)
    # The own key starts the online softmax: running max = its score, normaliser 1, accumulator its value.
    m_i = tl.sum(q * k_own, axis=1) * scale
    l_i = tl.full((BLOCK_M,), 1.0, tl.float32)
    acc = v_own
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_mask = t < T
        tk_mask = t_mask[:, None] & k_mask[None, :]
        k_t = _rows(k_ptr, g * S * K, M + t, kk, K, tk_mask)
        v_t = _rows(v_ptr, g * S * K, M + t, kk, K, tk_mask)
        s = tl.dot(q, tl.trans(k_t), input_precision="ieee") * scale
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v_t, input_precision="ieee")
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(o_ptr + g * M * K + m[:, None] * K + kk[None, :], o.to(o_ptr.dtype.element_ty), mask=mk_mask)
    tl.store(lse_ptr + g * M + m, m_i + tl.log(l_i), mask=m_mask)


@triton.jit
def _slot_attention_bwd_slots(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, d_ptr, dq_ptr, dk_ptr, dv_ptr, M, T, K, scale,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dq of a block of slots, and the gradients of their own keys and values (rows 0..M-1 of dk, dv)."""
    g = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK_K)
    m_mask, k_mask = m < M, kk < K
    S = M + T
    mk_mask = m_mask[:, None] & k_mask[None, :]
    q = _rows(q_ptr, g * M * K, m, kk, K, mk_mask)
    k_own = _rows(k_ptr, g * S * K, m, kk, K, mk_mask)
    v_own = _rows(v_ptr, g * S * K, m, kk, K, mk_mask)
    do = _rows(do_ptr, g * M * K, m, kk, K, mk_mask)
    lse = tl.load(lse_ptr + g * M + m, mask=m_mask, other=0.0)
    d = tl.load(d_ptr + g * M + m, mask=m_mask, other=0.0)
    p_own = tl.exp(tl.sum(q * k_own, axis=1) * scale - lse)
    ds_own = p_own * (tl.sum(do * v_own, axis=1) - d)
    dq = ds_own[:, None] * k_own
    tl.store(dk_ptr + g * S * K + m[:, None] * K + kk[None, :], (ds_own[:, None] * q * scale).to(dk_ptr.dtype.element_ty), mask=mk_mask)  # fmt: skip
    tl.store(dv_ptr + g * S * K + m[:, None] * K + kk[None, :], (p_own[:, None] * do).to(dv_ptr.dtype.element_ty), mask=mk_mask)  # fmt: skip
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_mask = t < T
        tk_mask = t_mask[:, None] & k_mask[None, :]
        k_t = _rows(k_ptr, g * S * K, M + t, kk, K, tk_mask)
        v_t = _rows(v_ptr, g * S * K, M + t, kk, K, tk_mask)
        s = tl.dot(q, tl.trans(k_t), input_precision="ieee") * scale
        p = tl.where(t_mask[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v_t), input_precision="ieee")
        ds = p * (dp - d[:, None])
        dq += tl.dot(ds, k_t, input_precision="ieee")
    tl.store(dq_ptr + g * M * K + m[:, None] * K + kk[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=mk_mask)  # fmt: skip


@triton.jit
def _slot_attention_bwd_tokens(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, d_ptr, dk_ptr, dv_ptr, M, T, K, scale,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dk and dv of a block of token keys (rows M..M+T-1 of dk, dv), summed over every slot."""
    g = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    kk = tl.arange(0, BLOCK_K)
    t_mask, k_mask = t < T, kk < K
    S = M + T
    tk_mask = t_mask[:, None] & k_mask[None, :]
    k_t = _rows(k_ptr, g * S * K, M + t, kk, K, tk_mask)
    v_t = _rows(v_ptr, g * S * K, M + t, kk, K, tk_mask)
    dk = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    dv = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_mask = m < M
        mk_mask = m_mask[:, None] & k_mask[None, :]
        q = _rows(q_ptr, g * M * K, m, kk, K, mk_mask)
        do = _rows(do_ptr, g * M * K, m, kk, K, mk_mask)
        lse = tl.load(lse_ptr + g * M + m, mask=m_mask, other=0.0)
        d = tl.load(d_ptr + g * M + m, mask=m_mask, other=0.0)
        s = tl.dot(q, tl.trans(k_t), input_precision="ieee") * scale
        p = tl.where(m_mask[:, None] & t_mask[None, :], tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p), do, input_precision="ieee")
        dp = tl.dot(do, tl.trans(v_t), input_precision="ieee")
        ds = p * (dp - d[:, None])
        dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
    tl.store(dk_ptr + g * S * K + (M + t)[:, None] * K + kk[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=tk_mask)  # fmt: skip
    tl.store(dv_ptr + g * S * K + (M + t)[:, None] * K + kk[None, :], dv.to(dv_ptr.dtype.element_ty), mask=tk_mask)  # fmt: skip


def _blocks(M: int, T: int, K: int, blocks: tuple[int, int] | None) -> tuple[int, int, int]:
    # tl.dot wants every dimension >= 16 on the GPU.
    bm, bt = blocks or (
        min(64, max(16, triton.next_power_of_2(M))),
        min(64, max(16, triton.next_power_of_2(T))),
    )
    return bm, bt, max(16, triton.next_power_of_2(K))


def slot_attention_fwd(q_GMK, k_GSK, v_GSK, *, scale: float, blocks=None) -> tuple[Tensor, Tensor]:
    G, M, K = q_GMK.shape
    T = k_GSK.shape[1] - M
    BM, BT, BK = _blocks(M, T, K, blocks)
    o_GMK = torch.empty_like(q_GMK)
    lse_GM = torch.empty(G, M, dtype=torch.float32, device=q_GMK.device)
    _slot_attention_fwd[(G, triton.cdiv(M, BM))](
        q_GMK, k_GSK, v_GSK, o_GMK, lse_GM, M, T, K, scale, BLOCK_M=BM, BLOCK_T=BT, BLOCK_K=BK
    )
    return o_GMK, lse_GM


def slot_attention_bwd(q_GMK, k_GSK, v_GSK, o_GMK, lse_GM, do_GMK, *, scale: float, blocks=None):
    G, M, K = q_GMK.shape
    T = k_GSK.shape[1] - M
    BM, BT, BK = _blocks(M, T, K, blocks)
    d_GM = (do_GMK.float() * o_GMK.float()).sum(-1)
    dq_GMK, dk_GSK, dv_GSK = torch.empty_like(q_GMK), torch.empty_like(k_GSK), torch.empty_like(v_GSK)
    _slot_attention_bwd_slots[(G, triton.cdiv(M, BM))](
        q_GMK, k_GSK, v_GSK, do_GMK, lse_GM, d_GM, dq_GMK, dk_GSK, dv_GSK, M, T, K, scale,
        BLOCK_M=BM, BLOCK_T=BT, BLOCK_K=BK,
    )  # fmt: skip
    if T:
        _slot_attention_bwd_tokens[(G, triton.cdiv(T, BT))](
            q_GMK, k_GSK, v_GSK, do_GMK, lse_GM, d_GM, dk_GSK, dv_GSK, M, T, K, scale,
            BLOCK_M=BM, BLOCK_T=BT, BLOCK_K=BK,
        )  # fmt: skip
    return dq_GMK, dk_GSK, dv_GSK
