"""One optimizer step's worth of segments: forward, and backward through (or not through) the memory.

A window is `train.bptt_segments` consecutive segment batches of the same streams. `train.memory_grad` chooses
how gradient treats the memory carried between them:

- detached:  the state is detached before every segment; each segment is backpropagated as soon as it is run,
             so activations of one segment are alive at a time.
- truncated: the state is detached only at the window start; one backward through all k segments (plain BPTT).
             Activations of all k segments are alive at once: memory grows linearly with k.
- replay:    memory replay back-propagation (Memformer, Algorithm 1). Forward without a graph, keeping only the
             state at each segment boundary and the RNG state before each segment; then for t = k..1, recompute
             segment t from its saved state with the same RNG state and backpropagate its loss plus the gradient
             that arrived at its output state from segment t+1. Gradients equal `truncated` (same computation,
             same dropout masks); memory holds k states plus one segment's activations.

The loss of a window is the mean token cross-entropy over all its targets, so the three modes give the same
gradient for the last segment and differ only in what crosses segment boundaries.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from memscale.config import MemoryGrad
from memscale.data.batch import Batch
from memscale.models.memory.base import MemoryState
from memscale.models.transformer import MemoryTransformer


@dataclass
class WindowResult:
    loss_sum: float
    """Sum of token cross-entropies over the window (divide by num_targets for the mean)."""
    num_targets: int
    state: MemoryState
    """The state after the window's last segment, detached: the next window starts from it."""


def _rng_snapshot(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _rng_restore(snap: tuple, device: torch.device) -> None:
    cpu, cuda = snap
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


@contextmanager
def _replayed_rng(snap: tuple, device: torch.device):
    """Run the block under the RNG state `snap`, leaving the ambient RNG as it was."""
    outer = _rng_snapshot(device)
    _rng_restore(snap, device)
    try:
        yield
    finally:
        _rng_restore(outer, device)


def run_window(
    model: MemoryTransformer,
    batches: list[Batch],
    state: MemoryState,
    *,
    memory_grad: MemoryGrad,
    loss_scale: float = 1.0,
) -> WindowResult:
    """Forward and backward over `batches`; gradients accumulate into the model's `.grad`.

    `loss_scale` multiplies the loss before backward (e.g. 1 / gradient-accumulation steps).
    """
    total = sum(b.num_targets for b in batches)
    scale = loss_scale / max(total, 1)
    if memory_grad == "detached":
        return _run_detached(model, batches, state, scale=scale, total=total)
    if memory_grad == "truncated":
        return _run_truncated(model, batches, state, scale=scale, total=total)
    if memory_grad == "replay":
        return _run_replay(model, batches, state, scale=scale, total=total)
    raise ValueError(f"train.memory_grad={memory_grad!r} is not one of detached, truncated, replay")


def _step(model: MemoryTransformer, b: Batch, state: MemoryState):
    return model.step(b.tokens_BT, state, targets_BT=b.targets_BT, reset_B=b.reset_B, return_logits=False)


def _backward(loss: torch.Tensor) -> None:
    if loss.requires_grad:
        loss.backward()


def _run_detached(model, batches, state, *, scale, total) -> WindowResult:
    loss_sum = 0.0
    for b in batches:
        out = _step(model, b, state.detach())
        _backward(out.loss_sum * scale)
        loss_sum += out.loss_sum.item()
        state = out.state
    return WindowResult(loss_sum, total, state.detach())


def _run_truncated(model, batches, state, *, scale, total) -> WindowResult:
    state = state.detach()
    losses = []
    for b in batches:
        out = _step(model, b, state)
        losses.append(out.loss_sum)
        state = out.state
    loss = torch.stack(losses).sum()
    _backward(loss * scale)
    return WindowResult(loss.item(), total, state.detach())


def _run_replay(model, batches, state, *, scale, total) -> WindowResult:
    device = next(model.parameters()).device
    boundary_states = [state.detach()]  # M_0 .. M_k: the only activations kept across segments
    rng_before = []
    loss_sum = 0.0
    with torch.no_grad():
        for b in batches:
            rng_before.append(_rng_snapshot(device))
            out = _step(model, b, boundary_states[-1])
            loss_sum += out.loss_sum.item()
            boundary_states.append(out.state.detach())
    final_state = boundary_states[-1]
    # Walk back: segment t gets d(loss_t)/d(.) plus the gradient its output state received from segment t+1.
    grad_out: dict[str, torch.Tensor] | None = None
    for t in range(len(batches) - 1, -1, -1):
        s_in = boundary_states[t].map(lambda x: x.detach().requires_grad_(x.is_floating_point()))
        with _replayed_rng(rng_before[t], device):
            out = _step(model, batches[t], s_in)
        roots, grads = [out.loss_sum * scale], [None]
        if grad_out is not None:
            for name, g in grad_out.items():
                if out.state[name].requires_grad:
                    roots.append(out.state[name])
                    grads.append(g)
        if any(r.requires_grad for r in roots):
            torch.autograd.backward(
                [r for r in roots if r.requires_grad],
                [g for r, g in zip(roots, grads, strict=True) if r.requires_grad],
            )
        grad_out = {n: x.grad for n, x in s_in.items() if x.grad is not None}
        boundary_states[t + 1] = None  # free states as soon as they are no longer needed
    return WindowResult(loss_sum, total, final_state)
