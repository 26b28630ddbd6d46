"""The blockwise relative-position attention (memscale/kernels/relative_attention.py) against its references.

1. The kernel against the explicit formula (every (i, j) gathers r[dist(i, j)]; dense masked softmax), in float64:
   outputs, log-sum-exp and the gradients of qu, qv, k, v and r through both (the lse gradient is LaMemo's
   interpolation path), to 1e-10. Float64 leaves only summation order between the two, ~1e-15; a wrong band row, a
   shifted placement or a mask off by one moves them by >= 1e-3.
2. xl and lamemo with `model.attention=fused` against `model.attention=reference` (the official-code formula with
   rel_shift and materialised scores): window loss, every carried state tensor and every parameter gradient, over
   three segments. The block is set to 3 queries so that segments of 8 run several blocks, diagonal ones
   included. Tolerance 1e-6 absolute + 1e-5 relative in fp32: the fused path sums in another order (a blockwise
   softmax, the memory's keys projected apart from the segment's), measured <= 5e-7; a real error is >= 1e-3.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import memscale.kernels.relative_attention as ra
from memscale.config import ConfigError, config_from_dict
from memscale.kernels.relative_attention import relative_attention
from memscale.models.layers import reference_attention
from memscale.train.bptt import run_window
from tests.helpers import TINY, random_batches, tiny_model


def _explicit(qu, qv, k, v, r_RHK, *, shift, window, key_valid_BN):
    B, H, Q, K = qu.shape
    N, R = k.shape[2], r_RHK.shape[0]
    dist_QN = torch.arange(Q)[:, None] - torch.arange(N)[None, :] + shift
    r_QNHK = r_RHK[(R - 1 - dist_QN).clamp(0, R - 1)]  # row R-1-d holds distance d
    s = (qu @ k.transpose(-1, -2) + torch.einsum("bhqk,qnhk->bhqn", qv, r_QNHK)) * K**-0.5
    hidden_QN = dist_QN < 0
    if window:
        hidden_QN |= dist_QN >= window
    s = s.masked_fill(hidden_QN, float("-inf"))
    if key_valid_BN is not None:
        s = s.masked_fill(~key_valid_BN[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)


@pytest.mark.parametrize("keep", [True, False], ids=["keep-probs", "recompute"])
@pytest.mark.parametrize(
    "Q, N, shift, window, invalid",
    [
        (7, 12, 5, 0, False),  # xl: M = 5 memory keys before 7 queries
        (7, 12, 5, 5, True),  # same_length, empty memory slots
        (10, 15, 5, 0, True),  # M != T
        (9, 9, 0, 0, True),  # lamemo's reversed look-ahead: shift 0, square
        (6, 14, 8, 4, False),  # window shorter than the memory
    ],
)
def test_kernel_equals_explicit_formula(Q, N, shift, window, invalid, keep):
    g = torch.Generator().manual_seed(Q * N + shift)
    B, H, K, R = 2, 3, 4, Q + shift + 2

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    qu, qv, k, v, r = t(B, H, Q, K), t(B, H, Q, K), t(B, H, N, K), t(B, H, N, K), t(R, H, K)
    key_valid = None
    if invalid:
        key_valid = torch.ones(B, N, dtype=torch.bool)
        # Row 0's oldest memory is empty: the first keys (xl's order), or the last ones for the reversed
        # look-ahead, whose key 0 (the segment's first token) every query sees.
        key_valid[0, : max(shift - 2, 0)] = False
        if not shift:
            key_valid[0, -3:] = False
    o, lse = relative_attention(
        qu, qv, k, v, r, shift=shift, window=window, key_valid_BN=key_valid, block=3, keep=keep
    )
    o_ref, lse_ref = _explicit(qu, qv, k, v, r, shift=shift, window=window, key_valid_BN=key_valid)
    assert lse.dtype == torch.float64
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, lse_ref, atol=1e-10, rtol=1e-10)
    do, dlse = torch.randn_like(o), torch.randn_like(lse)
    grads = torch.autograd.grad((o * do).sum() + (lse * dlse).sum(), (qu, qv, k, v, r))
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (lse_ref * dlse).sum(), (qu, qv, k, v, r))
    for name, a, b in zip(("qu", "qv", "k", "v", "r"), grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"grad {name}")


def test_kernel_checks_its_inputs():
    x = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="r has 5 rows"):
        relative_attention(x, x, x, x, torch.zeros(5, 2, 8), shift=2)
    with pytest.raises(ValueError, match="must be \\[R, 2, 8\\]"):
        relative_attention(x, x, x, x, torch.zeros(9, 8), shift=2)


def test_kernel_lse_is_float32_for_float32():
    x = torch.randn(1, 2, 4, 8)
    _, lse = relative_attention(x, x, x, x, torch.randn(6, 2, 8), shift=2)
    assert lse.dtype == torch.float32


# -- the kinds: fused against reference ----------------------------------------------------------------------------
CASES = {
    "M=T": [],
    "M<T": ["model.memory.mem_len=5"],
    "M>T": ["model.memory.mem_len=12"],
    "same_length": ["model.memory.same_length=true"],
    "same_length,M>T": ["model.memory.same_length=true", "model.memory.mem_len=12"],
    "clamp_len": ["model.memory.clamp_len=3"],
}


@contextlib.contextmanager
def _count_kernel_calls(monkeypatch):
    calls = [0]
    apply = ra._RelativeAttention.apply

    def counted(*args):
        calls[0] += 1
        return apply(*args)

    monkeypatch.setattr(ra._RelativeAttention, "apply", counted)
    yield calls


def _window(model, batches, *, reference: bool):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with reference_attention() if reference else contextlib.nullcontext():
        out = run_window(model, batches, model.init_state(2), memory_grad="detached")
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(fast, g_fast, ref, g_ref, tol):
    torch.testing.assert_close(torch.tensor(fast.loss_sum), torch.tensor(ref.loss_sum), **tol)
    assert list(fast.state) == list(ref.state)
    for name in ref.state:
        torch.testing.assert_close(fast.state[name], ref.state[name], **tol, msg=f"state {name}")
    assert g_fast.keys() == g_ref.keys() and len(g_ref) > 0
    for name, g in g_ref.items():
        torch.testing.assert_close(g_fast[name], g, **tol, msg=f"grad {name}")


TOL = {"atol": 1e-6, "rtol": 1e-5}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["xl", "lamemo"])
def test_fused_equals_reference(kind, case, monkeypatch):
    monkeypatch.setattr(ra, "DEFAULT_BLOCK", 3)  # segments of 8: blocks of 3, 3 and 2 queries
    model = tiny_model(kind, *CASES[case])
    assert model.cfg.attention == "fused"
    per_layer = 1 if kind == "xl" else 2  # lamemo: the segment's attention and the memory's look-ahead
    _fused_against_reference(model, per_layer, monkeypatch)


def _fused_against_reference(model, calls_per_layer: int, monkeypatch) -> None:
    """Three segments, the first with an empty memory (invalid slots) and row 1 restarting its document at the
    third, so that one row has a full memory while the other's is empty: the kernel runs `calls_per_layer` times per
    layer and segment, the reference not at all, with the same loss, states and gradients."""
    batches = random_batches(3, reset_at={2: [1]})
    with _count_kernel_calls(monkeypatch) as calls:
        fast, g_fast = _window(model, batches, reference=False)
    assert calls[0] == 3 * model.cfg.num_layers * calls_per_layer
    with _count_kernel_calls(monkeypatch) as calls:
        ref, g_ref = _window(model, batches, reference=True)
    assert calls[0] == 0
    _assert_same(fast, g_fast, ref, g_ref, TOL)


@pytest.mark.parametrize("kind", ["xl", "lamemo"])
def test_config_key_selects_the_reference(kind, monkeypatch):
    monkeypatch.setattr(ra, "DEFAULT_BLOCK", 3)
    fused = tiny_model(kind, "model.memory.mem_len=5")
    ref = tiny_model(kind, "model.memory.mem_len=5", "model.attention=reference")
    batches = random_batches(2)
    with _count_kernel_calls(monkeypatch) as calls:
        r, g_r = _window(ref, batches, reference=False)
    assert calls[0] == 0
    f, g_f = _window(fused, batches, reference=False)
    _assert_same(f, g_f, r, g_r, TOL)


@pytest.mark.parametrize("kind", ["xl", "lamemo"])
def test_dropout_takes_the_reference_path_and_eval_the_kernel(kind, monkeypatch):
    """The kernel has no attention dropout: with model.dropout > 0 training runs the reference (the same random
    draws as `model.attention=reference` under one seed), evaluation (no dropout) runs the kernel."""
    monkeypatch.setattr(ra, "DEFAULT_BLOCK", 3)
    fused = tiny_model(kind, "model.dropout=0.2")
    ref = tiny_model(kind, "model.dropout=0.2", "model.attention=reference")
    batches = random_batches(2)
    with _count_kernel_calls(monkeypatch) as calls:
        f, g_f = _window(fused, batches, reference=False)
    assert calls[0] == 0
    r, g_r = _window(ref, batches, reference=False)
    _assert_same(f, g_f, r, g_r, {"atol": 0.0, "rtol": 0.0})
    fused.eval()
    ref.eval()
    with torch.no_grad(), _count_kernel_calls(monkeypatch) as calls:
        out_f = fused.step(batches[0].tokens_BT, fused.init_state(2), targets_BT=batches[0].targets_BT)
    assert calls[0] > 0
    with torch.no_grad():
        out_r = ref.step(batches[0].tokens_BT, ref.init_state(2), targets_BT=batches[0].targets_BT)
    torch.testing.assert_close(out_f.loss_sum, out_r.loss_sum, **TOL)


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("kind", ["xl", "lamemo"])
def test_fused_under_activation_checkpointing(kind, mode, monkeypatch):
    """Non-reentrant checkpointing replays the block: the kernel is deterministic, so the gradients are bitwise
    those of the plain run."""
    monkeypatch.setattr(ra, "DEFAULT_BLOCK", 3)
    model = tiny_model(kind, "model.memory.mem_len=5")
    batches = random_batches(2)
    plain, g_plain = _window(model, batches, reference=False)
    model.set_activation_checkpointing(mode)
    with _count_kernel_calls(monkeypatch) as calls:
        ckpt, g_ckpt = _window(model, batches, reference=False)
    per_layer = 1 if kind == "xl" else 2
    assert calls[0] == 2 * 2 * model.cfg.num_layers * per_layer  # each block's forward runs twice
    _assert_same(ckpt, g_ckpt, plain, g_plain, {"atol": 0.0, "rtol": 0.0})


def test_attention_key_is_validated():
    with pytest.raises(ConfigError, match="model.attention"):
        config_from_dict({}, [*TINY, "model.attention=flash"])


INFINITY_CASES = {
    "M=T": [],
    "M=2T": ["model.memory.mem_len=16"],
    "same_length,M=2T": ["model.memory.same_length=true", "model.memory.mem_len=16"],
    "clamp_len": ["model.memory.clamp_len=3"],
}


@pytest.mark.parametrize("case", list(INFINITY_CASES))
def test_infinity_short_term_attention_fused_equals_reference(case, monkeypatch):
    """∞-former's short-term memory is xl's attention: the kernel serves it too (one call per layer and segment),
    with the same loss, states and gradients as the official formula; the third segment reads a long-term memory
    that the first filled, and row 1 restarts its document there."""
    monkeypatch.setattr(ra, "DEFAULT_BLOCK", 3)
    model = tiny_model(
        "infinity", "model.memory.num_basis=16", "model.memory.num_samples=16", *INFINITY_CASES[case]
    )
    _fused_against_reference(model, 1, monkeypatch)
