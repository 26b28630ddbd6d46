"""`executed_flops`: the matmul work a piece of training dispatches, counted op by op, checked against products
counted by hand (the ops torch's counter misses included: SDPA's CPU kernel and the in-place addmm_)."""

import torch
import torch.nn.functional as F

from memscale.utils.flops import executed_flops


def test_counts_products_forward_and_backward():
    a = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(16, 4, requires_grad=True)
    assert executed_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    # Backward: dA = dC B^T and dB = A^T dC, each the forward's size.
    assert executed_flops(lambda: (a @ b).sum().backward()) == 3 * 2 * 8 * 16 * 4


def test_counts_inplace_addmm():
    acc = torch.zeros(4, 16)
    g, h = torch.randn(32, 4), torch.randn(32, 16)
    assert executed_flops(lambda: acc.addmm_(g.t(), h)) == 2 * 4 * 32 * 16


def test_counts_cpu_attention_causal_triangle_and_masked_whole():
    B, H, T, K = 2, 3, 10, 8
    q, k, v = (torch.randn(B, H, T, K, requires_grad=True) for _ in range(3))
    pair = 2 * 2 * B * H * K  # QK^T and PV: two multiply-adds of width K per visible (query, key) pair
    triangle = T * (T + 1) // 2
    assert executed_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)) == pair * triangle
    # An explicit mask: the kernel cannot skip tiles, every pair is computed.
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    assert executed_flops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) == pair * T * T
    # Backward recomputes the scores and forms dV, dP, dQ, dK: five products, 2.5x the forward's two.
    total = executed_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward())
    assert total == pair * triangle + round(2.5 * pair * triangle)
