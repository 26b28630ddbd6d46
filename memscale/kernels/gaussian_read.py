"""The ∞-former's continuous read, `context = E_{N(mu, sigma^2)}[psi] @ values`, by torch or by Triton.

`gaussian_read(mu_BHT, sigma_sq_BHT, mu_N, sigma_N, values_BHNK)` is the read of
memscale/models/memory/infinity.py (`LongTermAttention.forward`): the torch backend is exactly the model's
`gaussian_expectation(...) @ values` (the reference, which keeps the B x H x T x N weights for backward); the
triton backend (memscale/kernels/triton/gaussian_read.py) recomputes the weights block by block in forward and
backward and stores nothing of size T x N. Gradients reach mu, sigma^2 and the values; the basis centres and
widths are fixed buffers and get none.

Legend: B batch, H heads, T queries, N basis functions, K head width.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reference_gaussian_read(
    mu_BHT: Tensor, sigma_sq_BHT: Tensor, mu_N: Tensor, sigma_N: Tensor, values_BHNK: Tensor
) -> Tensor:
    from memscale.models.memory.infinity import gaussian_expectation  # the model's own formula

    return gaussian_expectation(mu_BHT, sigma_sq_BHT, mu_N, sigma_N) @ values_BHNK


class _TritonGaussianRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu_BHT, sigma_sq_BHT, mu_N, sigma_N, values_BHNK, blocks):
        from memscale.kernels.triton.gaussian_read import gaussian_read_fwd

        B, H, N, K = values_BHNK.shape
        T = mu_BHT.shape[-1]
        mu_GT = mu_BHT.reshape(B * H, T).contiguous()
        s_GT = sigma_sq_BHT.reshape(B * H, T).contiguous()
        c_N, w_N = mu_N.contiguous(), sigma_N.contiguous()
        v_GNK = values_BHNK.reshape(B * H, N, K).contiguous()
        ctx.save_for_backward(mu_GT, s_GT, c_N, w_N, v_GNK)
        ctx.blocks, ctx.shape = blocks, (B, H, T, N, K)
        return gaussian_read_fwd(mu_GT, s_GT, c_N, w_N, v_GNK, blocks=blocks).view(B, H, T, K)

    @staticmethod
    def backward(ctx, dout_BHTK):
        from memscale.kernels.triton.gaussian_read import gaussian_read_bwd

        B, H, T, N, K = ctx.shape
        mu_GT, s_GT, c_N, w_N, v_GNK = ctx.saved_tensors
        dout_GTK = dout_BHTK.reshape(B * H, T, K).to(v_GNK.dtype).contiguous()
        dmu, ds, dv = gaussian_read_bwd(mu_GT, s_GT, c_N, w_N, v_GNK, dout_GTK, blocks=ctx.blocks)
        return dmu.view(B, H, T), ds.view(B, H, T), None, None, dv.view(B, H, N, K), None


def gaussian_read(
    mu_BHT: Tensor,
    sigma_sq_BHT: Tensor,
    mu_N: Tensor,
    sigma_N: Tensor,
    values_BHNK: Tensor,
    *,
    backend: str | None = None,
    blocks: tuple[int, int] | None = None,
) -> Tensor:
    """context_BHTK = sum_n N(mu; mu_n, sigma^2 + sigma_n^2) values_n, by `backend` (default:
    `memscale.kernels.backend` of the device, i.e. `train.kernels`). `blocks` (query block, basis block; powers of
    two >= 16) overrides the Triton kernels' tiling, so that tests cover several blocks and masked tails."""
    if backend is None:
        from memscale.kernels import backend as kernels_backend

        backend = kernels_backend(values_BHNK.device)
    if backend == "torch":
        return reference_gaussian_read(mu_BHT, sigma_sq_BHT, mu_N, sigma_N, values_BHNK)
    if mu_N.requires_grad or sigma_N.requires_grad:
        raise ValueError("gaussian_read: the basis centres and widths are fixed buffers; pass them detached")
    return _TritonGaussianRead.apply(mu_BHT, sigma_sq_BHT, mu_N, sigma_N, values_BHNK, blocks)
