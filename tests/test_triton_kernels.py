"""Triton kernels against their torch references, forward and backward.

Without a GPU the kernels run on CPU tensors under Triton's interpreter: `TRITON_INTERPRET=1` is set by
tests/conftest.py (and below, for a run of this file alone), before anything imports triton (`@triton.jit` reads it
at import). With a GPU the same tests run the
compiled kernels on it. The interpreter runs each program in Python, so the shapes are small but every one spans
several program blocks and ends in a masked tail (the tiling is passed in to make that so at small sizes).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from memscale import kernels  # noqa: E402
from memscale.config import ConfigError  # noqa: E402
from memscale.data.batch import IGNORE_INDEX  # noqa: E402
from memscale.kernels.cross_entropy import fused_linear_cross_entropy, reference_linear_cross_entropy  # noqa: E402
from memscale.kernels.gaussian_read import gaussian_read, reference_gaussian_read  # noqa: E402
from memscale.kernels.slot_attention import reference_slot_attention, slot_attention  # noqa: E402
from memscale.models.memory.infinity import basis_parameters  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _blocks(size: int, block: int) -> int:
    return -(-size // block)


# -- cross-entropy ----------------------------------------------------------------------------------------------


def test_cross_entropy_kernel_loss_lse_and_grad():
    """One pass of the kernel gives each row's loss and log-normaliser and overwrites the logits with softmax -
    onehot; V = 300 in blocks of 128 is three blocks, the last with 44 of 128 columns. Logits up to ~+-60 check
    the online max (a plain exp would overflow at 89). fp32: only the summation order differs from torch, 1e-5."""
    from memscale.kernels.triton.cross_entropy import cross_entropy_loss_grad_

    N, V, block = 7, 300, 128
    assert _blocks(V, block) == 3 and V % block
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, V, generator=g) * 20).to(DEVICE)
    y = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    y[2] = IGNORE_INDEX
    y[4] = V - 1  # the target in the masked tail block
    work = logits.clone()
    loss_N, lse_N = cross_entropy_loss_grad_(
        work, y, ignore_index=IGNORE_INDEX, write_grad=True, block_v=block
    )
    ref_loss = torch.nn.functional.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(loss_N, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_N, logits.logsumexp(-1), rtol=1e-6, atol=1e-5)
    assert loss_N[2] == 0
    ref_grad = torch.softmax(logits, -1)
    ref_grad[torch.arange(N), y.clamp(min=0)] -= 1
    ref_grad[2] = 0
    torch.testing.assert_close(work, ref_grad, rtol=1e-5, atol=1e-6)
    # Without the gradient the logits are left alone.
    work = logits.clone()
    cross_entropy_loss_grad_(work, y, ignore_index=IGNORE_INDEX, write_grad=False, block_v=block)
    assert torch.equal(work, logits)


@pytest.mark.parametrize("grad", [True, False])
def test_fused_linear_cross_entropy_triton_matches_reference(grad, monkeypatch):
    """The chunked projection + loss with the Triton kernel per chunk: 50 rows in chunks of 16 (four, the last of
    2 rows) and V = 300 in vocabulary blocks of 128; loss and both gradients within 1e-5 relative of the plain
    `F.cross_entropy(h @ W.T)` (fp32, summation order only); without a graph, the loss alone."""
    import memscale.kernels.triton.cross_entropy as triton_ce

    monkeypatch.setattr(triton_ce, "MAX_BLOCK_V", 128)
    g = torch.Generator().manual_seed(1)
    N, D, V, chunk = 50, 24, 300, 16
    h = torch.randn(N, D, generator=g).to(DEVICE).requires_grad_(grad)
    w = torch.randn(V, D, generator=g).to(DEVICE).requires_grad_(grad)
    y = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    y[::6] = IGNORE_INDEX
    ref = reference_linear_cross_entropy(h, w, y)
    out = fused_linear_cross_entropy(h, w, y, chunk=chunk, backend="triton")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    if not grad:
        assert not out.requires_grad
        return
    ref_grads = torch.autograd.grad(ref * 0.37, (h, w))
    grads = torch.autograd.grad(out * 0.37, (h, w))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# -- ∞-former Gaussian read -------------------------------------------------------------------------------------


def _read_inputs(B=2, H=2, T=37, N=40, K=20, seed=2):
    g = torch.Generator().manual_seed(seed)
    mu_N, sigma_N = (t.float().to(DEVICE) for t in basis_parameters(N))
    # Densities as the model makes them: mu = sigmoid(.) in (0, 1), sigma^2 = softplus(.) >= 1e-4, from the
    # narrow (comparable to the basis widths) to the wide.
    mu = torch.sigmoid(torch.randn(B, H, T, generator=g) * 2).to(DEVICE).requires_grad_()
    sigma_sq = (10 ** (torch.rand(B, H, T, generator=g) * 3 - 4)).to(DEVICE).requires_grad_()
    values = torch.randn(B, H, N, K, generator=g).to(DEVICE).requires_grad_()
    return mu, sigma_sq, mu_N, sigma_N, values


def test_gaussian_read_matches_reference_forward_and_backward():
    """T = 37 queries in blocks of 16 (three, the last of 5), N = 40 basis functions in blocks of 16 (three, the
    last of 8) and K = 20 padded to 32: the context and the gradients of mu, sigma^2 and the values within 1e-5
    relative to the largest entry of the torch reference (fp32; the kernels sum over n and t in another order)."""
    mu, sigma_sq, mu_N, sigma_N, values = _read_inputs()
    blocks = (16, 16)
    assert _blocks(37, 16) == 3 and _blocks(40, 16) == 3
    out = gaussian_read(mu, sigma_sq, mu_N, sigma_N, values, backend="triton", blocks=blocks)
    ref = reference_gaussian_read(mu, sigma_sq, mu_N, sigma_N, values)
    dout = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (mu, sigma_sq, values), dout)
    ref_grads = torch.autograd.grad(ref, (mu, sigma_sq, values), dout)
    for name, got, want in zip(
        ("out", "mu", "sigma_sq", "values"), (out, *grads), (ref, *ref_grads), strict=True
    ):
        scale = want.abs().max()
        assert scale > 0, name
        torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=1e-5, msg=name)


def test_gaussian_read_bf16_computes_in_float32():
    """bf16 inputs: the kernels form and sum every product in float32, so against the float32 reference on the
    same bf16-rounded inputs the context and gradients differ only by their final conversion to bf16, at most one
    unit in the last place (2^-7 relative; Triton's interpreter truncates where the GPU rounds to nearest): within
    2^-7 of each one's largest entry."""
    mu, sigma_sq, mu_N, sigma_N, values = (t.detach().bfloat16() for t in _read_inputs())
    leaves = [t.requires_grad_() for t in (mu, sigma_sq, values)]
    out = gaussian_read(mu, sigma_sq, mu_N, sigma_N, values, backend="triton", blocks=(16, 16))
    assert out.dtype == torch.bfloat16
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).bfloat16().to(DEVICE)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref = reference_gaussian_read(ref_leaves[0], ref_leaves[1], mu_N.float(), sigma_N.float(), ref_leaves[2])
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.float())
    for name, got, want in zip(
        ("out", "mu", "sigma_sq", "values"), (out, *grads), (ref, *ref_grads), strict=True
    ):
        assert got.dtype == torch.bfloat16, name
        scale = want.abs().max()
        torch.testing.assert_close(got.float() / scale, want / scale, rtol=0, atol=2**-7, msg=name)


