"""Building blocks of the decoder: attention with a fused QKV projection, MLP, pre-norm block.

Legend: B batch, S sequence inside the blocks, D model width, H heads, K head width.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_REFERENCE_ATTENTION = False


@contextlib.contextmanager
def reference_attention():
    """Within this block every attention of every kind runs as the plain formula (`reference_sdpa`) instead of
    `F.scaled_dot_product_attention`: the reference the fused kernels are tested against (tests/test_reference.py)."""
    global _REFERENCE_ATTENTION
    before, _REFERENCE_ATTENTION = _REFERENCE_ATTENTION, True
    try:
        yield
    finally:
        _REFERENCE_ATTENTION = before


def reference_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """softmax(q k^T * scale + mask) v, materialising the logits, with SDPA's conventions: a boolean mask is
    True where attention is allowed, a float mask is added, is_causal is the top-left aligned lower triangle."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q @ k.transpose(-2, -1)).float() * scale
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.float()
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


def sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """The one entry to fused attention for every kind (so `reference_attention` swaps all of them at once)."""
    if _REFERENCE_ATTENTION:
        return reference_sdpa(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )


class Attention(nn.Module):
    """Multi-head self-attention; memory kinds reuse `project` / `merge` to attend over their own keys."""

    def __init__(self, d_model: int, num_heads: int, *, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=True)  # one GEMM for q, k and v
        self.out = nn.Linear(d_model, d_model, bias=True)
        self.dropout = dropout

    def split_heads(self, x_BSD: Tensor) -> Tensor:
        B, S, _ = x_BSD.shape
        return x_BSD.view(B, S, -1, self.head_dim).transpose(1, 2)

    def project(self, h_BSD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h -> q, k, v, each B x H x S x K."""
        B, S, _ = h_BSD.shape
        qkv = self.qkv(h_BSD).view(B, S, 3, -1, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def merge(self, o_BHSK: Tensor) -> Tensor:
        """B x H x S x K -> output projection, B x S x D."""
        B, H, S, K = o_BHSK.shape
        return self.out(o_BHSK.transpose(1, 2).reshape(B, S, H * K))

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False
    ):
        p = self.dropout if self.training else 0.0
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal)

    def forward(self, h_BSD: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = True) -> Tensor:
        q, k, v = self.project(h_BSD)
        return self.merge(
            self.attend(q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None)
        )


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block; the memory kind decides how attention sees the memory."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, *, dropout: float, layer: int):
        super().__init__()
        self.layer = layer
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, num_heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BSD: Tensor, memory, ctx) -> Tensor:
        x_BSD = x_BSD + self.drop(memory.attention(self.layer, self.attn, self.norm1(x_BSD), ctx))
        x_BSD = memory.after_attention(self.layer, x_BSD, ctx)
        return x_BSD + self.drop(self.mlp(self.norm2(x_BSD)))


def init_weights(module: nn.Module, *, num_layers: int) -> None:
    """GPT-2 initialisation: N(0, 0.02), residual output projections scaled by 1 / sqrt(2 L)."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            std = (
                0.02 / math.sqrt(2 * num_layers)
                if name.endswith(("attn.out.weight", "mlp.down.weight"))
                else 0.02
            )
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
