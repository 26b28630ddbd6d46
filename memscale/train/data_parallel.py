"""What the training loop does differently on several data-parallel processes (DeepSpeed ZeRO 0-3, gloo or NCCL).

    torchrun --nproc-per-node 2 -m memscale.cli train configs/quickstart.yaml --set parallel.zero_stage=2
    memscale train configs/quickstart.yaml --nproc 2 --set parallel.zero_stage=2          # the same

Each rank trains `data.num_streams` streams: its slice of the loader's global streams (memscale/data/loader.py),
through a `ZeroEngine` (memscale/parallel/zero.py) that reduces the window's summed gradient once per step. The
loss of a window is normalised by its target tokens over all ranks, so the run computes the gradient of the same
global mean as one process training all `num_streams x dp` streams.

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
from memscale.models.memory.base import MemoryState
from memscale.parallel.dims import ParallelDims, ParallelGroups, destroy_distributed, init_distributed

DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


def wanted(cfg: Config) -> bool:
    """True when this process is one of several (torchrun) or the config asks for ZeRO."""
    p = cfg.parallel
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or p.dp > 1 or p.zero_stage != 0


class DataParallel:
    """The groups, the engine and the collectives the loop needs; one per process."""

    def __init__(self, cfg: Config):
        if cfg.train.device == "cpu" and cfg.train.dtype != "float32":
            raise ConfigError("train.dtype must be float32 on CPU")
        self.cfg = cfg
        self.dims: ParallelDims = ParallelDims.for_config(cfg)
        self.groups: ParallelGroups = init_distributed(self.dims, device=cfg.train.device)
        self.rank = self.groups.rank
        self.dp, self.dp_rank = self.dims.dp, self.groups.dp_rank
        self.is_main = self.rank == 0
        self.engine: Any = None

    # -- the model ---------------------------------------------------------------------------------------------
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
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.groups.dp)
        return t.tolist()

    def barrier(self) -> None:
        dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.dp)]
        dist.all_gather(parts, t.contiguous(), group=self.groups.dp)
        return torch.cat(parts)

    def gather_memory(self, state: MemoryState) -> dict[str, torch.Tensor]:
        """Every rank's memory rows, in global stream order (rank r holds rows [r B, (r + 1) B))."""
        return {k: self._gather_rows(v.detach().cpu()) for k, v in state.items()}

    def local_memory(self, tensors: dict[str, torch.Tensor], *, device) -> MemoryState:
        out = {}
        for k, v in tensors.items():
            B = v.shape[0] // self.dp
            out[k] = v[self.dp_rank * B : (self.dp_rank + 1) * B].to(device)
        return MemoryState(out)

    def gather_rng(self) -> dict[str, torch.Tensor]:
        cpu = torch.get_rng_state()
        every = self._gather_rows(cpu.unsqueeze(0))  # same-sized byte tensors on every rank
        return {f"cpu.rank{r}": every[r] for r in range(len(every))}

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def consolidated_weights(self, model) -> dict[str, torch.Tensor]:
        """The full weights (ZeRO-3: gathered from the partitions; a collective on every rank)."""
        if self.dims.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
                return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

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
        key = f"cpu.rank{self.rank}"
        if key not in rng or len(rng) != self.dims.world_size:
            raise ValueError(
                f"{path} was written by {len(rng)} processes, this run has {self.dims.world_size}: resume with "
                "the same number of processes"
            )
        torch.set_rng_state(rng[key])

    def close(self) -> None:
        destroy_distributed()