def test_gaussian_read_refuses_a_learned_basis():
    mu, sigma_sq, mu_N, sigma_N, values = _read_inputs(T=4, N=4, K=4)
    with pytest.raises(ValueError, match="fixed buffers"):
        gaussian_read(mu, sigma_sq, mu_N.requires_grad_(), sigma_N, values, backend="triton")


# -- Memformer slot write ---------------------------------------------------------------------------------------


def _slot_inputs(B=2, H=2, M=20, T=37, K=20, seed=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, M, K, generator=g)
    k = torch.randn(B, H, M + T, K, generator=g)
    v = torch.randn(B, H, M + T, K, generator=g)
    mask = torch.cat([torch.eye(M, dtype=torch.bool), torch.ones(M, T, dtype=torch.bool)], dim=1)
    # The writer's scale at temperature 0.5: sharp rows, where an online softmax without its max would overflow.
    scale = 1.0 / (K**0.5 * 0.5)
    leaves = [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]
    return leaves, mask.to(DEVICE), scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_attention_matches_reference_forward_and_backward(dtype):
    """M = 20 slots in blocks of 16 (two, the last of 4), T = 37 tokens in blocks of 16 (three, the last of 5), K =
    20 padded to 32: the output and the gradients of q, k (own and token keys) and v against the model's masked
    SDPA. fp32: within 1e-5 of each one's largest entry (summation order only). bf16: the kernels compute in
    float32, so against the float32 reference on the same bf16 inputs they differ by the final rounding to bf16,
    within 2^-7 of the largest entry (one unit in the last place; the interpreter truncates)."""
    (q, k, v), mask, scale = _slot_inputs(dtype=dtype)
    assert _blocks(20, 16) == 2 and _blocks(37, 16) == 3
    out = slot_attention(q, k, v, mask_MS=mask, scale=scale, backend="triton", blocks=(16, 16))
    assert out.dtype == dtype
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = reference_slot_attention(*ref_leaves, mask_MS=mask, scale=scale)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.float())
    atol = 1e-5 if dtype == torch.float32 else 2**-7
    for name, got, want in zip(("out", "q", "k", "v"), (out, *grads), (ref, *ref_grads), strict=True):
        assert got.dtype == dtype, name
        scale_ = want.abs().max()
        torch.testing.assert_close(got.float() / scale_, want / scale_, rtol=0, atol=atol, msg=name)
    # The own keys and values (rows < M) get gradient, and the other slots' keys do not leak into a slot's row.
    assert grads[1][:, :, :20].abs().max() > 0 and grads[2][:, :, :20].abs().max() > 0


