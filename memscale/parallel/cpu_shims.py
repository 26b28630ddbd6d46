"""megatron-core on CPU: the few places where it assumes CUDA, redirected to the CPU. Applied only without CUDA.

    from memscale.parallel.cpu_shims import apply_cpu_shims
    apply_cpu_shims()        # no-op on a CUDA machine; idempotent

`memscale.parallel.dims.init_distributed` calls it on CPU, before any megatron-core layer is built. Each patch
below says what it redirects and why. With them (megatron-core 0.16.1, gloo): vocab-parallel embedding,
column/row-parallel linears (gather_output and sequence parallel included), vocab-parallel cross-entropy, the RNG
tracker with dropout in TP regions, `model_parallel_cuda_manual_seed` and `tensor_parallel.checkpoint` run and match
their TP=1 results (tests/test_parallel_cpu_shims.py).

On CPU the "CUDA RNG state" that megatron-core tracks becomes the CPU default generator's state: a forked stream
(`get_cuda_rng_tracker().fork()`) swaps the CPU generator to the tracker's state and back, exactly as it swaps the
CUDA generator on a GPU.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

_ORIGINALS: dict[tuple[Any, str], Any] = {}


def _patch(owner: Any, name: str, value: Any) -> None:
    key = (owner, name)
    if key not in _ORIGINALS:
        _ORIGINALS[key] = getattr(owner, name)
    setattr(owner, name, value)


def cpu_shims_applied() -> bool:
    return bool(_ORIGINALS)


def apply_cpu_shims(*, force: bool = False) -> bool:
    """Redirect megatron-core's CUDA assumptions to the CPU; returns whether the shims are in place.

    Does nothing when CUDA is available (unless `force`, for tests). Calling it again is harmless.
    """
    import torch

    if torch.cuda.is_available() and not force:
        return False
    if _ORIGINALS:
        return True

    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    # 1. torch.cuda.current_device() is the `device=` of every buffer megatron-core allocates at run time (the
    #    all-gather output of gather_output=True and sequence parallel, the split/gather helpers in
    #    tensor_parallel/mappings.py and utils.py, weights without use_cpu_initialization). Without CUDA it raises;
    #    the CPU is the device those buffers must live on.
    _patch(torch.cuda, "current_device", lambda: torch.device("cpu"))

    # 2. torch.cuda.synchronize() orders host and device in parallel_state (timeouts, group setup). On CPU every
    #    op is synchronous already; without CUDA the call raises.
    _patch(torch.cuda, "synchronize", lambda device=None: None)

    # 3. _get_cuda_rng_state reads the CUDA generator for the RNG tracker's fork() and for tensor_parallel.checkpoint.
    #    On CPU the generator that dropout draws from is the CPU default generator, so that is the state to read.
    def _get_cpu_rng_state(
        device: Any = "cuda", clone: bool = False, graph_safe: bool = False
    ) -> torch.Tensor:
        return torch.get_rng_state()

    _patch(mrandom, "_get_cuda_rng_state", _get_cpu_rng_state)

    # 4. _set_cuda_rng_state is its counterpart; the original queues a lazy CUDA call that never runs without CUDA,
    #    so fork() and checkpoint recompute would silently keep drawing from the default stream.
    def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    _patch(mrandom, "_set_cuda_rng_state", _set_cpu_rng_state)

    # 5. CudaRNGStatesTracker.add seeds a new named stream through torch.cuda.manual_seed / get_rng_state: without
    #    CUDA the seed goes nowhere and the "forked" stream would equal the default stream. Seed the CPU generator
    #    instead, keep its state under the name, and restore the default stream.
    def _add_cpu(self: Any, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    _patch(mrandom.CudaRNGStatesTracker, "add", _add_cpu)

    # 6. CudaRNGStatesTracker.fork warns "CPU RNG state changed within GPU RNG context" when the CPU generator moved
    #    inside the fork. On CPU the forked stream *is* the CPU generator, so every dropout inside a TP region would
    #    log that warning. Same swap-in / swap-out logic as the original, without the check.
    @contextlib.contextmanager
    def _fork_cpu(self: Any, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        orig_state = torch.get_rng_state()
        orig_name = self._current_state_name
        if orig_name != "default-rng":
            self.states_[orig_name] = orig_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(f"current state name {self._current_state_name} is not the same as {name}.")
            self.states_[name] = torch.get_rng_state()
            if orig_name != "default-rng":
                orig_state = self.states_[orig_name]
            torch.set_rng_state(orig_state)
            self._current_state_name = orig_name

    _patch(mrandom.CudaRNGStatesTracker, "fork", _fork_cpu)

    # 7. model_parallel_cuda_manual_seed seeds the default (data-parallel) stream with torch.cuda.manual_seed, a
    #    lazy no-op without CUDA: dropout outside TP regions would then not follow the seed. Seed the CPU default
    #    generator the same way first; the tracker streams are added by the original through patch 5. It is
    #    re-exported by megatron.core.tensor_parallel, so both names are redirected.
    original_seed = mrandom.model_parallel_cuda_manual_seed

    def _model_parallel_seed_cpu(seed: int, *args: Any, **kwargs: Any) -> None:
        torch.manual_seed(seed)
        original_seed(seed, *args, **kwargs)

    _patch(mrandom, "model_parallel_cuda_manual_seed", _model_parallel_seed_cpu)
    _patch(tensor_parallel, "model_parallel_cuda_manual_seed", _model_parallel_seed_cpu)

    logging.getLogger(__name__).debug("megatron-core CPU shims applied")
    return True


def remove_cpu_shims() -> None:
    """Undo every patch (tests)."""
    for (owner, name), value in reversed(list(_ORIGINALS.items())):
        setattr(owner, name, value)
    _ORIGINALS.clear()
