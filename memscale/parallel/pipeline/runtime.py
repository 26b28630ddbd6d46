"""Execute a pipeline schedule (schedule.py) on real stages over p2p: segments as micro-batches, memory across them.

Each pipeline rank holds one stage, a slice of the model (`MemoryTransformer(cfg, segment_len=T, layers=range(a,
b))`), and runs its row of the schedule in order:

  - F (group g, segment t): the stage's part of `MemoryTransformer.step` on the received activation (the first
    stage embeds the tokens), after resetting the rows whose document starts at t; the last stage adds the loss
    (memscale/train/loss.py `token_loss`). What backward needs is kept: the graph (detached, truncated), or only
    the stage input, the memory state the segment started from and the RNG state (replay, which recomputes the
    segment inside B under that RNG state, memscale/parallel/random.py, as memscale/train/bptt.py does);
  - B: one autograd backward from the activation gradient received from the next stage (the loss, scaled, on the
    last stage) plus, inside a BPTT window, the gradient of the memory this segment wrote, which the next segment's
    backward produced (per layer: on this stage; global: received from the stages that read it, SEND_MG);
  - SEND_F / RECV_F, SEND_B / RECV_B, SEND_M / RECV_M, SEND_MG / RECV_MG: `torch.distributed.batch_isend_irecv`;
    consecutive transfers of a rank go out as one batch, and the batch's receives are waited for before the next
    computation (the simulator's semantics: sends asynchronous, receives blocking);
  - STEP: the step's collectives over the pipeline group. Gradients of parameters held by several stages (xl and
    lamemo's u and v, the token embedding tied to the head) are summed over them; the loss is summed at the last
    stage and known to every rank afterwards. The optimizer step itself is the caller's; a global gradient norm
    must count each of those parameters once (`PipelineRuntime.replicated` names them), not once per stage.

The result equals `memscale.train.bptt.run_window` on the whole model over the same batches: same loss (sum over
the step's targets, normalised by their count times `loss_scale`), same gradients, same final memory. A step
holds `spec.num_segments` segments per group; with BPTT they form windows of `spec.bptt_segments`, so a step equals
one `run_window` call per window (each with `loss_scale` = its share of the step's targets).

Before anything is sent, the schedule is checked by the simulator (simulate.py) against the spec: a schedule that
would deadlock or compute something else is refused with the simulator's message. Then one `all_gather_object`
over the pipeline group tells every stage what the others hold (the activation length S, which the first stage finds
by embedding a segment; which stage creates which memory, and its shape; the parameter names), so that every
receive allocates its buffers in advance.

Why a runtime of memscale's own: torch.distributed.pipelining's `_PipelineScheduleRuntime` executes torch's action
lists with batched p2p the same way, but its micro-batches are independent, one tensor crosses each stage boundary,
and it has no action for a memory or its gradient travelling from the last stage to the first (FIELD-NOTES.md).

Randomness: each stage draws dropout from its own generator, in the order of its forwards, so masks differ from
one process running the whole model (as with any pipeline); replay snapshots the generators before each forward and
recomputes under the snapshot, so its masks equal the forward's and its gradients equal truncated BPTT's.

What is not in the action lists, and why:
  - Messages between two ranks are matched in the order they are sent (NCCL ignores tags), and a valid schedule may
    receive them in another order. A receive therefore takes, on its channel, every message the sender sends
    before the one it waits for (the whole schedule is known on every rank) and keeps them for their own receive
    actions; this cannot deadlock, because those sends precede, on the sender, the one the receive waits for.
  - A reset row restarts from the kind's initial memory, which is a function of parameters (rmt's initial tokens,
    memformer's forgetting bias) owned by one stage. A stage that reads a global memory it does not initialise
    (memformer's stages other than the last) gets the initial memory of each group from its owner when the step
    starts and returns the gradient it received at STEP; the owner backpropagates it into its parameters. In
    detached mode there is no memory-gradient edge in the schedule, yet reset rows still carry gradient into the
    initial memory, hence this pair of transfers outside it.

Example, in each of 2 processes (torchrun, `dist.init_process_group("gloo")`; `cfg`, `steps` and `optimizer` are
the caller's; tests/test_pipeline_runtime.py runs this against one process):

    spec = spec_for_kind("memformer", num_stages=2, num_groups=2, num_segments=4, bptt_segments=2,
                         memory_grad="replay")
    stage = MemoryTransformer(cfg.model, segment_len=T, layers=range(2 * rank, 2 * rank + 2))  # 4 layers
    runtime = PipelineRuntime(stage, spec, group=pp_group)
    states = None                                            # the first step starts from the initial memory
    for batches in steps:                                    # batches[g][t]: Batch of group g, segment t
        result = runtime.run(generate(spec), batches, states)
        optimizer.step()                                     # result.loss on every rank
        optimizer.zero_grad()
        states = result.states                               # what this stage holds, per group

Tested over gloo on CPU (tests/test_pipeline_runtime.py, also under tp=2 and dp=2 with ZeRO-1); the NCCL path
(one work per p2p batch, CUDA RNG in the replay snapshots) is written for but has not run yet.

Legend: B_g streams of a group, T segment tokens, S tokens inside the blocks (T plus rmt's 2K memory tokens,
lamemo's M memory positions), D width.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from memscale.data.batch import Batch
from memscale.models.memory.base import MemoryState
from memscale.models.transformer import MemoryTransformer
from memscale.parallel.pipeline.schedule import (
    COMPUTE,
    MATCHING_RECV,
    RECVS,
    SENDS,
    Action,
    ActionType,
    Schedule,
    ScheduleSpec,
)
from memscale.parallel.pipeline.simulate import CostModel, simulate
from memscale.parallel.random import RNGSnapshot, replayed_rng, rng_snapshot
from memscale.train.loss import token_loss

A = ActionType
MsgKey = tuple[ActionType, int, int, int]
"""(receive type, group, segment, source stage): one message of the schedule."""


@dataclass
class PipelineResult:
    loss_sum: float
    """Sum of the token cross-entropies over the step's targets, all groups and segments (on every rank)."""
    num_targets: int
    states: list[MemoryState]
    """Per group, the memory this stage holds after the step's last segment (detached): the next step's input."""
    aux_sum: float = 0.0
    """Sum of the layers' auxiliary losses (∞-former's KL term) over all stages, groups and segments, in the units
    of `loss_sum` and not in it (on every rank)."""

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.num_targets, 1)


