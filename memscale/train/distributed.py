"""What the training loop does differently on several processes: tensor parallelism (megatron-core), data
parallelism with DeepSpeed ZeRO 0-3 and pipeline parallelism (memscale/train/pipeline.py), over gloo or NCCL.

    torchrun --nproc-per-node 2 -m memscale.cli train configs/quickstart.yaml --set parallel.zero_stage=2
    memscale train configs/quickstart.yaml --nproc 2 --set parallel.zero_stage=2          # the same
    memscale train configs/quickstart.yaml --nproc 4 --set parallel.tp=2 --set parallel.zero_stage=1
    memscale train configs/quickstart.yaml --nproc 4 --set parallel.pp=2 --set parallel.zero_stage=1

Pipeline parallelism (`parallel.pp` > 1): every rank builds the whole plain model from the seed (the weights of
one process) and keeps its stage (`cut`), which `parallelize` then cuts for TP. The engine runs over the stage, with
ZeRO-0 or -1 over the data-parallel group (ZeRO-2/3 partition per backward: refused with pp, memscale/parallel/
dims.py). The clipping norm counts a parameter several stages hold (the tied embedding, xl's and lamemo's u and v)
once: every copy but the first stage's is marked `ds_pipe_replicated`, which DeepSpeed's ZeRO-1 norm skips, and
ZeRO-0 clips through memscale/parallel/zero.py `_clip_pipeline_stage0`. Checkpoints: the consolidated weights
and the memory of all stages go to rank 0 (gathered over TP and dp first, then over the pipeline group; a name
several stages hold is taken from the first stage for weights, from the last, the writer, for memory); each
rank's engine writes its own files under `deepspeed/` (DeepSpeed names them by dp and tp x pp rank). Each stage
draws dropout from its own seed (`train.seed + dp_rank + pp_rank x dp`).

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
system every rank sees (as on any cluster). Resume needs the same number of ranks, tp, pp and ZeRO stage;
resharding to another layout comes with the sharded checkpoints.
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
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or p.dp > 1 or p.tp > 1 or p.pp > 1 or p.zero_stage != 0


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
        self.pp, self.pp_rank = self.dims.pp, self.groups.pp_rank
        self.is_main = self.rank == 0
        self.engine: Any = None
        self.sharded_state: set[str] = set()
        self.pipeline: Any = None
        """memscale/train/pipeline.py `StagePipeline` with pp > 1 (`start_pipeline`)."""

    # -- the model ---------------------------------------------------------------------------------------------
    def cut(self, model):
        """This rank's pipeline stage of the plain `model`: its consecutive layers (parallel.pp_layers, or balanced
        by compute: memscale/parallel/pipeline/balance.py), with the embedding on the first stage and the final
        norm and head on the last, holding `model`'s weights (so the stages start from the weights one process
        builds from the same seed). `model` itself for pp=1."""
        if self.pp == 1:
            return model
        from memscale.models import MemoryTransformer
        from memscale.parallel.pipeline.balance import stage_layers, stage_ranges

        layers = stage_ranges(stage_layers(self.cfg))[self.pp_rank]
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[]):  # the stage's own initial draws are overwritten below
            stage = MemoryTransformer(self.cfg.model, segment_len=model.segment_len, layers=layers).to(device)
        whole = model.state_dict()
        stage.load_state_dict({n: whole[n] for n in stage.state_dict()}, strict=True)
        return stage

    def start_pipeline(self, stage):
        """The pipeline over this rank's (TP-sharded) `stage`; marks the stage's copies of parameters an earlier
        stage owns, so that DeepSpeed's gradient norm counts them once. Before `wrap`."""
        from memscale.parallel.zero import mark_pipe_replicated
        from memscale.train.pipeline import StagePipeline

        self.pipeline = StagePipeline(self.cfg, stage, group=self.groups.pp, pp=self.pp, pp_rank=self.pp_rank)
        mark_pipe_replicated(stage, self.pipeline.not_owned())
        return self.pipeline

    def shard(self, model):
        """This rank's tensor-parallel shard of the plain `model` (in place; unchanged for tp=1)."""
        self.sharded_state = head_sharded_state(model) if self.tp > 1 else set()
        if self.tp == 1:
            return model
        from memscale.parallel.tensor import parallelize

        return parallelize(model, groups=self.groups)

    def seed(self, seed: int) -> None:
        """The training streams: `seed + dp_rank` by default (equal within a TP group), the TP tracker per TP rank;
        pipeline stages after the first add `pp_rank x dp`, so every stage of every replica draws its own dropout
        masks (a stage's masks cannot equal one process's anyway: it draws only for its layers)."""
        seed = seed + self.dp_rank + self.pp_rank * self.dp
        if self.tp == 1:
            torch.manual_seed(seed)
            return
        from memscale.parallel.random import model_parallel_seed

        model_parallel_seed(seed, tp_rank=self.tp_rank)

    def wrap(self, model, optimizer, *, batch_size: int, segment_len: int):
        """The engine over `model`; returns the object the loop calls like the model (`.step`, `.init_state`)."""
        from memscale.parallel.zero import build_engine

        device = next(model.parameters()).device
        tokens = torch.zeros(batch_size, segment_len, dtype=torch.long, device=device)

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

    STOP_SIGNALS = ("SIGTERM", "SIGUSR1")

    def agree_stop(self, received: str | None) -> str | None:
        """The stop signal the ranks act on, the same on every rank: the one any rank received (SIGUSR1 over
        SIGTERM when both arrived), or None. A signal reaches the ranks at slightly different moments; they must
        stop after the same step, and say the same thing."""
        code = (
            self.STOP_SIGNALS.index(received) + 1 if received in self.STOP_SIGNALS else (1 if received else 0)
        )
        t = torch.tensor([code], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return self.STOP_SIGNALS[t.item() - 1] if t.item() else None

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
        return self._from_stages(out, prefer_last=True)

    def _from_stages(self, part: dict[str, torch.Tensor], *, prefer_last: bool) -> dict[str, torch.Tensor]:
        """The union of every pipeline stage's `part` (on pipeline rank 0; the others get theirs back). A name
        held by several stages (the bookkeeping every stage keeps, a global memory its readers hold) is taken from
        the last stage that holds it with `prefer_last` (the writer of a global memory), else from the first."""
        if self.pp == 1:
            return part
        parts: list[Any] | None = [None] * self.pp if self.pp_rank == 0 else None
        dist.gather_object(part, parts, dst=self.groups.pp_ranks[0], group=self.groups.pp)
        if parts is None:
            return part
        out: dict[str, torch.Tensor] = {}
        for p in reversed(parts) if prefer_last else parts:
            for k, v in p.items():
                out.setdefault(k, v)
        return out

    def local_memory(self, tensors: dict[str, torch.Tensor], *, device) -> MemoryState:
        """This rank's part of memory saved by `gather_memory` (with pp > 1, of all stages: cut it with
        `StagePipeline.own_part`)."""
        out = {}
        for k, v in tensors.items():
            v = v.chunk(self.dp, 0)[self.dp_rank]
            if k in self.sharded_state:
                v = v.chunk(self.tp, -1)[self.tp_rank]
            out[k] = v.contiguous().to(device)
        return MemoryState(out)

    def gather_history(self, history: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A sliding BPTT depth's history (`bptt.History.state_dict`) of every rank: its stream-major tensors as
        `gather_memory` joins the memory, its RNG states (one set per rank, [segments, ...]) keyed
        `rng.<stream>.rank<r>`. Every rank holds as many segments (a function of the step): the collectives match."""
        if not history:
            return {}
        out = self.gather_memory(MemoryState({k: v for k, v in history.items() if not k.startswith("rng.")}))
        world = self.dims.world_size
        for k, v in history.items():
            if k.startswith("rng."):
                every = self._gather(v.unsqueeze(0), None, world)
                out.update({f"{k}.rank{r}": every[r] for r in range(world)})
        return out

    def local_history(self, history: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of a history saved by `gather_history`."""
        if not history:
            return {}
        rows = {k: v for k, v in history.items() if not k.startswith("rng.")}
        out = dict(self.local_memory(rows, device="cpu").items())
        suffix = f".rank{self.rank}"
        out.update(
            {k[: -len(suffix)]: v for k, v in history.items() if k.startswith("rng.") and k.endswith(suffix)}
        )
        return out

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
        """The full weights (ZeRO-3: gathered from the partitions; TP shards joined; pipeline stages sent to
        pipeline rank 0; a collective on every rank)."""

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
        if self.tp > 1:
            from memscale.parallel.tensor import gather_tensor_parallel

            weights = gather_tensor_parallel(model, weights, self.groups.tp)
        # The stages' weights under the plain model's names (a tied head is in both the first and the last stage's,
        # equal: the first's is taken).
        return self._from_stages(weights, prefer_last=False)

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
