"""What the training loop does differently on several processes: tensor parallelism (megatron-core) and data
parallelism with DeepSpeed ZeRO 0-3, over gloo or NCCL.

    torchrun --nproc-per-node 2 -m memscale.cli train configs/quickstart.yaml --set parallel.zero_stage=2
    memscale train configs/quickstart.yaml --nproc 2 --set parallel.zero_stage=2          # the same
    memscale train configs/quickstart.yaml --nproc 4 --set parallel.tp=2 --set parallel.zero_stage=1

Every rank builds the plain model from the same seed; with `parallel.tp` > 1 `parallelize`
(memscale/parallel/tensor.py) cuts it into the rank's shard before the optimizer sees it. The ranks of one
tensor-parallel group read the same streams; each data-parallel rank trains `data.num_streams` streams, its slice of
the loader's global streams (memscale/data/loader.py), through a `ZeroEngine` (memscale/parallel/zero.py) that
reduces the window's summed gradient once per step over the data-parallel group and clips by the norm of the whole
model (sharded parameters counted once per shard, replicated ones once). The loss of a window is normalised by its
target tokens over all data-parallel ranks, so the run computes the gradient of the same global mean as one
process training all `num_streams x dp` streams.

Random streams: the default generator is seeded with `train.seed + dp_rank`, equal across a tensor-parallel group
(dropout on replicated activations must agree there), and megatron-core's tracker stream, used for dropout on a
rank's own heads, with the seed plus the TP rank (memscale/parallel/random.py).

Checkpoints stay one directory written atomically (memscale/checkpoint/simple.py): rank 0 creates the temporary
directory, every rank writes its share of the model and optimizer into `deepspeed/` (DeepSpeed's own per-rank
files: the ZeRO partitions), rank 0 adds the consolidated weights (`model.safetensors`, for `memscale eval`), the
memory of all global streams gathered in global row order, every rank's RNG state, the loader position (the same
on every rank) and the manifest over all of it, then renames it into place. The directory must be on a file
system every rank sees (as on any cluster). Resume needs the same number of ranks and ZeRO stage; resharding to
another layout comes with the sharded checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from memscale.checkpoint import simple as ckpt
from memscale.config import Config, ConfigError
from memscale.models.memory.base import MemoryState, layer_state_name
from memscale.parallel.dims import ParallelDims, ParallelGroups, destroy_distributed, init_distributed

DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


def wanted(cfg: Config) -> bool:
    """True when this process is one of several (torchrun) or the config asks for parallelism or ZeRO."""
    p = cfg.parallel
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or p.dp > 1 or p.tp > 1 or p.zero_stage != 0


def head_sharded_state(model) -> set[str]:
    """The state names (`attn.3`) whose last dimension runs over heads, split over the tensor-parallel ranks."""
    names = set()
    for layer, block in model.blocks.items():
        part = getattr(block, "memory", None)
        for name in getattr(part, "head_sharded_state", ()):
            names.add(layer_state_name(name, int(layer)))
    return names


class Distributed:
    """The groups, the engine and the collectives the loop needs; one per process."""

    def __init__(self, cfg: Config):
        if cfg.train.device == "cpu" and cfg.train.dtype != "float32":
            raise ConfigError("train.dtype must be float32 on CPU")
        self.cfg = cfg
        self.dims: ParallelDims = ParallelDims.for_config(cfg)
        self.groups: ParallelGroups = init_distributed(self.dims, device=cfg.train.device)
        self.rank = self.groups.rank
        self.dp, self.dp_rank = self.dims.dp, self.groups.dp_rank
        self.tp, self.tp_rank = self.dims.tp, self.groups.tp_rank
        self.is_main = self.rank == 0
        self.engine: Any = None
        self.sharded_state: set[str] = set()

    # -- the model ---------------------------------------------------------------------------------------------
    def shard(self, model):
        """This rank's tensor-parallel shard of the plain `model` (in place; unchanged for tp=1)."""
        self.sharded_state = head_sharded_state(model) if self.tp > 1 else set()
        if self.tp == 1:
            return model
        from memscale.parallel.tensor import parallelize

        return parallelize(model, groups=self.groups)

    def seed(self, seed: int) -> None:
        """The training streams: `seed + dp_rank` by default (equal within a TP group), the TP tracker per TP rank."""
        if self.tp == 1:
            torch.manual_seed(seed + self.dp_rank)
            return
        from memscale.parallel.random import model_parallel_seed

        model_parallel_seed(seed + self.dp_rank, tp_rank=self.tp_rank)

    def wrap(self, model, optimizer, *, batch_size: int, segment_len: int):
        """The engine over `model`; returns the object the loop calls like the model (`.step`, `.init_state`)."""
        from memscale.parallel.zero import build_engine

        tokens = torch.zeros(batch_size, segment_len, dtype=torch.long, device=model.embed.weight.device)

        def probe(m):  # one step from the initial memory: what ZeRO-3 must see to gather every parameter
            return m.step(tokens, m.init_state(batch_size), targets_BT=tokens, reset_B=None)

        self.engine = build_engine(model, optimizer, self.cfg, self.dims, groups=self.groups, probe=probe)
        return self.engine.model

    @property
    def optimizer(self):
        return self.engine.optimizer

    def loss_scale(self, num_targets: int) -> float:
        """`run_window`'s loss_scale for a window of `num_targets` local targets: it divides by the local count;
        DeepSpeed averages over ranks; the result is the gradient of the global token mean."""
        return self.engine.global_token_scale(num_targets) * max(num_targets, 1)

    def step(self) -> float:
        """Reduce, clip (train.grad_clip, inside DeepSpeed) and update; the pre-clip global gradient norm. A
        non-finite norm means DeepSpeed skipped the update (its overflow check, in every ZeRO stage)."""
        return self.engine.step()

    # -- collectives ----------------------------------------------------------------------------------------------
    def sum(self, *values: float) -> list[float]:
        """Sums over the data-parallel ranks (the ranks of a TP group hold the same values)."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.groups.dp)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank of the world."""
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() > 0

    def barrier(self) -> None:
        dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @staticmethod
    def _gather(t: torch.Tensor, group, n: int, dim: int = 0) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(n)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    def gather_memory(self, state: MemoryState) -> dict[str, torch.Tensor]:
        """The whole memory, as one process training every stream holds it: rows in global stream order (dp rank r
        holds rows [r B, (r + 1) B)) and head-sharded state joined over the TP ranks (rank r holds heads
        [r H / tp, (r + 1) H / tp) of the last dimension)."""
        out = {}
        for k, v in state.items():
            v = v.detach().cpu()
            if k in self.sharded_state:
                v = self._gather(v, self.groups.tp, self.tp, dim=-1)
            out[k] = self._gather(v, self.groups.dp, self.dp)
        return out

    def local_memory(self, tensors: dict[str, torch.Tensor], *, device) -> MemoryState:
        """This rank's part of memory saved by `gather_memory`."""
        out = {}
        for k, v in tensors.items():
            v = v.chunk(self.dp, 0)[self.dp_rank]
            if k in self.sharded_state:
                v = v.chunk(self.tp, -1)[self.tp_rank]
            out[k] = v.contiguous().to(device)
        return MemoryState(out)

    def gather_rng(self) -> dict[str, torch.Tensor]:
        """Every rank's random streams (the default generator's and the TP tracker's), keyed `<stream>.rank<r>`."""
        from memscale.parallel.random import tracker_states

        streams = {
            "cpu": torch.get_rng_state(),
            **{f"tracker.{k}": v for k, v in sorted(tracker_states().items())},
        }
        world = self.dims.world_size
        out = {}
        for name, t in streams.items():  # same-sized byte tensors on every rank
            every = self._gather(t.unsqueeze(0), None, world)
            out.update({f"{name}.rank{r}": every[r] for r in range(world)})
        return out

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def consolidated_weights(self, model) -> dict[str, torch.Tensor]:
        """The full weights (ZeRO-3: gathered from the partitions; a collective on every rank)."""

        def tensors() -> dict[
            str, torch.Tensor
        ]:  # megatron-core layers add `_extra_state` entries (None): dropped
            return {
                k: v.detach().cpu().clone()
                for k, v in model.state_dict().items()
                if isinstance(v, torch.Tensor)
            }

        if self.dims.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
                weights = tensors()
        else:
            weights = tensors()
        if self.tp == 1:
            return weights
        from memscale.parallel.tensor import gather_tensor_parallel

        return gather_tensor_parallel(model, weights, self.groups.tp)

    def save(self, root: Path, *, step: int, state: MemoryState, make_state, keep: int) -> Path | None:
        """Every rank writes its share; rank 0 completes the checkpoint with `make_state(memory, rng, weights)`
        (its TrainState from the gathered parts). Returns the checkpoint's path on rank 0, None elsewhere."""
        tmp = Path(self.broadcast(str(ckpt.new_temp(root, step)) if self.is_main else None))
        self.engine.engine.save_checkpoint(
            str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, client_state={}, save_latest=False
        )
        memory, rng = self.gather_memory(state), self.gather_rng()
        weights = self.consolidated_weights(self.engine.module)
        self.barrier()  # every rank's DeepSpeed files are on disk before rank 0 checksums them
        path = None
        if self.is_main:
            path = ckpt.save(root, make_state(memory, rng, weights), keep=keep, into=tmp)
        self.barrier()
        return path

    def load(self, path: Path, rng: dict[str, torch.Tensor]) -> None:
        """Every rank: the engine's model and optimizer partitions, and this rank's RNG."""
        ds = path / DEEPSPEED_DIR
        if not ds.is_dir():
            raise ValueError(
                f"{path} has no {DEEPSPEED_DIR}/ (written by one process): resume it on one process"
            )
        load_path, _ = self.engine.engine.load_checkpoint(
            str(ds), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise ValueError(
                f"{ds} holds no checkpoint of this layout: resume with the same number of processes"
            )
        ranks = sum(1 for k in rng if k.startswith("cpu.rank"))
        if ranks != self.dims.world_size:
            raise ValueError(
                f"{path} was written by {ranks} processes, this run has {self.dims.world_size}: resume with "
                "the same number of processes"
            )
        suffix = f".rank{self.rank}"
        torch.set_rng_state(rng["cpu" + suffix])
        tracker = {
            k[len("tracker.") : -len(suffix)]: v
            for k, v in rng.items()
            if k.startswith("tracker.") and k.endswith(suffix)
        }
        if tracker:
            from memscale.parallel.random import set_tracker_states

            set_tracker_states(tracker)

    def close(self) -> None:
        destroy_distributed()
