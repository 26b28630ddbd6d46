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

Depth of the window: in a window, segment j (from 0)
reaches j segments back, a mean depth of (k - 1) / 2, and the window's last memory gets no gradient at all.

Sliding depth (`depth` = `train.bptt_depth` = k, with truncated or replay): the depth of LM-RMT's
`mem_backprop_depth`. A step still trains on its n = `bptt_segments` new segments (their losses, nothing else),
and the loss of every segment t backpropagates through the memory into segments t-1, ..., t-k and not into t-k-1,
whether those ran in this step or in an earlier one.

- History. The k segments before the step's first one ran in earlier steps, under older weights. They run again,
  under the current weights, from the state saved before the oldest of them, with the RNG state they first ran
  with (the same dropout) and without targets (their losses were counted when they were new): `History`, which
  the trainer checkpoints, so a resumed run continues bit for bit. The new segments then start from that
  recomputed state rather than from the one the previous step carried: the gradient is exactly the gradient of
  the loss the step reports, a function of the current weights alone (with unchanged weights the two states are
  the same; tests check it). Cost per step: k more segment forwards and backwards than the window; `replay`
  keeps k + n + 1 boundary states and one segment's graph, `truncated` all k + n graphs.
- Exact per-loss truncation. One detach for the whole step, k segments before its first, cuts the union: the
  step's later losses would reach further than k. Instead the gradient arriving at a boundary is kept apart by age: the part from the
  loss of segment i + a has crossed a boundaries, may enter segment i while a <= k and go on while a < k. Walking
  back, segment i runs (1) one backward into the weights with its own loss plus the sum of every age that
  reached its output state, then (2) for each age a < k (its own loss is age 0) one vector-Jacobian product into
  its input state alone (`torch.autograd.grad`, which computes no weight gradients), which becomes age a + 1 at
  segment i - 1. That is n + k weight backwards and at most k state passes per segment (about n k + k^2 / 2).
  The ages cannot be merged and split again: the Jacobians differ per segment, and a subtraction would leave
  rounding where the definition has exact zeros. The other exact scheme, one backward chain per loss, makes as
  many passes (n (k + 1)), each with weight gradients, and recomputes each segment k + 1 times under replay.
- Document boundaries. `model.step` resets the rows whose document starts with a `torch.where`: the old state's
  gradient there is exactly zero, so no age crosses into the previous document (tests check exact zeros).
- Data parallelism. A DeepSpeed engine hooks each forward's outputs and runs its backward bookkeeping on the
  first pass through them (memscale/parallel/zero.py): the weights' backward goes first and keeps the graph, the
  state passes follow. Each rank's history (its streams, its RNG) is in the checkpoint
  (`Distributed.gather_history`). Not under tensor or pipeline parallelism (refused by the config).
- Depth 0 gives the gradients of `detached`.
- Auxiliary losses join the new segments' losses as in the other modes (a rerun history segment has no loss).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from memscale.config import MemoryGrad
from memscale.data.batch import IGNORE_INDEX, Batch
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
    history: History | None = None
    """Sliding depth: the segments the next step runs again (pass it to the next call)."""


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
    depth: int | None = None,
    history: History | None = None,
    loss_scale: float = 1.0,
    backward=torch.autograd.backward,
) -> WindowResult:
    """Forward and backward over `batches`; gradients accumulate into the model's `.grad`.

    `depth` None: the window modes above. `depth` k >= 0 (truncated or replay): the sliding depth, the loss of every
    segment reaches exactly k segments back, through `history` (the previous call's `WindowResult.history`; None or
    empty at the start). With a non-empty history, `state` is not read: the memory is recomputed from the history.

    `loss_scale` multiplies the loss before backward (e.g. 1 / gradient-accumulation steps). `backward` is called
    as `torch.autograd.backward(roots[, grad_tensors][, retain_graph=])` is: a data-parallel engine passes its own
    (memscale/parallel/zero.py, ZeroEngine.backward), which DeepSpeed's gradient bookkeeping needs.
    """
    total = sum(b.num_targets for b in batches)
    scale = loss_scale / max(total, 1)
    if depth is not None:
        if depth < 0 or memory_grad not in ("truncated", "replay"):
            raise ValueError(
                f"sliding depth {depth} with memory_grad={memory_grad!r}: need depth >= 0 and "
                "truncated or replay"
            )
        return _run_sliding(
            model,
            batches,
            state,
            history or History(),
            depth=depth,
            replay=memory_grad == "replay",
            scale=scale,
            total=total,
            backward=backward,
        )
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


