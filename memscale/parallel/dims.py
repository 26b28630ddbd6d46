"""The parallel layout in one place: degrees, their validation, and the process groups built from them.

    dims = ParallelDims.from_config(cfg.parallel)            # world size from $WORLD_SIZE (torchrun)
    dims.validate(num_heads=8, vocab_size=16000, num_layers=8)
    groups = init_distributed(dims)                          # default group + megatron-core parallel_state
    layer = ColumnParallelLinear(..., tp_group=groups.tp)    # modules receive groups, never read globals

Ranks are laid out as megatron-core's default order "tp-cp-ep-dp-pp": tensor-parallel ranks are neighbours
(tp fastest), then data parallel, then pipeline stages. With world 4, tp=2, dp=2: tp groups {0,1} {2,3}, dp groups
{0,2} {1,3}.

Validation runs before any collective, so an inconsistent layout fails with one line instead of hanging in a
rendezvous or an all-reduce with mismatched sizes. This module imports no torch at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memscale.config import Config, ConfigError, ParallelConfig

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ParallelDims:
    tp: int
    pp: int
    dp: int
    zero_stage: int
    world_size: int

    @classmethod
    def from_config(cls, parallel: ParallelConfig, *, world_size: int | None = None) -> ParallelDims:
        """Degrees from the config; `dp <= 0` means "what the world size leaves": world / (tp * pp).

        `world_size` defaults to $WORLD_SIZE (set by torchrun), else 1. Nothing is validated here beyond what is
        needed to infer dp; call `validate` with the model's sizes.
        """
        if world_size is None:
            world_size = world_size_from_env()
        dp = parallel.dp
        if dp <= 0:
            model_parallel = parallel.tp * parallel.pp
            if model_parallel <= 0 or world_size % model_parallel:
                raise ConfigError(
                    f"parallel.dp={dp} asks to infer dp, but world size {world_size} is not a multiple of "
                    f"parallel.tp*pp={parallel.tp}*{parallel.pp}: change tp/pp or the number of processes"
                )
            dp = world_size // model_parallel
        return cls(
            tp=parallel.tp, pp=parallel.pp, dp=dp, zero_stage=parallel.zero_stage, world_size=world_size
        )

    @classmethod
    def for_config(cls, cfg: Config, *, world_size: int | None = None) -> ParallelDims:
        """`from_config(cfg.parallel)` validated against the model's sizes: what the trainer calls first."""
        m = cfg.model
        return cls.from_config(cfg.parallel, world_size=world_size).validate(
            num_heads=m.num_heads, vocab_size=m.vocab_size, num_layers=m.num_layers
        )

    def validate(
        self, *, num_heads: int | None = None, vocab_size: int | None = None, num_layers: int | None = None
    ) -> ParallelDims:
        """Raise ConfigError (one line naming the key and the fix) for a layout that cannot run."""
        for name in ("tp", "pp", "dp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.world_size < 1:
            raise ConfigError(f"world size {self.world_size} must be >= 1 (check $WORLD_SIZE)")
        product = self.tp * self.pp * self.dp
        if product != self.world_size:
            raise ConfigError(
                f"world size {self.world_size} != parallel.tp*pp*dp = {self.tp}*{self.pp}*{self.dp} = {product}: "
                f"launch {product} processes, or set parallel.dp={self._dp_hint()}"
            )
        if num_heads is not None and num_heads % self.tp:
            raise ConfigError(
                f"parallel.tp={self.tp} must divide model.num_heads={num_heads}: change tp or the head count"
            )
        if vocab_size is not None and vocab_size % self.tp:
            padded = -(-vocab_size // self.tp) * self.tp
            raise ConfigError(
                f"parallel.tp={self.tp} must divide model.vocab_size={vocab_size} (vocab-parallel embedding and "
                f"loss split it evenly): pad the vocabulary to {padded} or change tp"
            )
        if num_layers is not None and self.pp > num_layers:
            raise ConfigError(
                f"parallel.pp={self.pp} > model.num_layers={num_layers}: every stage needs a layer; lower pp"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.zero_stage >= 2 and self.pp > 1:
            # A pipeline runs one backward per micro-batch; ZeRO-2/3 reduce-scatter and release gradients (and
            # ZeRO-3 parameters) per backward, which DeepSpeed refuses under pipeline parallelism for that reason.
            raise ConfigError(
                f"parallel.zero_stage={self.zero_stage} cannot combine with parallel.pp={self.pp} (gradients and "
                "parameters are partitioned per backward, a pipeline runs one per micro-batch): use zero_stage=1 or pp=1"
            )
        return self

    def _dp_hint(self) -> str:
        mp = self.tp * self.pp
        if self.world_size % mp == 0:
            return str(self.world_size // mp)
        return f"0 (infer) after making tp*pp={mp} divide the world size {self.world_size}"

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's process groups and coordinates; pass the groups a module needs to that module."""

    dims: ParallelDims
    rank: int
    tp: Any
    """torch.distributed.ProcessGroup of this rank's tensor-parallel peers."""
    pp: Any
    dp: Any
    model_parallel: Any
    """tp x pp peers: the ranks that hold one replica of the model."""
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_ranks: tuple[int, ...]
    pp_ranks: tuple[int, ...]
    dp_ranks: tuple[int, ...]
    backend: str
    device: torch.device


_GROUPS: ParallelGroups | None = None


def pick_backend(device: str | None = None) -> tuple[str, str]:
    """(backend, device type): nccl on CUDA, gloo on CPU; `device` forces one ("cpu" or "cuda")."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return "nccl", "cuda"
    return "gloo", "cpu"


def init_distributed(
    dims: ParallelDims, *, device: str | None = None, timeout_minutes: int = 10
) -> ParallelGroups:
    """Init the default group from the torchrun environment and build megatron-core's groups, once per process.

    Call `dims.validate(...)` first. A second call with the same dims returns the same groups; with other dims it
    raises, since parallel_state holds one layout per process. On CPU the megatron-core shims are applied.
    """
    global _GROUPS
    if _GROUPS is not None:
        if _GROUPS.dims != dims:
            raise RuntimeError(f"process groups already built for {_GROUPS.dims}, asked for {dims}")
        return _GROUPS

    from datetime import timedelta

    import torch
    import torch.distributed as dist

    backend, device_type = pick_backend(device)
    if device_type == "cpu":
        from memscale.parallel.cpu_shims import apply_cpu_shims

        apply_cpu_shims()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    env_world = world_size_from_env()
    if env_world != dims.world_size:
        raise ConfigError(
            f"dims were built for world size {dims.world_size} but $WORLD_SIZE={env_world}: "
            "build ParallelDims.from_config in the launched processes"
        )
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ and dims.world_size == 1:
            # A single process without torchrun: a private rendezvous, so the same code path runs everywhere.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts that it is set
            os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    elif dist.get_world_size() != dims.world_size:
        raise RuntimeError(f"default group has {dist.get_world_size()} ranks, dims say {dims.world_size}")

    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=dims.tp,
            pipeline_model_parallel_size=dims.pp,
            distributed_timeout_minutes=timeout_minutes,
            # On CPU every group is already gloo: a second, gloo-only copy of the dp groups would only cost
            # rendezvous time. On GPU megatron-core keeps them for CPU-side collectives.
            create_gloo_process_groups=device_type == "cuda",
        )
    elif (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) != (
        dims.tp,
        dims.pp,
    ):
        raise RuntimeError("megatron-core parallel_state was initialized elsewhere with another layout")

    tp = ps.get_tensor_model_parallel_group()
    pp = ps.get_pipeline_model_parallel_group()
    dp = ps.get_data_parallel_group()
    _GROUPS = ParallelGroups(
        dims=dims,
        rank=dist.get_rank(),
        tp=tp,
        pp=pp,
        dp=dp,
        model_parallel=ps.get_model_parallel_group(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_ranks=tuple(dist.get_process_group_ranks(tp)),
        pp_ranks=tuple(dist.get_process_group_ranks(pp)),
        dp_ranks=tuple(dist.get_process_group_ranks(dp)),
        backend=backend,
        device=torch.device(device_type, int(os.environ.get("LOCAL_RANK", "0")))
        if device_type == "cuda"
        else torch.device("cpu"),
    )
    return _GROUPS


def get_groups() -> ParallelGroups:
    """The groups built by `init_distributed` (for the code that wires modules together, not for modules)."""
    if _GROUPS is None:
        raise RuntimeError(
            "process groups are not built: call memscale.parallel.dims.init_distributed(dims) first"
        )
    return _GROUPS


def destroy_distributed() -> None:
    """Tear down megatron-core's groups and the default group (tests, and the end of a run)."""
    global _GROUPS
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _GROUPS = None


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
