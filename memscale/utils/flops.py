"""Measuring this machine's matmul peak, the denominator of model-FLOPs utilisation (MFU), and counting the
matmul FLOPs a piece of training actually executes."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def matmul_flops_per_s(
    *,
    n: int = 1024,
    seconds: float = 0.25,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> float:
    """One sample of the dense matmul rate: repeat an n x n x n matmul for about `seconds`.

    On shared CPUs the rate wanders by ~1.5x within minutes, so callers take the best of several samples
    spread over the run (`PeakMeter`) rather than one reading at start-up.
    """
    # A private generator: sampling the peak between training steps must not move the training RNG (dropout
    # masks, sticky-memory samples), or a resumed run would diverge from an uninterrupted one.
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, dtype=dtype, device=device, generator=g)
    b = torch.randn(n, n, dtype=dtype, device=device, generator=g)
    torch.mm(a, b)  # warm-up: thread pool and allocator
    reps, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        reps += 1
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2.0 * n**3 * reps / elapsed


class PeakMeter:
    """Best matmul rate seen so far; sample it between timed steps, never inside them."""

    def __init__(self, **kw):
        self.kw = kw
        self.best = 0.0

    def sample(self) -> float:
        self.best = max(self.best, matmul_flops_per_s(**self.kw))
        return self.best


# torch's FlopCounterMode counts mm, addmm, bmm, baddbmm, convolutions and the CUDA attention kernels, but not the
# in-place addmm_ (the fused cross-entropy accumulates the output projection's gradient with it) nor SDPA's CPU
# flash kernel, which is where `none`, `rmt`, `memformer` and `armt` spend their attention; without these two a
# count would leave out a third of their work. Formulas for both follow.


def _addmm_inplace_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    m, k = a_shape
    return 2 * m * k * b_shape[1]


def _visible_fraction(s_q: int, s_k: int, is_causal: bool, masked: bool) -> float:
    """Share of the s_q x s_k score matrix the CPU flash kernel computes: all of it with an explicit mask (it
    cannot know which blocks are empty), the causal triangle (query i sees keys 0..i, SDPA's top-left alignment)
    with is_causal. The kernel computes whole diagonal tiles; the triangle is the work attention needs."""
    if not is_causal or masked:
        return 1.0
    visible = sum(min(i + 1, s_k) for i in range(s_q))
    return visible / (s_q * s_k)


def _cpu_flash_forward_flops(q, k, v, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    masked = kwargs.get("attn_mask") is not None
    return round(sdpa_flop_count(q, k, v) * _visible_fraction(q[2], k[2], is_causal, masked))


def _cpu_flash_backward_flops(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    dropout_p=0.0,
    is_causal=False,
    attn_mask=None,
    *args,
    out_shape=None,
    **kwargs,
) -> int:
    # Five products of the forward's two sizes: the scores recomputed from the log-sum-exp, then dV, dP, dQ, dK.
    masked = attn_mask is not None
    return round(2.5 * sdpa_flop_count(q, k, v) * _visible_fraction(q[2], k[2], is_causal, masked))


_EXTRA_FORMULAS = {
    aten.addmm_: _addmm_inplace_flops,
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops,
}


def executed_flops(fn: Callable[[], object]) -> int:
    """Matmul FLOPs (2 per multiply-add) that `fn()` executes, forward and backward, as dispatched: every mm, bmm,
    addmm, convolution and attention kernel, whatever wrote it (a custom autograd Function's products included).

    This is the work a path really does, not the model's nominal FLOPs (`MemoryTransformer.flops_per_token`):
    memory rows projected again, position terms, recomputation and a blockwise kernel's partly hidden tiles all
    count. Dividing two paths' counts says how fast one can run against the other at the same FLOP rate.
    Elementwise work (softmax, norms, activations) is not counted.
    """
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()
