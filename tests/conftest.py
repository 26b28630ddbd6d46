import os

import pytest
import torch

# Two CPU cores are shared by the test processes; one intra-op thread per test keeps timings stable.
torch.set_num_threads(max(1, int(os.environ.get("MEMSCALE_TEST_THREADS", "1"))))


@pytest.fixture
def tiny_overrides():
    return [
        "model.d_model=32",
        "model.num_layers=2",
        "model.num_heads=2",
        "model.vocab_size=50",
        "data.segment_len=8",
        "data.num_streams=2",
    ]