def forward_schedule(schedule: Schedule) -> Schedule:
    """`schedule` without its backward computations and the transfers that feed or follow them (activation
    gradients, memory gradients): what a forward-only pass (validation) runs."""
    dropped = {A.B, A.SEND_B, A.RECV_B, A.SEND_MG, A.RECV_MG}
    return {s: [a for a in actions if a.type not in dropped] for s, actions in schedule.items()}


def stage_state(state: MemoryState, stage: MemoryTransformer, spec: ScheduleSpec) -> MemoryState:
    """The part of a whole model's `state` that pipeline stage `stage` holds: its own (per-layer state and the
    bookkeeping every stage keeps a copy of) and, if it reads a global memory (`spec.readers()`), that memory."""
    own = set(stage.init_state(1).tensors)
    # Global memory is read by the first stage (rmt) or by every stage (memformer): `spec.readers()`.
    reads_global = spec.topology == "global" and (spec.memory_readers == "every" or stage.first)
    return MemoryState({n: t for n, t in state.items() if n in own or reads_global})


@dataclass
class _Record:
    """What F leaves for B of one (group, segment)."""

    x_in: Tensor | None = None
    """The received activation (a leaf with grad when the graph is kept; the value under replay)."""
    state_in: MemoryState | None = None
    """replay: the memory the segment started from (before its reset)."""
    rng: RNGSnapshot | None = None
    out: Tensor | None = None
    """The activation sent on, or the scaled loss on the last stage (graph kept)."""
    new: dict[str, Tensor] = field(default_factory=dict)
    """The memory the segment wrote, with its graph (roots of the memory gradient from the next segment)."""
    aux: Tensor | None = None
    """The scaled sum of this stage's layers' auxiliary losses (graph kept): one more root of its backward."""
    leaves: dict[str, Tensor] = field(default_factory=dict)
    """The incoming memory as leaves whose .grad the previous segment's backward takes (BPTT)."""


