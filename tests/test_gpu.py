"""Every memory kind's training window on CUDA: the Triton kernels against the torch backend, and bf16 against
fp32. Run on a GPU machine with

    pytest -m gpu tests/test_gpu.py

Without a CUDA device every test here is skipped with its reason (the default `-m "not slow"` run collects them
and skips them). On CPU the same kernels are checked under Triton's interpreter (tests/test_triton_kernels.py).
"""

from typing import get_args

import pytest
import torch

from memscale.config import MemoryKindName, own_memory_grad

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA device: the Triton kernels compile for GPUs (CPU: tests/test_triton_kernels.py)",
    ),
]
KINDS = get_args(MemoryKindName)


def train_window(kind: str, *, backend: str, dtype: str = "float32", device: str = "cuda"):
    """Mean loss and parameter gradients (float32) of one training window of 3 segments of a tiny model of
    `kind`, its own memory gradient mode (BPTT, replay or detached), with the kernels of `backend`. N = 40 basis
    functions (infinity) take one masked block of the Gaussian read; V = 50 one masked block of the loss."""
    from memscale import kernels
    from memscale.train.bptt import run_window
    from memscale.train.precision import autocast
    from tests.helpers import random_batches, tiny_model

    model = tiny_model(kind, "model.memory.num_basis=40", "model.memory.num_samples=16", seed=0)
    model.to(device=device)
    batches = [b.to(device) for b in random_batches(3, seed=1)]
    torch.manual_seed(2)  # dropout-free, but ∞-former's sticky memories draw from the default generator
    with kernels.use_backend(backend), autocast(dtype, device):  # train.dtype, as the trainer runs it
        r = run_window(model, batches, model.init_state(2), memory_grad=own_memory_grad(kind))
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return r.loss_sum / r.num_targets, grads


@pytest.mark.parametrize("kind", KINDS)
def test_training_window_triton_matches_torch(kind):
    """fp32: the loss within 1e-5 relative, every gradient within 1e-4 of its own largest entry (the kernels sum
    in another order; float32 dots in the kernels are exact, not TF32; torch's CUDA matmuls are fp32 by default)."""
    loss_t, grads_t = train_window(kind, backend="triton")
    loss_r, grads_r = train_window(kind, backend="torch")
    assert abs(loss_t - loss_r) <= 1e-5 * abs(loss_r)
    assert grads_t.keys() == grads_r.keys()
    for name, want in grads_r.items():
        scale = want.abs().max().clamp_min(1e-30)
        torch.testing.assert_close(grads_t[name] / scale, want / scale, rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_training_window_bf16_close_to_fp32(kind):
    """bf16 compute (autocast over float32 weights, train.dtype=bfloat16) through the Triton kernels against the
    fp32 torch run: bf16 keeps 8 bits of
    mantissa (relative rounding 2^-9 per value), so the mean loss agrees within 2% and every parameter's gradient
    points the same way (cosine >= 0.99; measured >= 0.999 for every kind under the CPU interpreter); a gradient
    that is zero in fp32 (a part the window does not reach) is zero in bf16 too."""
    loss_b, grads_b = train_window(kind, backend="triton", dtype="bfloat16")
    loss_f, grads_f = train_window(kind, backend="torch")
    assert abs(loss_b - loss_f) <= 2e-2 * abs(loss_f)
    assert grads_b.keys() == grads_f.keys()
    for name, want in grads_f.items():
        got = grads_b[name]
        if not want.any():
            assert not got.any(), name
            continue
        cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
        assert cos >= 0.99, (name, float(cos))
