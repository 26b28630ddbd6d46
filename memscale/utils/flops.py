"""Measuring this machine's matmul peak, the denominator of model-FLOPs utilisation (MFU)."""

from __future__ import annotations

import time

import torch


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
