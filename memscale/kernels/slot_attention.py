"""Memformer's slot-attention write, `o = softmax(scale q [k_own; K_tokens]^T) [v_own; V_tokens]`, by torch or
by Triton.

`slot_attention(q_BHMK, k_BHSK, v_BHSK, mask_MS=..., scale=...)` is the attention of
memscale/models/memory/memformer.py (`MemoryWrite.forward`): keys and values hold the M slots then the T tokens
(S = M + T), and `mask_MS` is the writer's mask (slot i sees key i and every token key). The torch backend is
exactly the model's `sdpa(q, k, v, attn_mask=mask_MS, scale=scale)` (the reference); the triton backend
(memscale/kernels/triton/slot_attention.py) computes the same attention from that structure, without the mask and
the M x M slot-to-slot scores, forward and backward.

Legend: B batch, H heads, M slots, T tokens, S = M + T keys, K head width.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reference_slot_attention(
    q_BHMK: Tensor, k_BHSK: Tensor, v_BHSK: Tensor, *, mask_MS: Tensor, scale: float
):
    from memscale.models.layers import sdpa  # the model's own attention entry

    return sdpa(q_BHMK, k_BHSK, v_BHSK, attn_mask=mask_MS, scale=scale)


class _TritonSlotAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BHMK, k_BHSK, v_BHSK, scale, blocks):
        from memscale.kernels.triton.slot_attention import slot_attention_fwd

        B, H, M, K = q_BHMK.shape
        S = k_BHSK.shape[2]
        q, k, v = (x.reshape(B * H, -1, K).contiguous() for x in (q_BHMK, k_BHSK, v_BHSK))
        o_GMK, lse_GM = slot_attention_fwd(q, k, v, scale=scale, blocks=blocks)
        ctx.save_for_backward(q, k, v, o_GMK, lse_GM)
        ctx.scale, ctx.blocks, ctx.shape = scale, blocks, (B, H, M, S, K)
        return o_GMK.view(B, H, M, K)

    @staticmethod
    def backward(ctx, do_BHMK):
        from memscale.kernels.triton.slot_attention import slot_attention_bwd

        B, H, M, S, K = ctx.shape
        q, k, v, o_GMK, lse_GM = ctx.saved_tensors
        do_GMK = do_BHMK.reshape(B * H, M, K).to(q.dtype).contiguous()
        dq, dk, dv = slot_attention_bwd(q, k, v, o_GMK, lse_GM, do_GMK, scale=ctx.scale, blocks=ctx.blocks)
        return dq.view(B, H, M, K), dk.view(B, H, S, K), dv.view(B, H, S, K), None, None


def slot_attention(
    q_BHMK: Tensor,
    k_BHSK: Tensor,
    v_BHSK: Tensor,
    *,
    mask_MS: Tensor,
    scale: float,
    backend: str | None = None,
    blocks: tuple[int, int] | None = None,
) -> Tensor:
    """Slot i's attention over [its own key; the T token keys] (B x H x M x K), by `backend` (default:
    `memscale.kernels.backend` of the device, i.e. `train.kernels`). `blocks` (slot block, token block; powers of
    two >= 16) overrides the Triton kernels' tiling, so that tests cover several blocks and masked tails."""
    M, S = q_BHMK.shape[2], k_BHSK.shape[2]
    if mask_MS.shape != (M, S) or S < M:
        raise ValueError(
            f"slot_attention: mask {tuple(mask_MS.shape)} for {M} slots and {S} keys, expected ({M}, {S})"
        )
    if backend is None:
        from memscale.kernels import backend as kernels_backend

        backend = kernels_backend(q_BHMK.device)
    if backend == "torch":
        return reference_slot_attention(q_BHMK, k_BHSK, v_BHSK, mask_MS=mask_MS, scale=scale)
    return _TritonSlotAttention.apply(q_BHMK, k_BHSK, v_BHSK, scale, blocks)