# -- sliding depth ----------------------------------------------------------------------------------------------


@dataclass
class SegmentRecord:
    """A segment run in an earlier step, kept so that a later step can run it again under the current weights."""

    batch: Batch
    """Its input (targets are not kept: its loss was counted in the step that first ran it)."""
    rng: tuple
    """The RNG state it was first run with (CPU, CUDA, TP tracker), so that a rerun draws the same dropout."""


@dataclass
class History:
    """The last `depth` segments of every stream (oldest first) and the memory state before the oldest.

    Only the state before the oldest segment is kept: the states after it are recomputed under the current weights
    (the gradient is then the gradient of the loss that was reported, and the state carried on is the one those
    weights produce). Empty at the start of a run, and after a skipped step (the trainer drops it)."""

    state: MemoryState | None = None
    records: list[SegmentRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors for a checkpoint: `state.<name>` (the state before the oldest segment), `tokens`,
        `reset`, `doc_pos` stacked over segments on dim 1 (batch first), and the RNG states, `rng.cpu` [n, ...],
        `rng.cuda` [n, ...] on CUDA. Empty when nothing is held."""
        if not self.records:
            return {}
        out = {f"state.{n}": t.detach().cpu().contiguous() for n, t in self.state.items()}
        for key, attr in (("tokens", "tokens_BT"), ("reset", "reset_B"), ("doc_pos", "doc_pos_B")):
            out[key] = torch.stack([getattr(r.batch, attr).cpu() for r in self.records], dim=1).contiguous()
        out["reset"] = out["reset"].to(torch.uint8)  # gloo gathers no bool tensors
        out["rng.cpu"] = torch.stack([r.rng[0] for r in self.records])
        if self.records[0].rng[1] is not None:
            out["rng.cuda"] = torch.stack([r.rng[1].cpu() for r in self.records])
        if self.records[0].rng[2] is not None:
            raise ValueError(
                "a sliding-depth history with tensor-parallel RNG streams cannot be checkpointed"
            )
        return out

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], *, device: torch.device) -> History:
        if not sd:
            return cls()
        state = MemoryState(
            {k[len("state.") :]: v.to(device) for k, v in sd.items() if k.startswith("state.")}
        )
        records = []
        for i in range(sd["tokens"].shape[1]):
            tokens = sd["tokens"][:, i].to(device)
            batch = Batch(
                tokens,
                torch.full_like(tokens, IGNORE_INDEX),
                sd["reset"][:, i].to(device, torch.bool),
                sd["doc_pos"][:, i].to(device),
            )
            cuda = sd["rng.cuda"][i] if "rng.cuda" in sd else None
            records.append(SegmentRecord(batch, (sd["rng.cpu"][i].clone(), cuda, None)))
        return cls(state, records)


def _leaf(state: MemoryState) -> MemoryState:
    """A copy of `state` that starts a new graph: gradient stops at it, and arrives in its `.grad`-able leaves."""
    return state.map(lambda x: x.detach().clone().requires_grad_(x.is_floating_point()))


def _run_sliding(model, batches, state, history, *, depth, replay, scale, total, backward) -> WindowResult:
    device = next(model.parameters()).device
    tracker = _tensor_parallel(model)
    h, n = len(history), len(batches)
    segs = [r.batch for r in history.records] + list(batches)
    rngs = [r.rng for r in history.records] + [None] * n

    def run(i: int, s_in: MemoryState):
        """Segment i (history first) from `s_in`: its first run takes the ambient RNG (and records it), a rerun
        replays it. A history segment runs without targets: its loss was counted when it was new."""
        b = segs[i]
        targets = b.targets_BT if i >= h else None
        if rngs[i] is None:
            rngs[i] = _rng_snapshot(device, tracker=tracker)
            return model.step(b.tokens_BT, s_in, targets_BT=targets, reset_B=b.reset_B, return_logits=False)
        with _replayed_rng(rngs[i], device):
            return model.step(b.tokens_BT, s_in, targets_BT=targets, reset_B=b.reset_B, return_logits=False)

    # Forward over history + new segments. replay: no graph, the state before each segment in a bank allocated
    # once (see _run_replay); truncated: every segment's graph kept, each starting from its own leaf state.
    start = history.state if h else state
    kept: list[tuple[MemoryState, object]] = []
    bank = {n_: torch.empty((h + n + 1, *t.shape), dtype=t.dtype, device=t.device) for n_, t in start.items()}

    def boundary(i: int) -> MemoryState:
        return MemoryState({n_: b[i] for n_, b in bank.items()})

    for n_, b in bank.items():
        b[0].copy_(start[n_])
    loss_sum, aux_sum = 0.0, 0.0
    for i in range(h + n):
        if replay:
            with torch.no_grad():
                out = run(i, boundary(i))
        else:
            s_in = _leaf(boundary(i))
            out = run(i, s_in)
            kept.append((s_in, out))
        if i >= h and out.loss_sum is not None:
            loss_sum += out.loss_sum.item()
            aux_sum += _aux(out)
        for n_, b in bank.items():
            b[i + 1].copy_(out.state[n_].detach())
    final_state = MemoryState({n_: b[h + n].clone() for n_, b in bank.items()})

    # Backward, last segment first. The gradient arriving at a boundary is kept apart by age: pending[a] is the
    # part that came from the loss of the segment a steps later. Segment i backpropagates all ages into the
    # weights (one backward), and each age a < depth separately into its input state, where it becomes age a + 1.
    pending: dict[int, dict[str, torch.Tensor]] = {}
    for i in range(h + n - 1, -1, -1):
        if i < h and not pending:
            break  # no gradient reaches this far back (a history longer than the depth, after a resume)
        if replay:
            s_in = _leaf(boundary(i))
            out = run(i, s_in)
        else:
            s_in, out = kept[i]
        loss_root = None
        if i >= h and out.loss_sum is not None and out.loss_sum.requires_grad:
            loss_root = _objective(out) * scale
        # Each age as (roots, gradients): age 0 is this segment's own loss.
        by_age = {0: ([loss_root], [None])} if loss_root is not None else {}
        for a, grads in pending.items():
            names = [name for name in grads if out.state[name].requires_grad]
            if names:
                by_age[a] = ([out.state[name] for name in names], [grads[name] for name in names])
        inputs = [(name, x) for name, x in s_in.items() if x.requires_grad]
        going_on = sorted(a for a in by_age if a + 1 <= depth) if i > 0 and inputs else []
        # All ages at once into the weights: the sum of the gradients reaching each output state. First, while the
        # graph is kept for the per-age passes below: a data-parallel engine hooks the segment's outputs and runs
        # its backward bookkeeping once per forward, on the first pass through them (memscale/parallel/zero.py).
        summed: dict[str, torch.Tensor] = {}
        for a in sorted(pending):
            for name, g in pending[a].items():
                if out.state[name].requires_grad:
                    summed[name] = g if name not in summed else summed[name] + g
        roots = ([loss_root] if loss_root is not None else []) + [out.state[name] for name in summed]
        grads = ([None] if loss_root is not None else []) + list(summed.values())
        if roots:
            backward(roots, grads, retain_graph=bool(going_on))
        # Each age that may go one segment further, into the input state alone (no weight gradients computed).
        nxt: dict[int, dict[str, torch.Tensor]] = {}
        for a in going_on:
            roots, grads = by_age[a]
            last = a == going_on[-1]  # the last pass frees the segment's graph
            got = torch.autograd.grad(
                roots, [x for _, x in inputs], grads, retain_graph=not last, allow_unused=True
            )
            got = {name: g for (name, _), g in zip(inputs, got, strict=True) if g is not None}
            if got:
                nxt[a + 1] = got
        pending = nxt

    # The next step runs the last `depth` segments again, from the state before the oldest of them.
    keep = min(depth, h + n)
    records = [SegmentRecord(_without_targets(segs[i]), rngs[i]) for i in range(h + n - keep, h + n)]
    kept_state = MemoryState({n_: b[h + n - keep].clone() for n_, b in bank.items()}) if keep else None
    return WindowResult(loss_sum, total, final_state, aux_sum, History(kept_state, records))


def _without_targets(b: Batch) -> Batch:
    return Batch(b.tokens_BT, torch.full_like(b.targets_BT, IGNORE_INDEX), b.reset_B, b.doc_pos_B)