def test_slot_attention_refuses_another_mask():
    (q, k, v), mask, scale = _slot_inputs(M=4, T=3, K=4)
    with pytest.raises(ValueError, match="expected \\(4, 7\\)"):
        slot_attention(q, k, v, mask_MS=mask[:, :6], scale=scale, backend="triton")


# -- the model with the kernels ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, read_params",
    [
        ("infinity", ("memory.mu", "memory.sigma", "memory.key")),
        ("memformer", ("memory.write.q", "memory.write.kv")),
    ],
)
def test_training_window_triton_matches_torch(kind, read_params):
    """A training window of three segments (the last reads the memory the first wrote; ∞-former's long-term memory
    takes a segment once it leaves the short-term cache of one segment) in the kind's own mode
    (∞-former detached, Memformer by memory replay) through the Triton kernels (the loss, and the ∞-former read in
    every layer or the Memformer write) gives the torch backend's loss within 1e-5 and every gradient within 1e-4
    of its own largest entry (fp32; the ∞-former's density gradients come out of sums that cancel to ~1e-7 at
    initialisation, far below the others, and must be right too). N = 40 basis functions, M = 4 slots: one masked
    block each with the default tiling."""
    from memscale.config import own_memory_grad
    from memscale.train.bptt import run_window
    from tests.helpers import random_batches, tiny_model

    batches = [b.to(DEVICE) for b in random_batches(3, seed=3)]
    results = {}
    for choice in ("torch", "triton"):
        model = tiny_model(kind, "model.memory.num_basis=40", "model.memory.num_samples=16", seed=4)
        model.to(DEVICE)
        torch.manual_seed(5)  # sticky-memory sampling draws from the default generator
        with kernels.use_backend(choice):
            r = run_window(model, batches, model.init_state(2), memory_grad=own_memory_grad(kind))
        results[choice] = (r.loss_sum, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (loss_t, grads_t), (loss_r, grads_r) = results["triton"], results["torch"]
    assert abs(loss_t - loss_r) <= 1e-5 * abs(loss_r)
    assert grads_t.keys() == grads_r.keys()
    assert all(any(p in n for n in grads_r) for p in read_params)
    for name, want in grads_r.items():
        scale = want.abs().max()
        assert scale > 0, name
        torch.testing.assert_close(grads_t[name] / scale, want / scale, rtol=0, atol=1e-4, msg=name)


# -- the switch -------------------------------------------------------------------------------------------------


def test_backend_switch(monkeypatch):
    """auto: triton on CUDA, torch on CPU; triton on CPU only under the interpreter, otherwise a clear error
    naming the key (at config load: tests/test_config.py)."""
    assert kernels.backend("cpu") == "torch"
    with kernels.use_backend("torch"):
        assert kernels.backend("cuda:0") == "torch"
    assert kernels.backend("cuda:0") == "triton"  # auto, triton imports here
    with kernels.use_backend("triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert kernels.backend("cpu") == "triton"
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="train.kernels=triton on a cpu tensor"):
            kernels.backend("cpu")
    assert kernels.get_backend_choice() == "auto"
    with pytest.raises(ConfigError, match="must be one of auto, torch, triton"):
        kernels.set_backend("fast")
