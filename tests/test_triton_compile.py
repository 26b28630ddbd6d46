"""Every Triton kernel compiles for the GPUs it is for, on this machine without one (tests/triton_aot_entry.py:
the launches the launchers make at the training shape, compiled by Triton down to a cubin for sm_90 and sm_80)."""

import importlib.util
import json
import subprocess
import sys

import pytest

# Not imported here: triton decides at import whether kernels are interpreted (tests/conftest.py).
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install -e '.[dev]')"
    ),
]

KERNELS = {
    "_ce_loss_grad_kernel",
    "_gaussian_read_fwd",
    "_gaussian_read_bwd_queries",
    "_gaussian_read_bwd_values",
    "_slot_attention_fwd",
    "_slot_attention_bwd_slots",
    "_slot_attention_bwd_tokens",
}
SHARED_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}
"""Dynamic shared memory one block may use: H100/H200 227 KB, A100 163 KB (CUDA's per-architecture limits)."""


def test_every_kernel_compiles_for_hopper_and_ampere():
    """Each kernel, forward and backward, in float32 and bfloat16, for both targets, with its shared memory under
    the target's limit (a launch over it would fail only on the GPU)."""
    r = subprocess.run([sys.executable, "tests/triton_aot_entry.py"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    # A kernel's data dtype is its first pointer argument's (logits, mu or q).
    compiled = {(row["kernel"], row["target"], next(iter(row["signature"].values()))) for row in rows}
    for kernel in KERNELS:
        for target in SHARED_LIMIT:
            dtypes = {dtype for k, t, dtype in compiled if (k, t) == (kernel, target)}
            assert dtypes == {"*fp32", "*bf16"}, (kernel, target, dtypes)
    assert {row["kernel"] for row in rows} == KERNELS
    for row in rows:
        assert row["cubin_bytes"] > 0
        assert row["shared_bytes"] <= SHARED_LIMIT[row["target"]], row
