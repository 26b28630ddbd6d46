"""Gradient through memory: detached, truncated BPTT of depth k, and memory replay (MRBP)."""

import pytest
import torch

from memscale.train.bptt import run_window
from tests.helpers import random_batches, tiny_model


def _capture_segment_embeddings(model):
    """Keep each segment's token embeddings (one tensor per model.step) with their gradients."""
    captured = []

    def hook(_module, _inp, out):
        out.retain_grad()
        captured.append(out)

    return captured, model.embed.register_forward_hook(hook)


def _grad_norms(captured):
    return [0.0 if e.grad is None else e.grad.abs().sum().item() for e in captured]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_truncated_reaches_exactly_k_segments(k):
    model = tiny_model("rmt")
    state = model.init_state(2)
    captured, handle = _capture_segment_embeddings(model)
    # Two windows of k segments; the loss sits on the last segment only, so any gradient in an earlier segment
    # arrived through the memory.
    batches = random_batches(2 * k, targets_on={2 * k - 1})
    r = run_window(model, batches[:k], state, memory_grad="truncated")
    run_window(model, batches[k:], r.state, memory_grad="truncated")
    handle.remove()
    norms = _grad_norms(captured)
    assert all(n > 0 for n in norms[k:]), norms  # segments t, t-1, ..., t-k+1 get gradient
    assert all(n == 0 for n in norms[:k]), norms  # and none before the window


def test_detached_stops_at_the_segment():
    model = tiny_model("rmt")
    captured, handle = _capture_segment_embeddings(model)
    run_window(model, random_batches(3, targets_on={2}), model.init_state(2), memory_grad="detached")
    handle.remove()
    norms = _grad_norms(captured)
    assert norms[2] > 0 and norms[0] == 0 and norms[1] == 0, norms


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["rmt", "memformer", "armt"])
def test_replay_equals_full_bptt_with_dropout(kind):
    """MRBP recomputes each segment with its saved RNG state: gradients equal plain BPTT.

    Tolerance 1e-6 (absolute, fp32): the recomputation runs the same kernels on the same inputs, so the only
    difference is the order in which gradient contributions are summed into `.grad`.
    """
    batches = random_batches(4, reset_at={2: [1]})
    results = {}
    for mode in ("truncated", "replay"):
        model = tiny_model(kind, "model.dropout=0.1", seed=3)
        model.train()
        torch.manual_seed(7)
        r = run_window(model, batches, model.init_state(2), memory_grad=mode)
        results[mode] = (r, _grads(model), torch.get_rng_state())
    (rt, gt, rng_t), (rr, gr, rng_r) = results["truncated"], results["replay"]
    assert rt.loss_sum == pytest.approx(rr.loss_sum, rel=1e-6)
    assert gt.keys() == gr.keys() and any(n.startswith("memory.") for n in gt)
    for name in gt:
        torch.testing.assert_close(gr[name], gt[name], atol=1e-6, rtol=0, msg=name)
    for name in rt.state:
        torch.testing.assert_close(rr.state[name], rt.state[name], atol=1e-6, rtol=0)
    assert torch.equal(rng_t, rng_r)  # replay leaves the RNG where the plain forward left it


def test_replay_differs_from_detached():
    """Guard against a replay that silently drops the memory gradient (it would equal `detached`)."""
    batches = random_batches(3)
    grads = {}
    for mode in ("detached", "replay"):
        model = tiny_model("rmt", seed=3)
        run_window(model, batches, model.init_state(2), memory_grad=mode)
        grads[mode] = _grads(model)
    diff = max((grads["replay"][n] - grads["detached"][n]).abs().max().item() for n in grads["replay"])
    assert diff > 1e-6


class _Holder:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


class _SavedBytes:
    """Peak bytes held by autograd for backward, counted with saved_tensors_hooks (deterministic, no RSS noise)."""

    def __init__(self):
        self.live = 0
        self.peak = 0

    def pack(self, t):
        import weakref

        holder = _Holder(t)
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(holder, self._free, n)
        return holder

    def _free(self, n):
        self.live -= n

    @staticmethod
    def unpack(holder):
        return holder.t


def _peak_saved_bytes(mode, n, kind="rmt"):
    model = tiny_model(kind, seed=0)
    meter = _SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        run_window(model, random_batches(n), model.init_state(2), memory_grad=mode)
    return meter.peak


@pytest.mark.parametrize("kind", ["rmt", "memformer", "armt"])
def test_replay_saved_bytes_do_not_grow_with_segments(kind):
    replay = [_peak_saved_bytes("replay", n, kind) for n in (2, 8)]
    truncated = [_peak_saved_bytes("truncated", n, kind) for n in (2, 8)]
    assert replay[1] == replay[0], replay  # one segment's graph at a time, whatever the window
    assert truncated[1] > 3 * truncated[0], truncated  # plain BPTT keeps every segment's activations
