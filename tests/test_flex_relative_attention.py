"""FlexAttention's relative attention (`model.attention=flex`, the GPU path) against the blockwise kernel.

On CPU torch compiles FlexAttention for inference only (no backward, no log-sum-exp), so these tests check the
forward output under no_grad; training windows through it (gradients, LaMemo's log-normaliser) are checked on a
GPU by tests/test_gpu.py. Every case has several of FlexAttention's 128-wide tiles, some fully hidden (skipped by
the block mask) and some partly (masked inside), so the block mask and the score modification both act."""

import pytest
import torch

from memscale.kernels.flex_relative_attention import flex_relative_attention
from memscale.kernels.relative_attention import relative_attention

pytest.importorskip("torch.nn.attention.flex_attention")


def _inputs(B, H, Q, N, K, R, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(*s, generator=g)
        for s in ((B, H, Q, K), (B, H, Q, K), (B, H, N, K), (B, H, N, K), (R, H, K))
    ]


@pytest.mark.parametrize(
    "case",
    [
        # Transformer-XL: T = 256 queries over [M = 128 memory; segment], the first 40 slots of one row invalid.
        dict(Q=256, M=128, window=0, invalid=40),
        # same_length: each query sees exactly the last M positions.
        dict(Q=256, M=128, window=128, invalid=0),
        # LaMemo's look-ahead as the kernel sees it (lamemo.py `attend_fused`): shift 0, queries over as many keys.
        dict(Q=256, M=0, window=0, invalid=0),
    ],
    ids=["xl", "same-length", "look-ahead"],
)
def test_forward_matches_blockwise(case):
    """Outputs within 2e-5 (float32; FlexAttention and the kernel sum in different orders)."""
    B, H, K = 2, 2, 16
    Q, M = case["Q"], case["M"]
    N = M + Q
    qu, qv, k, v, r = _inputs(B, H, Q, N, K, R=N)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, : case["invalid"]] = False
    with torch.no_grad():
        want, _ = relative_attention(qu, qv, k, v, r, shift=M, window=case["window"], key_valid_BN=valid)
        got, lse = flex_relative_attention(
            qu, qv, k, v, r, shift=M, window=case["window"], key_valid_BN=valid, return_lse=False
        )
    assert lse is None
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    # The position term matters here: without it (r = 0) the output moves by far more than the tolerance.
    with torch.no_grad():
        plain, _ = flex_relative_attention(
            qu,
            qv,
            k,
            v,
            torch.zeros_like(r),
            shift=M,
            window=case["window"],
            key_valid_BN=valid,
            return_lse=False,
        )
    assert (plain - want).abs().max() > 1e-2


def test_refuses_a_short_table():
    qu, qv, k, v, r = _inputs(1, 1, 8, 8, 4, R=4)
    with pytest.raises(ValueError, match="distances reach 7 but r has 4 rows"):
        flex_relative_attention(qu, qv, k, v, r, shift=0, return_lse=False)


@pytest.mark.parametrize("kind", ["xl", "infinity"])
def test_model_forward_flex_matches_fused(kind):
    """The wiring: a model built with `model.attention=flex` (config for CUDA; run here under no_grad, which CPU
    compiles) gives the loss of the same model with the blockwise kernel, over two segments of 160 tokens (the
    second over a full memory). xl and ∞-former's short-term memory need no log-sum-exp; LaMemo's does, so its
    flex path is checked on a GPU (tests/test_gpu.py)."""
    from tests.helpers import random_batches, tiny_model

    losses = {}
    for attention in ("fused", "flex"):
        model = tiny_model(kind, f"model.attention={attention}", "train.device=cuda", "data.segment_len=160")
        model.eval()
        state = model.init_state(2)
        total = 0.0
        with torch.no_grad():
            for b in random_batches(2, T=160, seed=1):
                out = model.step(
                    b.tokens_BT, state, targets_BT=b.targets_BT, reset_B=b.reset_B, return_logits=False
                )
                total += float(out.loss_sum)
                state = out.state
        losses[attention] = total
    assert losses["flex"] == pytest.approx(losses["fused"], rel=1e-5)


def test_config_refuses_flex_on_cpu():
    from memscale.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="model.attention=flex needs train.device=cuda"):
        config_from_dict({}, ["model.memory.kind=xl", "model.attention=flex", "train.device=cpu"])


def test_forward_under_bf16_autocast():
    """Under bf16 autocast (train.dtype=bfloat16) the projections come out bf16 while q + u is float32: the path
    casts to one dtype, and the output is the float32 kernel's within bf16 rounding (8 bits: 3e-2 at |o| ~ 1)."""
    B, H, Q, M, K = 2, 2, 128, 64, 16
    qu, qv, k, v, r = _inputs(B, H, Q, M + Q, K, R=M + Q)
    with torch.no_grad():
        want, _ = relative_attention(qu, qv, k, v, r, shift=M)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, _ = flex_relative_attention(qu, qv, k.bfloat16(), v.bfloat16(), r, shift=M, return_lse=False)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0, atol=3e-2)
