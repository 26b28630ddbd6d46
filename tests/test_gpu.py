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


def train_window(
    kind: str, *extra: str, backend: str, dtype: str = "float32", device: str = "cuda", T: int = 8
):
    """Mean loss and parameter gradients (float32) of one training window of 3 segments of a tiny model of
    `kind`, its own memory gradient mode (BPTT, replay or detached), with the kernels of `backend`. N = 40 basis
    functions (infinity) take one masked block of the Gaussian read; V = 50 one masked block of the loss."""
    from memscale import kernels
    from memscale.train.bptt import run_window
    from memscale.train.precision import autocast
    from tests.helpers import random_batches, tiny_model

    model = tiny_model(
        kind,
        "model.memory.num_basis=40",
        "model.memory.num_samples=16",
        f"data.segment_len={T}",
        *extra,
        seed=0,
    )
    model.to(device=device)
    batches = [b.to(device) for b in random_batches(3, seed=1, T=T)]
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


@pytest.mark.parametrize("attention", ["fused", "flex"])
@pytest.mark.parametrize("kind", ["xl", "lamemo", "infinity"])
def test_relative_attention_fused_matches_reference(kind, attention):
    """The fused relative attention on CUDA against the reference path with materialised scores, fp32, at
    T = M = 160, so the window's second and third segments attend over a full memory: the blockwise kernel
    (`model.attention=fused`, plain torch ops: three query blocks of 64, the last partial) and FlexAttention
    (`flex`: two 128-wide tiles, the last partial; its backward and LaMemo's log-normaliser run only here). Loss
    within 1e-5, every gradient within 1e-4 of its own largest entry (the kernels sum in another order)."""
    extra = ("train.device=cuda",) if attention == "flex" else ()
    loss_f, grads_f = train_window(kind, f"model.attention={attention}", *extra, backend="torch", T=160)
    loss_r, grads_r = train_window(kind, "model.attention=reference", backend="torch", T=160)
    assert abs(loss_f - loss_r) <= 1e-5 * abs(loss_r)
    assert grads_f.keys() == grads_r.keys()
    for name, want in grads_r.items():
        scale = want.abs().max().clamp_min(1e-30)
        torch.testing.assert_close(grads_f[name] / scale, want / scale, rtol=0, atol=1e-4, msg=name)


def test_rmt_split_attention_matches_masked():
    """rmt's read/write mask on CUDA as three attentions with no mask tensor (`model.attention=fused`: the read
    block, the segment under a lower-right causal bias, the write block; flash or memory-efficient kernels that
    skip hidden tiles) against one attention under the explicit S x S mask (`reference`), fp32, T = 160, BPTT
    through the window. Loss within 1e-5, every gradient within 1e-4 of its own largest entry."""
    loss_s, grads_s = train_window("rmt", "model.attention=fused", backend="torch", T=160)
    loss_m, grads_m = train_window("rmt", "model.attention=reference", backend="torch", T=160)
    assert abs(loss_s - loss_m) <= 1e-5 * abs(loss_m)
    assert grads_s.keys() == grads_m.keys()
    for name, want in grads_m.items():
        scale = want.abs().max().clamp_min(1e-30)
        torch.testing.assert_close(grads_s[name] / scale, want / scale, rtol=0, atol=1e-4, msg=name)


def test_bench_throughput_bf16_every_kind(tmp_path):
    """`memscale bench throughput --device cuda --dtype bfloat16` end to end at a tiny shape: every kind and the
    GPT-2 reference get a row with tokens/s, an MFU against the device's peak and the peak memory of its step."""
    import json
    import subprocess
    import sys

    tiny = (
        "--set model.d_model=64 --set model.num_layers=2 --set model.num_heads=2 --set model.vocab_size=256"
    )
    args = f"throughput --device cuda --dtype bfloat16 --kinds all --steps 1 --rounds 1 {tiny} --set data.segment_len=64"
    r = subprocess.run(
        [sys.executable, "-m", "memscale.cli", "bench", *args.split(), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (path,) = tmp_path.glob("throughput-*.json")
    result = json.loads(path.read_text())
    assert result["order"] == "sequential" and result["shape"]["dtype"] == "bfloat16"
    rows = {row["kind"]: row for row in result["rows"]}
    assert set(KINDS) <= set(rows)
    for kind, row in rows.items():
        assert row["step_tokens_per_s"] > 0 and 0 < row["mfu_step"] < 1 and row["peak_memory_gb"] > 0, kind
