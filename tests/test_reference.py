"""Every kind's fast path against its plain reference: outputs, carried state and gradients.

Fast: fused attention (`F.scaled_dot_product_attention`), the chunked fused projection + cross-entropy that
projects only scored rows. Reference: the attention formula with materialised logits (`reference_attention`) and
the plain head with `F.cross_entropy` over every row. The two differ only by fp32 summation order (blocked
softmax, chunked matmuls), so they must agree to ~1e-6 relative; the tolerance is 1e-5 absolute + 1e-4 relative,
far below any real bug (a wrong mask or scale moves the loss by > 1e-2). Three segments with BPTT through them
for the kinds whose memory carries gradient, so the gradients include the path through memory.
"""

import pytest
import torch

from memscale.config import GRAD_CARRYING_KINDS
from memscale.data.batch import IGNORE_INDEX
from memscale.models.layers import reference_attention, reference_sdpa, sdpa
from memscale.train.bptt import run_window
from tests.helpers import random_batches, tiny_model

KINDS = ["none", "rmt", "xl", "memformer", "lamemo", "infinity", "armt"]
TOL = {"atol": 1e-5, "rtol": 1e-4}


def _run(model, batches, *, reference: bool):
    model.zero_grad(set_to_none=True)
    model.cfg.fused_loss = not reference
    torch.manual_seed(1)  # infinity samples its sticky memories
    grad = "truncated" if model.cfg.memory.kind in GRAD_CARRYING_KINDS else "detached"
    if reference:
        with reference_attention():
            out = run_window(model, batches, model.init_state(2), memory_grad=grad)
    else:
        out = run_window(model, batches, model.init_state(2), memory_grad=grad)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_equals_reference(kind):
    model = tiny_model(kind, "model.memory.mem_len=8")
    batches = random_batches(3)
    for b in batches:  # sparse targets too, so the scored-rows projection is exercised
        b.targets_BT[0, ::3] = IGNORE_INDEX
    fast, g_fast = _run(model, batches, reference=False)
    ref, g_ref = _run(model, batches, reference=True)
    assert fast.num_targets == ref.num_targets
    torch.testing.assert_close(torch.tensor(fast.loss_sum), torch.tensor(ref.loss_sum), **TOL)
    assert list(fast.state) == list(ref.state)
    for name in ref.state:
        torch.testing.assert_close(fast.state[name], ref.state[name], **TOL, msg=f"state {name}")
    assert g_fast.keys() == g_ref.keys() and len(g_ref) > 0
    for name, g in g_ref.items():
        torch.testing.assert_close(g_fast[name], g, **TOL, msg=f"grad {name}")


@pytest.mark.parametrize(
    "mask",
    ["none", "causal", "bool", "float"],
)
def test_sdpa_equals_reference_formula(mask):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g, requires_grad=True) for _ in range(3))
    kw = {}
    if mask == "causal":
        kw["is_causal"] = True
    elif mask == "bool":
        kw["attn_mask"] = torch.rand(5, 5, generator=g) > 0.3
        kw["attn_mask"][:, 0] = True  # every query sees a key
    elif mask == "float":
        kw["attn_mask"] = torch.randn(2, 3, 5, 5, generator=g)
    fast = sdpa(q, k, v, scale=0.3, **kw)
    ref = reference_sdpa(q, k, v, scale=0.3, **kw)
    torch.testing.assert_close(fast, ref, **TOL)
    gf = torch.autograd.grad(fast.square().sum(), (q, k, v))
    gr = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(gf, gr, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    with reference_attention():  # the switch routes sdpa to the formula
        torch.testing.assert_close(sdpa(q, k, v, scale=0.3, **kw), ref, rtol=0, atol=0)
