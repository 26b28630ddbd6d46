"""What the training loop does with `parallel.pp` > 1: its window and its validation through the pipeline runtime.

    memscale train configs/quickstart.yaml --nproc 2 --set parallel.pp=2 --set train.out_dir=runs/quickstart-pp2

Each rank holds one stage (memscale/train/distributed.py `Distributed.cut`: the whole plain model built from the
seed, then only its layers kept) and runs the step's schedule on it (memscale/parallel/pipeline/): the window's
`train.bptt_segments` segments of the rank's `data.num_streams` streams, the streams split into
`parallel.stream_groups` groups of consecutive rows (group g holds rows [g B / G, (g + 1) B / G)), one BPTT window
per step. The loss is normalised as `run_window` normalises it (the window's targets over all data-parallel ranks),
so a step computes the gradient of one process training every stream.

The memory a stage holds is kept as one `MemoryState` over the rank's streams in their order (the groups joined),
like the one-process loop's state: what the runtime gives per group is joined after a step and split before the
next. A stage holds its own layers' memory, the bookkeeping every stage keeps, and a global memory it reads (rmt's
first stage, memformer's every stage; the writer, the last stage, holds the memory it wrote).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from memscale.config import Config
from memscale.data.batch import IGNORE_INDEX, Batch
from memscale.eval.evaluate import EvalResult
from memscale.models.memory.base import MemoryState
from memscale.parallel.pipeline.runtime import PipelineResult, PipelineRuntime, stage_state
from memscale.parallel.pipeline.schedule import generate, spec_for_kind

EVAL_CHUNK = 8
"""Validation segments per forward-only pipeline pass (the memory is carried from one pass to the next)."""


def param_key(name: str, *, tied: bool) -> str:
    """The name that identifies a parameter across stages: a head tied to the embedding is the embedding (the last
    stage holds its own copy, kept equal by the runtime)."""
    return "embed.weight" if tied and name == "head.weight" else name


class StagePipeline:
    """This rank's stage in the pipeline of `parallel.pp` stages: the training step and the validation pass."""

    def __init__(self, cfg: Config, stage, *, group, pp: int, pp_rank: int):
        self.cfg, self.stage, self.group, self.pp, self.pp_rank = cfg, stage, group, pp, pp_rank
        self.G = cfg.parallel.stream_groups
        k = cfg.train.bptt_segments
        self.spec = spec_for_kind(
            cfg.model.memory.kind,
            num_stages=pp,
            num_groups=self.G,
            num_segments=k,
            bptt_segments=k,
            memory_grad=cfg.train.memory_grad,
        )
        self.schedule = generate(self.spec)
        self.runtime = PipelineRuntime(stage, self.spec, group=group)
        self.replicated = self._replicated()

    def _replicated(self) -> dict[str, str]:
        """{cross-stage name: this stage's parameter name} of the parameters other stages hold too."""
        tied = self.cfg.model.tie_embeddings
        mine = {param_key(n, tied=tied): n for n, _ in self.stage.named_parameters()}
        every: list[Any] = [None] * self.pp
        dist.all_gather_object(every, sorted(mine), group=self.group)
        counts: dict[str, int] = {}
        for names in every:
            for n in names:
                counts[n] = counts.get(n, 0) + 1
        return {k: n for k, n in mine.items() if counts[k] > 1}

    def not_owned(self) -> list[str]:
        """This stage's copies of replicated parameters that an earlier stage also holds (the earliest owns each):
        a global gradient norm must skip them."""
        every: list[Any] = [None] * self.pp
        dist.all_gather_object(every, sorted(self.replicated), group=self.group)
        earlier = {n for s in range(self.pp_rank) for n in every[s]}
        return [local for key, local in self.replicated.items() if key in earlier]

    # -- the memory: one state over the rank's streams, split into groups for the runtime ------------------------
    def split(self, state: MemoryState) -> list[MemoryState]:
        return [state.map(lambda x, g=g: x.chunk(self.G, 0)[g]) for g in range(self.G)]

    def join(self, states: list[MemoryState]) -> MemoryState:
        names = states[0].tensors
        return MemoryState({n: torch.cat([s[n] for s in states], 0) for n in names})

    def own_part(self, state: MemoryState) -> MemoryState:
        """This stage's part of a whole model's memory (the rank's streams)."""
        return stage_state(state, self.stage, self.spec)

    def restart_rows(self, state: MemoryState, bad_B: torch.Tensor | None) -> MemoryState:
        """After a skipped step: the streams whose memory went non-finite on any stage restart from the initial
        memory on every stage (a collective over the pipeline group). A stage holding memory another stage
        creates (memformer's slots, from the last stage) takes those rows from its creator."""
        B = self.cfg.data.num_streams
        bad = torch.zeros(B, dtype=torch.float64) if bad_B is None else bad_B.to(torch.float64).cpu()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.group)
        if not bool(bad.any()):
            return state
        own = {n: t.detach().cpu() for n, t in self.stage.init_state(B).items()}
        every: list[Any] = [None] * self.pp
        dist.all_gather_object(every, own, group=self.group)
        init: dict[str, torch.Tensor] = {}
        for part in every:
            for n, t in part.items():
                init.setdefault(n, t)
        if not len(state):
            return state
        device = next(iter(state.tensors.values())).device
        initial = MemoryState({n: init[n].to(device) for n in state.tensors})
        return state.where(bad > 0, initial)

    def group_batches(self, batches: list[Batch]) -> list[list[Batch]]:
        """batches[t] (all streams) -> [g][t] (group g's rows)."""

        def rows(b: Batch, g: int) -> Batch:
            return Batch(
                *(x.chunk(self.G, 0)[g] for x in (b.tokens_BT, b.targets_BT, b.reset_B, b.doc_pos_B))
            )

        return [[rows(b, g) for b in batches] for g in range(self.G)]

    # -- the step ---------------------------------------------------------------------------------------------------
    def train_step(
        self, batches: list[Batch], state: MemoryState, *, loss_scale: float, backward
    ) -> tuple[PipelineResult, MemoryState]:
        """One window through the pipeline; gradients accumulate into the stage (through `backward`). Returns the
        result (loss sum and targets of this data-parallel rank's streams, on every stage) and the new state."""
        result = self.runtime.run(
            self.schedule,
            self.group_batches(batches),
            self.split(state) if len(state) else None,
            loss_scale=loss_scale,
            backward=backward,
        )
        return result, self.join(result.states)

    # -- validation -------------------------------------------------------------------------------------------------
    def evaluate(self, loader, *, num_segments: int | None, device, unigram_logp=None) -> EvalResult:
        """`evaluate_lm` through the pipeline: the val loader streamed from the initial memory with the memory
        carried, forward only, in passes of up to EVAL_CHUNK segments; the same loss as one process (the loss is
        summed on the last stage and known on every stage)."""
        was_training = self.stage.training
        self.stage.eval()
        if unigram_logp is not None:
            unigram_logp = unigram_logp.to(device)
        states, total_loss, total_tokens, uni_loss, steps = None, 0.0, 0, 0.0, 0
        it = iter(loader)
        done = False
        while not done:
            chunk: list[Batch] = []
            while len(chunk) < EVAL_CHUNK and (num_segments is None or steps < num_segments):
                try:
                    chunk.append(next(it).to(device))
                except StopIteration:
                    done = True
                    break
                steps += 1
            if num_segments is not None and steps >= num_segments:
                done = True
            if not chunk:
                break
            spec = spec_for_kind(
                self.cfg.model.memory.kind, num_stages=self.pp, num_groups=self.G, num_segments=len(chunk)
            )
            result = PipelineRuntime(self.stage, spec, group=self.group).forward(
                generate(spec), self.group_batches(chunk), states
            )
            states = result.states
            total_loss += result.loss_sum
            total_tokens += result.num_targets
            if unigram_logp is not None:
                for b in chunk:
                    mask = b.targets_BT != IGNORE_INDEX
                    uni_loss -= unigram_logp[b.targets_BT[mask]].sum().item()
        if was_training:
            self.stage.train()
        loss = total_loss / max(total_tokens, 1)
        return EvalResult(
            loss=loss,
            ppl=math.exp(min(loss, 50.0)),
            num_tokens=total_tokens,
            num_segments=steps,
            unigram_ppl=math.exp(uni_loss / total_tokens)
            if unigram_logp is not None and total_tokens
            else None,
        )
