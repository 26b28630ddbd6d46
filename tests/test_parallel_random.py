"""RNG snapshots with megatron-core's tracker streams, in one process (the tracker needs no process group)."""

from __future__ import annotations

import pytest
import torch

from memscale.parallel.random import RNGBank, model_parallel_seed, replayed_rng, rng_snapshot


@pytest.fixture
def tracker():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from memscale.parallel import cpu_shims

    applied_here = not cpu_shims.cpu_shims_applied()
    cpu_shims.apply_cpu_shims()
    try:
        model_parallel_seed(11, tp_rank=0)
        yield get_cuda_rng_tracker()
    finally:
        if applied_here:
            cpu_shims.remove_cpu_shims()


def _segment(tracker):
    """What a TP segment draws: dropout on replicated activations and in a TP region."""
    with tracker.fork():
        tp = torch.nn.functional.dropout(torch.ones(8), 0.5)
    return torch.rand(8), tp


def test_bank_replays_every_stream(tracker):
    k = 3
    bank = RNGBank(k)
    first = []
    for t in range(k):
        bank.save(t)
        first.append(_segment(tracker))
    after = rng_snapshot()
    for t in reversed(range(k)):
        with replayed_rng(bank[t]):
            again = _segment(tracker)
        assert all(torch.equal(a, b) for a, b in zip(first[t], again, strict=True))
    # Replays leave the ambient streams where the forward pass left them.
    now = rng_snapshot()
    assert torch.equal(now.cpu, after.cpu)
    assert all(torch.equal(now.tracker[n], after.tracker[n]) for n in after.tracker)
    assert (
        set(after.tracker) == set(bank.tracker) and len(bank.tracker) == 3
    )  # data, model and expert streams


def test_tp_stream_is_not_the_default_stream(tracker):
    before = rng_snapshot()
    with tracker.fork():
        forked = torch.rand(8)
    default = torch.rand(8)
    assert not torch.equal(forked, default)
    # The fork drew from its own stream: the default stream did not move while it ran.
    torch.set_rng_state(before.cpu)
    assert torch.equal(torch.rand(8), default)
