import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's CPU interpreter. `@triton.jit` (ours and triton.language's
# own helpers) reads TRITON_INTERPRET when triton is first imported, so it is set here, before any test module or
# torch.compile can import triton (tests/test_triton_kernels.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

VOCAB = 512
"""Tokenizer size of the session's prepared bundled corpus (small: fast to train, enough for every test)."""

# Two CPU cores are shared by the test processes; one intra-op thread per test keeps timings stable.
torch.set_num_threads(max(1, int(os.environ.get("MEMSCALE_TEST_THREADS", "1"))))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The bundled corpus prepared once per test session (tokenizer + token shards), ~2 s."""
    from memscale.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "bundled"
    prepare(out, source="bundled", vocab_size=VOCAB)
    return out