class PipelineRuntime:
    """Runs schedules of `spec` on this rank's `stage`, with the other stages in the process group `group`.

    The rank's index in `group` is its stage index; `group=None` means the default group. After a step,
    `replicated` names the parameters that several stages hold (a head tied to the embedding under the name
    `embed.weight`) and whose gradients were summed over them.
    """

    def __init__(self, stage: MemoryTransformer, spec: ScheduleSpec, *, group=None):
        self.stage, self.spec, self.group = stage, spec, group
        self.P = spec.num_stages
        self.s = dist.get_rank(group)
        size = dist.get_world_size(group)
        if size != self.P:
            raise ValueError(
                f"the pipeline group has {size} ranks but the schedule has num_stages={self.P}: one stage per rank"
            )
        self.ranks = dist.get_process_group_ranks(group) if group is not None else list(range(size))
        self.first, self.last = self.s == 0, self.s == self.P - 1
        if stage.first != self.first or stage.last != self.last:
            raise ValueError(
                f"rank {self.s} of {self.P} pipeline stages holds layers {stage.layers.start}..{stage.layers.stop - 1}"
                f" of {stage.cfg.num_layers}: stage {self.s} must {'' if self.first else 'not '}hold the first layer "
                f"and {'' if self.last else 'not '}the last"
            )
        self.replicated: list[str] = []
        self.device = next(stage.parameters()).device
        self.dtype = next(p for p in stage.parameters() if p.is_floating_point()).dtype

    # -- the step -------------------------------------------------------------------------------------------------
    def run(
        self,
        schedule: Schedule,
        batches: list[list[Batch]],
        states: list[MemoryState] | None = None,
        *,
        loss_scale: float = 1.0,
        backward=torch.autograd.backward,
    ) -> PipelineResult:
        """Execute this rank's row of `schedule` (the whole schedule, every rank's row: it is checked first).

        `batches[g][t]`: segment t of stream group g, the same on every rank (each stage reads what it needs:
        tokens on the first, targets on the last, reset flags on all). `states[g]`: the memory this stage holds
        for group g when the step starts (`stage_state` cuts it from a whole model's); what a group lacks (all of
        it with `states=None`) starts from the initial memory, as a reset row does. Gradients accumulate into the
        stage's parameters; `backward` is called as `torch.autograd.backward(roots, grad_tensors)` is (a
        data-parallel engine's).
        """
        return self._run(
            schedule, batches, states, loss_scale=loss_scale, backward=backward, forward_only=False
        )

    def forward(
        self, schedule: Schedule, batches: list[list[Batch]], states: list[MemoryState] | None = None
    ) -> PipelineResult:
        """The forwards of `schedule` alone, without gradient (validation): the F actions and their activation and
        memory transfers, in the schedule's order; the loss and the memory after the step as `run` gives them.

        `schedule` is a whole training schedule (checked by the simulator as `run` does); dropping its backwards
        and their transfers keeps every rank's forwards in an order the forward dependencies allow, and takes
        away only waits, so the rest cannot deadlock. Call with the stage in eval mode for dropout off."""
        with torch.no_grad():
            return self._run(schedule, batches, states, loss_scale=1.0, backward=None, forward_only=True)

    def _run(self, schedule, batches, states, *, loss_scale, backward, forward_only) -> PipelineResult:
        spec = self.spec
        self._check(schedule, batches, states)
        simulate(schedule, spec, CostModel.uniform(self.P))  # ScheduleError before anything is sent
        self.forward_only = forward_only
        if forward_only:
            schedule = forward_schedule(schedule)
        self.batches = [[b.to(self.device) for b in group] for group in batches]
        given = states if states is not None else [MemoryState() for _ in batches]
        self.held = [MemoryState(dict(s.items())) for s in given]
        self._start_own_memory()
        self.scale = loss_scale / max(sum(b.num_targets for g in batches for b in g), 1)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.aux_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.backward = backward
        self.records: dict[tuple[int, int], _Record] = {}
        self.mem_grads: dict[tuple[int, int], dict[str, Tensor]] = {}
        self.outbox: dict[tuple[ActionType, int, int, int], list[Tensor]] = {}  # (send type, g, t, dst)
        self.mailbox: dict[MsgKey, list[Tensor]] = {}
        self.works: list = []  # outstanding sends, with the tensors they read
        self._layout(schedule)
        before = self._replicated_grads() if not forward_only else {}
        self._exchange_initial_memory()

        actions = schedule[self.s]
        i = 0
        while i < len(actions):
            a = actions[i]
            if a.type in COMPUTE:
                self._forward(a) if a.type is A.F else self._backward(a)
                i += 1
            elif a.type is A.STEP:
                i += 1
            else:  # a run of consecutive transfers: one batch
                j = i
                while j < len(actions) and actions[j].type in SENDS | RECVS:
                    j += 1
                self._transfer(actions[i:j])
                i = j
        for w, _ in self.works:
            w.wait()
        if not forward_only:
            self._initial_memory_gradients()
            self._sum_replicated(before)
        total, aux_total = self._loss_everywhere()
        out = [MemoryState({n: t.detach() for n, t in h.items()}) for h in self.held]
        num_targets = sum(b.num_targets for g in batches for b in g)
        self.__dict__.update(batches=None, held=None, records=None, mem_grads=None, outbox=None, mailbox=None)
        return PipelineResult(total, num_targets, out, aux_total)

    def _check(self, schedule: Schedule, batches: list[list[Batch]], states: list[MemoryState]) -> None:
        spec = self.spec
        G, S = spec.num_groups, spec.num_segments
        if len(batches) != G or any(len(g) != S for g in batches):
            raise ValueError(
                f"batches must hold num_groups={G} lists of num_segments={S} segments; got "
                f"{[len(g) for g in batches]}"
            )
        if states is not None and len(states) != G:
            raise ValueError(f"states must hold one MemoryState per group ({G}); got {len(states)}")
        if sorted(schedule) != list(range(self.P)):
            raise ValueError(
                f"the schedule has ranks {sorted(schedule)}; {self.P} stages need ranks 0..{self.P - 1}"
            )

    # -- layout: what each stage holds, exchanged once per step ---------------------------------------------------
    def _layout(self, schedule: Schedule) -> None:
        """Gather what the transfers need to know of the other stages: the activation length S (the first stage
        embeds a segment to find it), the memory each stage holds (names, shapes), which initial memory each
        creates, and which parameters it holds."""
        own_init = {n: tuple(t.shape[1:]) for n, t in self.stage.init_state(1).items()}
        S = None
        if self.first:
            b = self.batches[0][0]
            with (
                torch.no_grad(),
                torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []),
            ):
                x, _ = self.stage.embed_segment(b.tokens_BT, self.stage.memory.reset(self.held[0], b.reset_B))
            S = x.shape[1]
        info = {
            "S": S,
            "own_init": own_init,
            "params": {n: p.numel() for n, p in self._param_keys().items()},
        }
        infos: list = [None] * self.P
        dist.all_gather_object(infos, info, group=self.group)
        self.S = infos[0]["S"]
        self.infos = infos
        owner: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}  # per row
        for s, inf in enumerate(infos):
            for n, shape in inf["own_init"].items():
                owner.setdefault(n, s)
                self.shapes.setdefault(n, shape)
        # A global kind's whole state is its memory, created by one stage (rmt: the first, memformer: the last)
        # and read by `spec.readers()`; per-layer state is created and read by the stage that holds it.
        spec = self.spec
        self.global_names = sorted(owner) if spec.topology == "global" else []
        self.needed = [
            set(inf["own_init"]) | (set(self.global_names) if s in spec.readers() else set())
            for s, inf in enumerate(infos)
        ]
        # Names this stage reads but does not create: a global memory another stage creates.
        self.foreign = {n: owner[n] for n in sorted(self.needed[self.s]) if n not in own_init}
        # Stages that read names this stage creates, without creating them: they get our initial memory.
        self.init_readers = {
            s: sorted(n for n in self.needed[s] if n not in inf["own_init"] and owner[n] == self.s)
            for s, inf in enumerate(infos)
            if s != self.s
        }
        self.init_readers = {s: ns for s, ns in self.init_readers.items() if ns}
        # Channel order: per source stage, the messages it sends here in its own order.
        self.incoming: dict[int, deque[MsgKey]] = {s: deque() for s in range(self.P)}
        for src, actions in schedule.items():
            for a in actions:
                if a.type in SENDS and a.peer_stage() == self.s:
                    self.incoming[src].append((MATCHING_RECV[a.type], a.group, a.segment, src))

    def _param_keys(self) -> dict[str, torch.nn.Parameter]:
        """Parameters by the name that identifies them across stages; a head tied to the embedding is the
        embedding (the last stage holds a copy of it)."""
        out = {}
        tied = self.stage.cfg.tie_embeddings
        for name, p in self.stage.named_parameters():
            if tied and name == "head.weight":
                name = "embed.weight"
            out.setdefault(name, p)
        return out

    def _global_names(self, stage: int) -> list[str]:
        """Names of the global memory exchanged with `stage` (a reader), in the order they go on the wire."""
        return [n for n in self.global_names if n in self.needed[stage]]

    def _start_own_memory(self) -> None:
        """A group that lacks some of the memory this stage creates starts it from the initial memory."""
        for g, h in enumerate(self.held):
            init = self.stage.init_state(self.batches[g][0].tokens_BT.shape[0])
            for n, x in init.items():
                if n not in h:
                    h.tensors[n] = x.detach().clone()

    # -- F and B ----------------------------------------------------------------------------------------------------
    def _forward(self, a: Action) -> None:
        g, t = a.key
        rec = _Record()
        x_in = self.mailbox.pop((A.RECV_F, g, t, self.s - 1))[0] if not self.first else None
        state = MemoryState(dict(self.held[g].items()))
        if self.forward_only:
            out, new, loss, aux = self._run_segment(g, t, x_in, state, rec=None)
        elif self.spec.memory_grad == "replay":
            rec.x_in, rec.state_in = x_in, state
            rec.rng = rng_snapshot(self.device)
            with torch.no_grad():
                out, new, loss, aux = self._run_segment(g, t, x_in, state, rec=None)
        else:
            out, new, loss, aux = self._run_segment(g, t, x_in, state, rec=rec)
            rec.out, rec.new = (loss * self.scale if self.last else out), new
            rec.aux = aux * self.scale if aux is not None else None
        if aux is not None:
            self.aux_sum += aux.detach().to(torch.float64)
        if self.last:
            self.loss_sum += loss.detach().to(torch.float64)
        else:
            self.outbox[(A.SEND_F, g, t, self.s + 1)] = [out.detach()]
        for n, v in new.items():
            self.held[g].tensors[n] = v.detach()
        if self.last and self.spec.topology == "global":
            for r in self.spec.memory_route():
                self.outbox[(A.SEND_M, g, t, r)] = [new[n].detach() for n in self._global_names(r)]
        if not self.forward_only:
            self.records[(g, t)] = rec

    def _run_segment(self, g: int, t: int, x_in: Tensor | None, state: MemoryState, *, rec: _Record | None):
        """The stage's part of `MemoryTransformer.step` for (g, t); with `rec`, the graph is kept and the inputs
        that receive gradient are recorded in it. -> (activation out, new state, loss sum on the last stage, the
        sum of this stage's layers' auxiliary losses or None)."""
        spec, stage = self.spec, self.stage
        b = self.batches[g][t]
        T = b.tokens_BT.shape[1]
        grad_in = rec is not None and spec.bptt and t > 0 and spec.grad_from_next(t - 1)
        if grad_in:
            leaves = {n: v.detach().requires_grad_() for n, v in state.items() if v.is_floating_point()}
            state = MemoryState({**state.tensors, **leaves})
            rec.leaves = leaves
        else:
            state = state.detach()
        if len(state):
            state = stage.memory.reset(state, b.reset_B)
        if self.foreign:
            init = MemoryState({n: self.foreign_init[g][n] for n in self.foreign})
            part = MemoryState({n: state[n] for n in self.foreign}).where(b.reset_B, init)
            state = MemoryState({**state.tensors, **part.tensors})
        new: dict[str, Tensor] = {}
        if self.first:
            x, new0 = stage.embed_segment(b.tokens_BT, state)
            new.update(new0)
        else:
            x = x_in.detach().requires_grad_(rec is not None)
            if rec is not None:
                rec.x_in = x
        aux: list[Tensor] = []
        x, new1 = stage.run_blocks(x, state, num_tokens=T, aux=aux)
        new.update(new1)
        loss = None
        if self.last:
            h, new2 = stage.finish(x, state, num_tokens=T)
            new.update(new2)
            loss = token_loss(
                h, stage.head, b.targets_BT, fused=stage.cfg.fused_loss, return_logits=False
            ).loss_sum
        # Activations travel and states are held in the stage's dtype (float32 under bf16 autocast: the receiving
        # buffers are allocated in it, and the memory state accumulates in it; memscale/train/precision.py).
        new = {n: v.to(state[n].dtype) if n in state else v for n, v in new.items()}
        return x.to(self.dtype), new, loss, (torch.stack(aux).sum() if aux else None)

    def _backward(self, a: Action) -> None:
        spec = self.spec
        g, t = a.key
        rec = self.records.pop((g, t))
        if spec.memory_grad == "replay":
            replayed = _Record()
            with replayed_rng(rec.rng, self.device):
                out, new, loss, aux = self._run_segment(g, t, rec.x_in, rec.state_in, rec=replayed)
            replayed.out, replayed.new = (loss * self.scale if self.last else out), new
            replayed.aux = aux * self.scale if aux is not None else None
            rec = replayed
        roots, grads = [rec.out], [None]
        if not self.last:
            grads = [self.mailbox.pop((A.RECV_B, g, t, self.s + 1))[0]]
        if rec.aux is not None:  # this stage's own term of the objective: the gradient of a sum is the sum
            roots.append(rec.aux)
            grads.append(None)
        if spec.grad_from_next(t):
            local = self.mem_grads.pop((g, t + 1), {})
            received = {}
            if self.last and spec.topology == "global":
                for r in spec.memory_route():
                    msg = self.mailbox.pop((A.RECV_MG, g, t + 1, r))
                    for n, x in zip(self._global_names(r), msg, strict=True):
                        received[n] = x if n not in received else received[n] + x
            for n, y in rec.new.items():
                parts = [x for x in (local.get(n), received.get(n)) if x is not None]
                if parts and y.requires_grad:
                    roots.append(y)
                    grads.append(parts[0] if len(parts) == 1 else parts[0] + parts[1])
        keep = [i for i, r in enumerate(roots) if r.requires_grad]
        if keep:
            self.backward([roots[i] for i in keep], [grads[i] for i in keep])
        if not self.first:
            gx = rec.x_in.grad
            self.outbox[(A.SEND_B, g, t, self.s - 1)] = [gx if gx is not None else torch.zeros_like(rec.x_in)]
        if rec.leaves:
            self.mem_grads[(g, t)] = {n: x.grad for n, x in rec.leaves.items() if x.grad is not None}
            if spec.topology == "global" and self.s in spec.memory_route():
                grads_t = self.mem_grads.pop((g, t))
                self.outbox[(A.SEND_MG, g, t, self.P - 1)] = [
                    grads_t.get(n, torch.zeros_like(rec.leaves[n])) for n in self._global_names(self.s)
                ]

    # -- transfers --------------------------------------------------------------------------------------------------
    def _transfer(self, actions: list[Action]) -> None:
        """One batch of p2p operations for a run of consecutive transfer actions; waits for its receives."""
        ops = []
        for a in actions:
            g, t = a.key
            peer = a.peer_stage()
            if a.type in SENDS:
                for x in self.outbox.pop((a.type, g, t, peer)):
                    ops.append(dist.P2POp(dist.isend, x.contiguous(), self.ranks[peer], self.group))
                continue
            key = (a.type, g, t, peer)
            if key in self.mailbox:
                continue  # taken earlier, with a message sent before it on the same channel
            channel = self.incoming[peer]
            while True:
                k = channel.popleft()
                bufs = self._buffers(k)
                self.mailbox[k] = bufs
                ops += [dist.P2POp(dist.irecv, x, self.ranks[peer], self.group) for x in bufs]
                if k == key:
                    break
        if ops:
            works = dist.batch_isend_irecv(ops)
            if len(works) == len(ops):  # one work per operation (gloo): wait for the receives only
                for op, w in zip(ops, works, strict=True):
                    if op.op is dist.irecv:
                        w.wait()
                    else:  # waited for at the end of the step; the tensor stays referenced until then
                        self.works.append((w, op.tensor))
            else:  # one work for the whole batch (NCCL): waiting only orders the current stream after it
                for w in works:
                    w.wait()
        for a in actions:
            if a.type is A.RECV_M:  # the memory the group's next segment reads
                msg = self.mailbox.pop((a.type, *a.key, a.peer_stage()))
                for n, x in zip(self._global_names(self.s), msg, strict=True):
                    self.held[a.group].tensors[n] = x

    def _buffers(self, k: MsgKey) -> list[Tensor]:
        kind, g, t, src = k
        B = self.batches[g][t].tokens_BT.shape[0]
        D = self.stage.cfg.d_model
        if kind in (A.RECV_F, A.RECV_B):
            return [torch.empty(B, self.S, D, dtype=self.dtype, device=self.device)]
        # Memory (from the last stage, names this stage reads) or its gradient (names the reader reads).
        names = self._global_names(self.s if kind is A.RECV_M else src)
        return [torch.empty(B, *self.shapes[n], dtype=self.dtype, device=self.device) for n in names]

    # -- the step's collectives --------------------------------------------------------------------------------------
    def _exchange_initial_memory(self) -> None:
        """The initial memory of each group, from the stage that creates it to the stages that hold it without
        creating it (memformer: the last stage's, read by every stage), for the rows that reset."""
        self.owned_init: list[MemoryState] = []
        self.foreign_init: list[dict[str, Tensor]] = [{} for _ in self.batches]
        ops = []
        if self.init_readers:
            for group in self.batches:
                init = self.stage.init_state(group[0].tokens_BT.shape[0])
                self.owned_init.append(init)
                for s, names in self.init_readers.items():
                    for n in names:
                        ops.append(
                            dist.P2POp(dist.isend, init[n].detach().contiguous(), self.ranks[s], self.group)
                        )
        for g, group in enumerate(self.batches):
            B = group[0].tokens_BT.shape[0]
            for n in sorted(self.foreign):
                x = torch.empty(B, *self.shapes[n], dtype=self.dtype, device=self.device)
                self.foreign_init[g][n] = x
                ops.append(dist.P2POp(dist.irecv, x, self.ranks[self.foreign[n]], self.group))
        if ops:
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        for h, init in zip(self.held, self.foreign_init, strict=True):
            for n, x in init.items():
                if n not in h:  # a group given without this memory starts from the initial one
                    h.tensors[n] = x.clone()
                x.requires_grad_(x.is_floating_point())

    def _initial_memory_gradients(self) -> None:
        """The gradients of the initial memory read on other stages, back to its creator, which backpropagates them."""
        ops, got = [], []
        for init in self.foreign_init:
            for n in sorted(init):
                x = init[n]
                gx = x.grad if x.grad is not None else torch.zeros_like(x)
                ops.append(dist.P2POp(dist.isend, gx.contiguous(), self.ranks[self.foreign[n]], self.group))
        for init in self.owned_init:
            for s, names in self.init_readers.items():
                for n in names:
                    buf = torch.empty_like(init[n])
                    ops.append(dist.P2POp(dist.irecv, buf, self.ranks[s], self.group))
                    got.append((init[n], buf))
        if ops:
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        roots = [(y, gy) for y, gy in got if y.requires_grad]
        if roots:
            self.backward([y for y, _ in roots], [gy for _, gy in roots])

    def _replicated_grads(self) -> dict[str, Tensor | None]:
        """The gradients, before this step, of parameters that several stages hold (summed at STEP)."""
        counts: dict[str, int] = {}
        for inf in self.infos:
            for n in inf["params"]:
                counts[n] = counts.get(n, 0) + 1
        self.replicated = sorted(n for n, c in counts.items() if c > 1)
        params = self._param_keys()
        return {
            n: (params[n].grad.detach().clone() if params[n].grad is not None else None)
            for n in self.replicated
            if n in params
        }

    def _sum_replicated(self, before: dict[str, Tensor | None]) -> None:
        """Sum this step's gradient of each replicated parameter over the stages that hold it (what the whole
        model accumulates into its one copy); earlier accumulated gradient is kept as it was."""
        if not self.replicated:
            return
        params = self._param_keys()
        numel = [next(inf["params"][n] for inf in self.infos if n in inf["params"]) for n in self.replicated]
        parts = []
        for n, m in zip(self.replicated, numel, strict=True):
            if n not in params:  # held elsewhere: contributes nothing here
                parts.append(torch.zeros(m, dtype=torch.float32, device=self.device))
                continue
            p = params[n]
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            b = before.get(n)
            parts.append((g - b if b is not None else g).reshape(-1).to(torch.float32))
        flat = torch.cat(parts)
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for n, m in zip(self.replicated, numel, strict=True):
            if n in params:
                p = params[n]
                total = flat[offset : offset + m].view_as(p).to(p.dtype)
                b = before.get(n)
                p.grad = total if b is None else b + total
            offset += m

    def _loss_everywhere(self) -> tuple[float, float]:
        """The loss (summed at the last stage) and the auxiliary losses (summed on every stage), on every rank."""
        loss = (
            self.loss_sum.clone() if self.last else torch.zeros((), dtype=torch.float64, device=self.device)
        )
        both = torch.stack([loss, self.aux_sum])
        dist.all_reduce(both, group=self.group)
        return both[0].item(), both[1].item()


__all__ = ["PipelineResult", "PipelineRuntime", "forward_schedule", "stage_state"]
