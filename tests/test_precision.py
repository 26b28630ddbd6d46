"""train.dtype=bfloat16: bf16 compute under autocast over float32 weights, gradients and memory state
(memscale/train/precision.py). Run on CPU at a tiny shape (CPU autocast follows the same rules as CUDA's for the ops
here; the CUDA run itself is tests/test_gpu.py)."""

from typing import get_args

import pytest
import torch

from memscale.config import MemoryKindName, own_memory_grad
from memscale.train.bptt import run_window
from memscale.train.precision import autocast
from tests.helpers import random_batches, tiny_model

KINDS = get_args(MemoryKindName)


def window(kind: str, dtype: str):
    model = tiny_model(kind, "model.memory.num_basis=16", "model.memory.num_samples=16", seed=0)
    batches = random_batches(3, seed=1)
    torch.manual_seed(2)  # ∞-former's sticky memories draw from the default generator
    with autocast(dtype, "cpu"):
        r = run_window(model, batches, model.init_state(2), memory_grad=own_memory_grad(kind))
    return model, r


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_keeps_float32_weights_gradients_and_state(kind):
    """bf16 keeps 8 bits of mantissa (2^-9 relative rounding per value): the mean loss within 2% of float32 and
    every gradient pointing the same way (cosine >= 0.99); and the bf16 run must differ from float32 at all, or
    autocast did not engage."""
    model_f, ref = window(kind, "float32")
    model_b, got = window(kind, "bfloat16")
    assert all(p.dtype == torch.float32 for p in model_b.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model_b.parameters())
    assert {n: t.dtype for n, t in got.state.items()} == {n: t.dtype for n, t in ref.state.items()}
    assert all(t.dtype in (torch.float32, torch.bool, torch.int64) for t in got.state.tensors.values())
    assert got.loss_sum != ref.loss_sum
    assert abs(got.loss_sum - ref.loss_sum) <= 2e-2 * abs(ref.loss_sum)
    grads_f = {n: p.grad for n, p in model_f.named_parameters() if p.grad is not None}
    grads_b = {n: p.grad for n, p in model_b.named_parameters() if p.grad is not None}
    assert grads_b.keys() == grads_f.keys()
    for name, want in grads_f.items():
        if not want.any():
            continue
        cos = torch.nn.functional.cosine_similarity(grads_b[name].flatten(), want.flatten(), dim=0)
        assert cos >= 0.99, (name, float(cos))


def test_float32_is_no_autocast_and_other_dtypes_are_refused():
    with autocast("float32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bfloat16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="train.dtype='float16' is not one of float32, bfloat16"):
        autocast("float16", "cpu")
