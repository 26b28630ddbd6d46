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

Auxiliary losses. A kind whose layers add a term of their own to the objective (∞-former's KL regulariser,
`SegmentOutput.aux_sum`, in the units of the token loss sum) has it added to each segment's loss before that
segment's backward, with the same scale: the objective is (sum of cross-entropies + sum of aux terms) / targets.
Every mode backpropagates it where it backpropagates the segment's loss (replay: in the recomputed segment), so
replay still equals truncated. The reported `loss_sum` stays the cross-entropy alone; `aux_sum` is reported apart.
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
    aux_sum: float = 0.0
    """Sum of the segments' auxiliary losses (`SegmentOutput.aux_sum`), in the units of `loss_sum`; not in it."""


def _rng_snapshot(device: torch.device, *, tracker: bool = False) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, _tracker_snapshot() if tracker else None


def _rng_restore(snap: tuple, device: torch.device) -> None:
    cpu, cuda, tracker = snap
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    if tracker is not None:
        from memscale.parallel.random import set_tracker_states

        set_tracker_states(tracker)


def _tracker_snapshot() -> dict[str, torch.Tensor]:
    from memscale.parallel.random import tracker_states

    return tracker_states()


def _tensor_parallel(model) -> bool:
    """A tensor-parallel model (memscale.parallel.tensor.parallelize) draws its attention dropout from
    megatron-core's RNG tracker: a replayed segment restores the tracker's streams too."""
    return getattr(model, "tp_group", None) is not None


@contextmanager
def _replayed_rng(snap: tuple, device: torch.device):
    """Run the block under the RNG state `snap`, leaving the ambient RNG as it was."""
    outer = _rng_snapshot(device, tracker=snap[2] is not None)
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
    backward=torch.autograd.backward,
) -> WindowResult:
    """Forward and backward over `batches`; gradients accumulate into the model's `.grad`.

    `loss_scale` multiplies the loss before backward (e.g. 1 / gradient-accumulation steps). `backward` is called
    as `torch.autograd.backward(roots[, grad_tensors])` is: a data-parallel engine passes its own
    (memscale/parallel/zero.py, ZeroEngine.backward), which DeepSpeed's gradient bookkeeping needs.
    """
    total = sum(b.num_targets for b in batches)
    scale = loss_scale / max(total, 1)
    if memory_grad == "detached":
        return _run_detached(model, batches, state, scale=scale, total=total, backward=backward)
    if memory_grad == "truncated":
        return _run_truncated(model, batches, state, scale=scale, total=total, backward=backward)
    if memory_grad == "replay":
        return _run_replay(model, batches, state, scale=scale, total=total, backward=backward)
    raise ValueError(f"train.memory_grad={memory_grad!r} is not one of detached, truncated, replay")


def _step(model: MemoryTransformer, b: Batch, state: MemoryState):
    return model.step(b.tokens_BT, state, targets_BT=b.targets_BT, reset_B=b.reset_B, return_logits=False)


def _objective(out) -> torch.Tensor:
    """The segment's training objective: its token loss sum plus its layers' auxiliary losses, if any."""
    return out.loss_sum if out.aux_sum is None else out.loss_sum + out.aux_sum


def _aux(out) -> float:
    return 0.0 if out.aux_sum is None else out.aux_sum.item()


def _backward(loss: torch.Tensor, backward) -> None:
    if loss.requires_grad:
        backward(loss)


def _run_detached(model, batches, state, *, scale, total, backward) -> WindowResult:
    loss_sum, aux_sum = 0.0, 0.0
    for b in batches:
        out = _step(model, b, state.detach())
        _backward(_objective(out) * scale, backward)
        loss_sum += out.loss_sum.item()
        aux_sum += _aux(out)
        state = out.state
    return WindowResult(loss_sum, total, state.detach(), aux_sum)


def _run_truncated(model, batches, state, *, scale, total, backward) -> WindowResult:
    state = state.detach()
    losses, auxes = [], []
    for b in batches:
        out = _step(model, b, state)
        losses.append(out.loss_sum)
        if out.aux_sum is not None:
            auxes.append(out.aux_sum)
        state = out.state
    loss = torch.stack(losses).sum()
    aux = torch.stack(auxes).sum() if auxes else None
    _backward((loss if aux is None else loss + aux) * scale, backward)
    return WindowResult(loss.item(), total, state.detach(), 0.0 if aux is None else aux.item())


def _run_replay(model, batches, state, *, scale, total, backward) -> WindowResult:
    device = next(model.parameters()).device
    k = len(batches)
    # M_0 .. M_k and the RNG state before each segment are the only things kept across segments. They live in
    # banks allocated once, up front: appending k small long-lived tensors between each segment's large
    # temporaries fragments glibc's heap, and RSS then grew ~4 MB per segment (measured: 1.1 GB extra at 256
    # segments) although nothing was alive. A bank slot is also a copy, never a view into a segment's activations.
    states_bank = {
        n: torch.empty((k + 1, *t.shape), dtype=t.dtype, device=t.device) for n, t in state.items()
    }
    cpu_rng = torch.get_rng_state()
    rng_bank = torch.empty((k, cpu_rng.numel()), dtype=cpu_rng.dtype)
    cuda_rng = [None] * k if device.type == "cuda" else None
    tracker_rng = [None] * k if _tensor_parallel(model) else None  # a few small tensors per segment

    def bank_state(t: int) -> MemoryState:
        return MemoryState({n: bank[t] for n, bank in states_bank.items()})

    for n, bank in states_bank.items():
        bank[0].copy_(state[n])
    loss_sum, aux_sum = 0.0, 0.0
    with torch.no_grad():
        for t, b in enumerate(batches):
            rng_bank[t].copy_(torch.get_rng_state())
            if cuda_rng is not None:
                cuda_rng[t] = torch.cuda.get_rng_state(device)
            if tracker_rng is not None:
                tracker_rng[t] = _tracker_snapshot()
            out = _step(model, b, bank_state(t))
            loss_sum += out.loss_sum.item()
            aux_sum += _aux(out)
            for n, bank in states_bank.items():
                bank[t + 1].copy_(out.state[n])
    final_state = MemoryState({n: bank[k].clone() for n, bank in states_bank.items()})
    # Walk back: segment t gets d(loss_t)/d(.) plus the gradient its output state received from segment t+1.
    grad_out: dict[str, torch.Tensor] | None = None
    for t in range(k - 1, -1, -1):
        s_in = bank_state(t).map(lambda x: x.detach().clone().requires_grad_(x.is_floating_point()))
        snap = (
            rng_bank[t].clone(),
            cuda_rng[t] if cuda_rng is not None else None,
            tracker_rng[t] if tracker_rng is not None else None,
        )
        with _replayed_rng(snap, device):
            out = _step(model, batches[t], s_in)
        roots, grads = [_objective(out) * scale], [None]
        if grad_out is not None:
            for name, g in grad_out.items():
                if out.state[name].requires_grad:
                    roots.append(out.state[name])
                    grads.append(g)
        if any(r.requires_grad for r in roots):
            backward(
                [r for r in roots if r.requires_grad],
                [g for r, g in zip(roots, grads, strict=True) if r.requires_grad],
            )
        grad_out = {n: x.grad for n, x in s_in.items() if x.grad is not None}
    return WindowResult(loss_sum, total, final_state, aux_sum)
