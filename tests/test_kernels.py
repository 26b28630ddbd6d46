"""Fused kernels against their plain references."""

import pytest
import torch

from memscale.kernels.cross_entropy import (
    IGNORE_INDEX,
    fused_linear_cross_entropy,
    reference_linear_cross_entropy,
)


@pytest.mark.parametrize("chunk", [7, 64, 1024])
def test_fused_linear_cross_entropy_matches_reference(chunk):
    """Loss and both gradients within 1e-5 relative (fp32; only the summation order differs)."""
    g = torch.Generator().manual_seed(0)
    N, D, V = 100, 24, 300
    h = torch.randn(N, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = IGNORE_INDEX
    ref = reference_linear_cross_entropy(h, w, y)
    (ref * 0.37).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad, w.grad = None, None
    out = fused_linear_cross_entropy(h, w, y, chunk=chunk)
    (out * 0.37).backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h.grad, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, gw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [3, 4, 10])
def test_fused_without_grad_is_loss_only(chunk):
    """Without gradients the loss is summed chunk by chunk (no backward state): 25 rows in chunks of 3, 4 and 10
    (9, 7 and 3 chunks, the last one partial each time) equal the unchunked reference to fp32 rounding."""
    g = torch.Generator().manual_seed(1)
    N = 25
    assert -(-N // chunk) > 1 and N % chunk  # several chunks and a partial last one: the chunked path, really
    h, w = torch.randn(N, 8, generator=g), torch.randn(20, 8, generator=g)
    y = torch.randint(0, 20, (N,), generator=g)
    y[::4] = IGNORE_INDEX
    out = fused_linear_cross_entropy(h, w, y, chunk=chunk)
    assert not out.requires_grad
    torch.testing.assert_close(out, reference_linear_cross_entropy(h, w, y), rtol=1e-6, atol=1e-5)
    # And every chunk is summed: the first chunk alone is less, by more than rounding.
    first = fused_linear_cross_entropy(h[:chunk], w, y[:chunk], chunk=chunk)
    assert (out - first).abs() > 1e-3


def test_model_fused_loss_matches_plain_head():
    """The model's training loss through the fused kernel equals the plain head + F.cross_entropy path."""
    from tests.helpers import random_batches, tiny_model

    b = random_batches(1)[0]
    grads = {}
    for fused in (True, False):
        model = tiny_model("rmt", f"model.fused_loss={str(fused).lower()}", seed=1)
        out = model.step(b.tokens_BT, model.init_state(2), targets_BT=b.targets_BT, return_logits=False)
        out.loss_sum.backward()
        grads[fused] = (out.loss_sum.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-5, atol=1e-5)
    for name, g in grads[False][1].items():
        torch.testing.assert_close(grads[True][1][name], g, rtol=1e-4, atol=1e-6, msg=name)
