"""RNG streams under tensor parallelism, and the snapshot a replayed segment restores.

Dropout in a tensor-parallel region (on a column-parallel output, whose columns differ across TP ranks) must draw
different masks on each TP rank; dropout on replicated activations must draw the same mask on every TP rank.
megatron-core keeps the first in a named stream of its RNG tracker (`get_cuda_rng_tracker().fork()`) and the second
in the default generator. `model_parallel_seed` seeds both.

Memory replay (memscale/train/bptt.py, memory_grad=replay) recomputes a segment "with the same RNG state": under TP
that state is the default generator *and* every tracker stream, since a forked region advances its stream.
`rng_snapshot()` / `rng_restore()` take and put back all of them; `replayed_rng(snap)` runs a block under a snapshot
and leaves the ambient streams as they were; `RNGBank` keeps a window's snapshots in storage allocated once.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class RNGSnapshot:
    cpu: torch.Tensor
    cuda: torch.Tensor | None
    tracker: dict[str, torch.Tensor]
    """megatron-core RNG tracker streams by name (empty when TP is not in use)."""


def model_parallel_seed(seed: int, *, tp_rank: int) -> None:
    """Seed the default stream with `seed` (equal across TP ranks) and the TP stream with `seed + 2718 + tp_rank`.

    megatron-core's own offsets, so a run matches one seeded by `model_parallel_cuda_manual_seed`. Expert-parallel
    ranks are 0 (memscale has no experts); passing them explicitly keeps this from reading global state.
    """
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(
        seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0, force_reset_rng=True
    )


def tracker_states() -> dict[str, torch.Tensor]:
    """The RNG tracker's streams by name (clones), or {} when megatron-core's tracker is not in use."""
    return {name: state.clone() for name, state in _tracker_states().items()}


def set_tracker_states(states: dict[str, torch.Tensor]) -> None:
    """Put back streams taken by `tracker_states` (cloned again: fork() replaces a stream's tensor on exit)."""
    if states:
        from megatron.core.tensor_parallel import random as mrandom

        mrandom.get_cuda_rng_tracker().set_states({n: s.clone() for n, s in states.items()})


def _tracker_states() -> dict[str, torch.Tensor]:
    # Never imported means never seeded (and importing megatron-core costs seconds): nothing tracked.
    mrandom = sys.modules.get("megatron.core.tensor_parallel.random")
    if mrandom is None:
        return {}
    if not mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED:
        return {}
    return mrandom.get_cuda_rng_tracker().get_states()


def rng_snapshot(device: torch.device | str | None = None) -> RNGSnapshot:
    """Every RNG stream a segment can draw from: CPU, the current CUDA device (if `device` is CUDA), the tracker."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    tracker = {name: state.clone() for name, state in _tracker_states().items()}
    return RNGSnapshot(cpu=torch.get_rng_state(), cuda=cuda, tracker=tracker)


def rng_restore(snap: RNGSnapshot, device: torch.device | str | None = None) -> None:
    torch.set_rng_state(snap.cpu)
    if snap.cuda is not None:
        device = torch.device(device) if device is not None else torch.device("cuda")
        torch.cuda.set_rng_state(snap.cuda, device)
    if snap.tracker:
        from megatron.core.tensor_parallel import random as mrandom

        # Clones: fork() replaces a stream's tensor when it exits, and a snapshot may be restored more than once.
        mrandom.get_cuda_rng_tracker().set_states({n: s.clone() for n, s in snap.tracker.items()})


@contextmanager
def replayed_rng(snap: RNGSnapshot, device: torch.device | str | None = None):
    """Run the block under the streams of `snap`, then put back the streams that were current before it."""
    outer = rng_snapshot(device)
    rng_restore(snap, device)
    try:
        yield
    finally:
        rng_restore(outer, device)


class RNGBank:
    """RNG snapshots of k segments in storage allocated once: replay's banks (memscale/train/bptt.py), with the
    tracker streams included.

        bank = RNGBank(k)
        bank.save(t)                      # before segment t's first (no-grad) forward
        with replayed_rng(bank[t]):       # around its recompute
            ...

    Preallocated for the same reason as bptt.py's state banks: k small long-lived tensors appended between each
    segment's large temporaries fragment the heap. The tracker's set of streams must not change within a window.
    """

    def __init__(self, k: int, device: torch.device | str | None = None):
        self.device = device
        snap = rng_snapshot(device)
        self.cpu = torch.empty((k, snap.cpu.numel()), dtype=snap.cpu.dtype)
        self.cuda = None if snap.cuda is None else torch.empty((k, snap.cuda.numel()), dtype=snap.cuda.dtype)
        self.tracker = {n: torch.empty((k, s.numel()), dtype=s.dtype) for n, s in snap.tracker.items()}

    def save(self, t: int) -> None:
        snap = rng_snapshot(self.device)
        self.cpu[t].copy_(snap.cpu)
        if self.cuda is not None:
            self.cuda[t].copy_(snap.cuda)
        if set(snap.tracker) != set(self.tracker):
            raise RuntimeError(f"RNG tracker streams changed within a window: {sorted(snap.tracker)}")
        for n, s in snap.tracker.items():
            self.tracker[n][t].copy_(s)

    def __getitem__(self, t: int) -> RNGSnapshot:
        return RNGSnapshot(
            cpu=self.cpu[t].clone(),
            cuda=None if self.cuda is None else self.cuda[t].clone(),
            tracker={n: bank[t].clone() for n, bank in self.tracker.items()},
        )
