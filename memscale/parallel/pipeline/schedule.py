"""Pipeline schedules as data: the action IR, its compact strings and CSV, and the generators.

A schedule is one list of actions per rank (one pipeline stage per rank; no virtual stages), executed in order by
the runtime and checked beforehand by memscale/parallel/pipeline/simulate.py. A micro-batch is a *segment* of a
*stream group*: a rank's streams are split into G groups, and (group g, segment t) is one pipeline unit. The
segments of one group enter the pipe in order, because segment t + 1 reads the memory that segment t wrote.

The vocabulary is torch.distributed.pipelining's (`_Action(stage_index, computation_type, microbatch_index)`,
types F, B, SEND_F, RECV_F, SEND_B, RECV_B, strings like `1F3`, one CSV row per rank). What it lacks, and why it
had to be added here:

  - (group, segment) instead of one micro-batch index: torch's micro-batches are independent, so one integer
    names them; here an edge runs from segment t to t + 1 of the *same* group, and both coordinates are needed to
    state it. Strings write `1F3.2` (stage 1, forward, group 3, segment 2); `torch_microbatch` maps (g, t) to
    torch's index t * G + g (the round-robin order) for tools that only know integers.
  - SEND_M / RECV_M: the memory written at the last stage travels to the stage(s) that read it (global topology:
    rmt's first stage, every stage for memformer). torch only links stages s -> s +- 1, and only with activations
    or their gradients, so it has no action, and no peer, for this. Written `3SEND_M1.2>0` / `0RECV_M1.2<3`.
  - SEND_MG / RECV_MG: under BPTT the gradient of that memory goes back from each reading stage to the last stage,
    where the earlier segment's backward starts. Written `0SEND_MG1.2>3` / `3RECV_MG1.2<0`.
  - STEP: the optimizer step that closes one schedule. It is a collective over the pipeline ranks (gradient
    clipping needs the global norm), after which the next step's schedule starts; torch's REDUCE_GRAD is a
    per-stage data-parallel reduction and does not order ranks against each other.

torch's parser matches a prefix (`1F3.2` would silently read as micro-batch 3), so these strings go through
`Action.parse` only; `to_torch` converts a schedule without memory transfers (F, B and activation transfers) to
torch `_Action`s, for torch's own tools.

Example: P = 2 stages, G = 2 groups, S = 2 segments, detached memory, per-layer topology
(`print(format_order(generate(ScheduleSpec(num_stages=2, num_groups=2, num_segments=2))))`):

             Rank 0     Rank 1
    Step 00: 0F0.0      1RECV_F0.0
    Step 01: 0SEND_F0.0 1F0.0
    Step 02: 0F1.0      1B0.0
    Step 03: 0SEND_F1.0 1SEND_B0.0
    Step 04: 0RECV_B0.0 1RECV_F1.0
    Step 05: 0B0.0      1F1.0
    ...
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from memscale.config import MemoryGrad
from memscale.utils.files import write_text_atomic

# memscale.models.memory.base.Topology, repeated here so that schedules are built without importing torch.
Topology = Literal["none", "per_layer", "global"]
Readers = Literal["first", "every"]

# Global-topology kinds and the stages that read their memory (DESIGN.md §2): rmt's memory tokens enter at the
# first stage and ride through the activations to the last, which writes the next memory; memformer's slots are
# read by a cross-attention in every layer, so every stage holds them.
GLOBAL_READERS: dict[str, Readers] = {"rmt": "first", "memformer": "every"}


class ActionType(StrEnum):
    """What one action does. The first six are torch's (same letters); the rest are memscale's (module doc)."""

    F = "F"
    B = "B"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"
    SEND_M = "SEND_M"
    RECV_M = "RECV_M"
    SEND_MG = "SEND_MG"
    RECV_MG = "RECV_MG"
    STEP = "STEP"


COMPUTE = frozenset({ActionType.F, ActionType.B})
SENDS = frozenset({ActionType.SEND_F, ActionType.SEND_B, ActionType.SEND_M, ActionType.SEND_MG})
RECVS = frozenset({ActionType.RECV_F, ActionType.RECV_B, ActionType.RECV_M, ActionType.RECV_MG})
# Memory and memory-gradient transfers join non-adjacent stages, so their strings carry the peer.
WITH_PEER = frozenset({ActionType.SEND_M, ActionType.RECV_M, ActionType.SEND_MG, ActionType.RECV_MG})
# The receive that matches each send.
MATCHING_RECV = {
    ActionType.SEND_F: ActionType.RECV_F,
    ActionType.SEND_B: ActionType.RECV_B,
    ActionType.SEND_M: ActionType.RECV_M,
    ActionType.SEND_MG: ActionType.RECV_MG,
}

# Longest names first, so that SEND_MG is not read as SEND_M followed by garbage.
_TYPES = "|".join(sorted((t.value for t in ActionType), key=len, reverse=True))
_ACTION_RE = re.compile(rf"(\d+)({_TYPES})(?:(\d+)\.(\d+))?(?:([<>])(\d+))?")


@dataclass(frozen=True)
class Action:
    """One action of one rank: `type` on `stage` for (group, segment); `peer` is the other stage of a memory or
    memory-gradient transfer (SEND_M/MG: destination, RECV_M/MG: source); F/B transfers go to s +- 1."""

    stage: int
    type: ActionType
    group: int | None = None
    segment: int | None = None
    peer: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.type, ActionType):
            object.__setattr__(self, "type", ActionType(self.type))
        is_step = self.type is ActionType.STEP
        if is_step != (self.group is None) or (self.group is None) != (self.segment is None):
            raise ValueError(f"{self.type.value} takes {'no' if is_step else 'a'} (group, segment)")
        if (self.type in WITH_PEER) != (self.peer is not None):
            raise ValueError(
                f"{self.type.value} {'needs' if self.type in WITH_PEER else 'takes no'} peer stage"
            )

    def __str__(self) -> str:
        s = f"{self.stage}{self.type.value}"
        if self.group is not None:
            s += f"{self.group}.{self.segment}"
        if self.peer is not None:
            s += f"{'>' if self.type in SENDS else '<'}{self.peer}"
        return s

    __repr__ = __str__

    @staticmethod
    def parse(text: str) -> Action:
        """The inverse of `str`: `1F3.2`, `0SEND_F0.1`, `3SEND_M1.2>0`, `0RECV_M1.2<3`, `2STEP`."""
        m = _ACTION_RE.fullmatch(text.strip())
        if m is None:
            raise ValueError(
                f"{text!r} is not an action: write <stage><type><group>.<segment>[>peer|<peer], e.g. 1F3.2, "
                "3SEND_M1.2>0, or <stage>STEP"
            )
        stage, kind, group, segment, arrow, peer = m.groups()
        t = ActionType(kind)
        if arrow is not None and (arrow == ">") != (t in SENDS):
            raise ValueError(
                f"{text!r}: a send names its destination with '>', a receive its source with '<'"
            )
        return Action(
            int(stage),
            t,
            None if group is None else int(group),
            None if segment is None else int(segment),
            None if peer is None else int(peer),
        )

    @property
    def key(self) -> tuple[int, int]:
        """(group, segment) of a non-STEP action."""
        assert self.group is not None and self.segment is not None, self
        return self.group, self.segment

    def peer_stage(self) -> int | None:
        """The other end of a transfer: s + 1 for SEND_F / RECV_B, s - 1 for RECV_F / SEND_B, `peer` otherwise."""
        if self.type in (ActionType.SEND_F, ActionType.RECV_B):
            return self.stage + 1
        if self.type in (ActionType.RECV_F, ActionType.SEND_B):
            return self.stage - 1
        return self.peer


Schedule = dict[int, list[Action]]
"""rank -> its actions in execution order; rank r runs stage r."""


@dataclass(frozen=True)
class ScheduleSpec:
    """The problem a schedule solves: one optimizer step of G stream groups through P stages.

    Each group runs `num_segments` (S) segments per optimizer step, cut into BPTT windows of `bptt_segments` (k)
    (with `memory_grad=detached` k plays no part). `topology` is the memory kind's (`MemoryKind.topology`);
    `memory_readers` says which stages read a global memory (`GLOBAL_READERS`: rmt the first, memformer every).
    """

    num_stages: int
    num_groups: int
    num_segments: int
    bptt_segments: int = 1
    memory_grad: MemoryGrad = "detached"
    topology: Topology = "per_layer"
    memory_readers: Readers = "first"

    def __post_init__(self) -> None:
        for name in ("num_stages", "num_groups", "num_segments", "bptt_segments"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ScheduleSpec.{name}={getattr(self, name)!r} must be an integer >= 1")
        if self.memory_grad not in ("detached", "truncated", "replay"):
            raise ValueError(f"memory_grad={self.memory_grad!r} is not one of detached, truncated, replay")
        if self.topology not in ("none", "per_layer", "global"):
            raise ValueError(f"topology={self.topology!r} is not one of none, per_layer, global")
        if self.memory_readers not in ("first", "every"):
            raise ValueError(f"memory_readers={self.memory_readers!r} is not one of first, every")
        P, G = self.num_stages, self.num_groups
        if self.topology == "global" and G < P:
            raise ValueError(
                f"global topology with num_groups={G} < num_stages={P}: the memory of a group must come back from "
                f"the last stage before its next segment enters, so fewer than P groups leave the pipe idle; "
                f"split the streams into at least {P} groups"
            )
        if self.bptt:
            if self.topology == "none":
                raise ValueError(
                    f"memory_grad={self.memory_grad} with topology=none: there is no memory to "
                    "backpropagate through; use memory_grad=detached"
                )
            if self.num_segments % self.bptt_segments:
                raise ValueError(
                    f"num_segments={self.num_segments} is not a multiple of bptt_segments={self.bptt_segments}: "
                    "an optimizer step holds whole BPTT windows"
                )

    @property
    def bptt(self) -> bool:
        """Gradient crosses segment boundaries within a window (truncated or replay)."""
        return self.memory_grad != "detached"

    def window(self, segment: int) -> int:
        return segment // self.bptt_segments if self.bptt else segment

    def grad_from_next(self, segment: int) -> bool:
        """Segment t's backward waits for the memory gradient of segment t + 1 (same window, BPTT)."""
        return (
            self.bptt and segment + 1 < self.num_segments and self.window(segment + 1) == self.window(segment)
        )

    def readers(self) -> tuple[int, ...]:
        """Stages that read the memory a segment carries in (global: the first or every; per-layer: each its own)."""
        P = self.num_stages
        if self.topology == "global":
            return (0,) if self.memory_readers == "first" else tuple(range(P))
        return tuple(range(P)) if self.topology == "per_layer" else ()

    def memory_route(self) -> tuple[int, ...]:
        """Stages a global memory is sent to from the last stage (its writer), which reads its own copy locally."""
        if self.topology != "global":
            return ()
        return tuple(s for s in self.readers() if s != self.num_stages - 1)


def spec_for_kind(
    kind: str,
    *,
    num_stages: int,
    num_groups: int,
    num_segments: int,
    bptt_segments: int = 1,
    memory_grad: MemoryGrad = "detached",
) -> ScheduleSpec:
    """The spec for memory kind `kind`, its topology read from the kind's class (`MemoryKind.topology`)."""
    import importlib

    from memscale.models.memory import REGISTRY

    if kind not in REGISTRY:
        raise ValueError(f"model.memory.kind={kind!r} is not available: choose one of {', '.join(REGISTRY)}")
    module, cls = REGISTRY[kind].split(":")
    topology = getattr(importlib.import_module(module), cls).topology
    return ScheduleSpec(
        num_stages=num_stages,
        num_groups=num_groups,
        num_segments=num_segments,
        bptt_segments=bptt_segments,
        memory_grad=memory_grad,
        topology=topology,
        memory_readers=GLOBAL_READERS.get(kind, "first"),
    )


# -- strings, CSV, torch ------------------------------------------------------------------------------------------
def format_actions(actions: Iterable[Action]) -> str:
    return " ".join(str(a) for a in actions)


def parse_actions(text: str) -> list[Action]:
    return [Action.parse(s) for s in text.split()]


def dump_csv(schedule: Schedule, path: str | os.PathLike) -> None:
    """One row per rank (rank order), one action string per cell, as torch's `_dump_csv`; written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    for rank in range(len(schedule)):
        writer.writerow([str(a) for a in schedule[rank]])
    write_text_atomic(path, buf.getvalue())


def load_csv(path: str | os.PathLike) -> Schedule:
    """Read a schedule written by `dump_csv`; a bad cell raises ValueError naming the file, row and cell."""
    schedule: Schedule = {}
    with open(path, newline="") as f:
        for rank, row in enumerate(csv.reader(f)):
            actions = []
            for col, cell in enumerate(row):
                try:
                    a = Action.parse(cell)
                except ValueError as e:
                    raise ValueError(f"{os.fspath(path)}: row {rank + 1}, cell {col + 1}: {e}") from None
                if a.stage != rank:
                    raise ValueError(
                        f"{os.fspath(path)}: row {rank + 1}, cell {col + 1}: {a} is stage {a.stage}'s action in "
                        f"rank {rank}'s row (one stage per rank: row r holds stage r's actions)"
                    )
                actions.append(a)
            schedule[rank] = actions
    return schedule


def torch_microbatch(group: int, segment: int, num_groups: int) -> int:
    """torch's micro-batch index of (group, segment): the round-robin order t * G + g."""
    return segment * num_groups + group


def to_torch(schedule: Schedule, *, num_groups: int) -> dict[int, list]:
    """The schedule as torch `_Action`s, for torch's own tools (`_format_pipeline_order`, `_dump_csv`).

    Only schedules torch can express convert: F, B and the activation transfers. Memory transfers and STEP raise,
    since torch has no action for them (module doc); with G > 1 the (g, t) -> t * G + g numbering is lossless but
    torch would treat the micro-batches as independent.
    """
    from torch.distributed.pipelining.schedules import _Action, _ComputationType

    out: dict[int, list] = {}
    for rank, actions in schedule.items():
        row = []
        for a in actions:
            if a.type in WITH_PEER or a.type is ActionType.STEP:
                raise ValueError(f"{a}: torch.distributed.pipelining has no {a.type.value} action")
            g, t = a.key
            row.append(_Action(a.stage, _ComputationType(a.type.value), torch_microbatch(g, t, num_groups)))
        out[rank] = row
    return out


def format_order(schedule: Schedule) -> str:
    """A table of step (row) x rank (column), like torch's `_format_pipeline_order`.

    Written here rather than called from torch so that schedules can be generated, checked and printed without
    importing torch (the planner and these tests stay pure Python).
    """
    ranks = sorted(schedule)
    n = max((len(schedule[r]) for r in ranks), default=0)
    label = len(str(max(n - 1, 0)))
    cols = [[str(a) for a in schedule[r]] + [""] * (n - len(schedule[r])) for r in ranks]
    widths = [max([len(f"Rank {r}")] + [len(c) for c in col]) for r, col in zip(ranks, cols, strict=True)]
    lines = [" " * (label + 7) + " ".join(f"{f'Rank {r}':<{w}}" for r, w in zip(ranks, widths, strict=True))]
    for i in range(n):
        cells = " ".join(f"{col[i]:<{w}}" for col, w in zip(cols, widths, strict=True))
        lines.append(f"Step {i:0{label}d}: {cells}".rstrip())
    return "\n".join(lines) + "\n"


# -- generators -----------------------------------------------------------------------------------------------------
@dataclass
class _Costs:
    """Relative per-stage times the generator orders by (simulate.CostModel has the full model)."""

    forward: list[float]
    backward: list[float]
    p2p: float = 0.0


def inflight_limit(spec: ScheduleSpec, stage: int) -> int:
    """How many segments stage `stage` may have forwarded and not yet backpropagated (its activation memory).

    detached: P - s, as in 1F1B (stage 0 holds at most P segments' activations). BPTT per-layer: a window of k
    segments plays the part of 1F1B's micro-batch (its backward cannot start before its last forward), so
    k (P - s). BPTT global: a group's window is one chain through every stage twice (forward, then backward
    segment by segment, each reaching the last stage only through the memory gradient from the first), so every
    stage keeps one window of each group in flight, and one more window: the next window's forward (which needs
    only the memory the last one wrote, not its backward) runs while this one's backward chain comes back. That is
    k (max(P, G) + 1) segments of one group's B / G streams over 1 / P of the layers: with G >= P, about
    (1 + 1 / G) / P of the activations one process keeps for a window of all B streams. Measured in the
    simulator (P = 2, G = 4, k = 2, backward = 2 forward): with k P the bubble was 0.14, with this limit 0.03,
    1F1B's (P - 1) / (m + P - 1). replay keeps only each segment's stage input and memory state, so the same
    count costs little memory there. With one stage there is nothing to overlap: k.
    """
    P, k = spec.num_stages, spec.bptt_segments
    if not spec.bptt:
        return P - stage
    if spec.topology == "global":
        # One stage (no pipeline) gains nothing from running ahead: one window at a time, the least memory.
        return k * (max(P, spec.num_groups) + 1) if P > 1 else k
    if spec.memory_grad == "replay":
        return k * max(P, spec.num_groups)
    return k * (P - stage)


def generate(
    spec: ScheduleSpec,
    *,
    forward: float | list[float] = 1.0,
    backward: float | list[float] = 2.0,
    p2p: float = 0.0,
) -> Schedule:
    """The schedule of one optimizer step for `spec`: per rank, its computations with their transfers.

    Order of computations. A list-scheduling pass runs the problem's dependency graph (the same one
    simulate.py checks) with the given relative costs: whenever a stage is free it starts, among the actions
    whose inputs have arrived, a backward first (it frees activations and feeds the stages before it: 1F1B), else
    the earliest forward in (window, group, segment) order while the stage holds fewer than `inflight_limit`
    unfinished segments. Global memory with BPTT instead starts the action with the longest chain of
    computations still behind it (its "bottom level" in the graph, critical-path list scheduling): there every
    window is one long chain through all stages and back, and backward-first starves the chains that the other
    stages wait for (simulated, backward = 2 forward, S = 8: P = 2, G = 4, k = 2 bubble 0.14 backward-first,
    0.03 by chain length = 1F1B's; P = 4, G = 8, k = 4: 0.21 and 0.045 = 1F1B's; for detached or per-layer
    memory, backward-first already gives 1F1B and the chain order does not improve it). Consequences:
      - detached, per-layer: exactly 1F1B over m = G S micro-batches, taken round robin over the groups;
      - global: a group's next segment cannot start before its memory is back from the last stage, so stage 0
        runs the other groups' segments meanwhile (G >= P keeps it busy): round robin over groups;
      - BPTT windows: a window's segments are forwarded back to back, and its backward runs from the last segment
        to the first, each waiting for the memory gradient of the one after it.
    If the limit would stall every stage (never with the limits above on the tested ranges, but possible for
    unusual costs), the earliest ready forward runs anyway: the schedule stays valid, its memory grows.

    `forward` / `backward` are relative per-stage times of one segment (one number or one per stage; replay adds
    the recompute to the backward), `p2p` the time of one transfer.

    Transfers. Each send follows the computation that produces its tensor, each receive precedes the computation
    that consumes it, and the final memory of each group is received before STEP so that the next step starts
    with it in place. Sends are asynchronous (isend); since the computation order is a valid execution of the
    dependency graph, the per-rank lists cannot deadlock whatever the real costs.
    """
    P = spec.num_stages
    fwd, bwd = _per_stage(forward, P, "forward"), _per_stage(backward, P, "backward")
    if spec.memory_grad == "replay":  # each backward first recomputes its segment's forward
        bwd = [b + f for b, f in zip(bwd, fwd, strict=True)]
    costs = _Costs(fwd, bwd, p2p)
    order = _compute_order(spec, costs)
    return _with_transfers(spec, order)


def _per_stage(x: float | list[float], P: int, name: str) -> list[float]:
    xs = [float(x)] * P if isinstance(x, int | float) else [float(v) for v in x]
    if len(xs) != P or any(v < 0 for v in xs):
        raise ValueError(f"{name} costs must be one non-negative number or one per stage ({P}); got {x!r}")
    return xs


@dataclass
class _Rank:
    clock: float = 0.0
    inflight: int = 0
    next_f: list[int] = field(default_factory=list)  # per group: the next segment to forward
    b_queue: list[list[int]] = field(
        default_factory=list
    )  # per group: segments still to backpropagate, in order
    order: list[Action] = field(default_factory=list)


def backward_order(spec: ScheduleSpec) -> list[int]:
    """The order of one group's backward segments on every stage: by window, within a window from last to first
    (BPTT), or in forward order (detached)."""
    S, k = spec.num_segments, spec.bptt_segments
    if not spec.bptt:
        return list(range(S))
    return [t for w in range(S // k) for t in range(w * k + k - 1, w * k - 1, -1)]


def _compute_order(spec: ScheduleSpec, costs: _Costs) -> dict[int, list[Action]]:
    P, G = spec.num_stages, spec.num_groups
    done: dict[tuple[ActionType, int, int, int], float] = {}  # (F|B, stage, g, t) -> end time
    bwd = backward_order(spec)
    ranks = [_Rank(next_f=[0] * G, b_queue=[list(bwd) for _ in range(G)]) for _ in range(P)]
    limits = [inflight_limit(spec, s) for s in range(P)]
    # With one stage there is no chain to keep fed: its window-by-window order needs the least memory.
    chain = _bottom_levels(spec, costs) if spec.topology == "global" and spec.bptt and P > 1 else None
    total = 2 * P * G * spec.num_segments
    committed = 0
    while committed < total:
        best = _pick(spec, costs, ranks, done, limits, chain, respect_limit=True)
        if best is None:
            best = _pick(spec, costs, ranks, done, limits, chain, respect_limit=False)
        assert best is not None, "the dependency graph has a cycle"  # impossible: edges go forward in (t, s)
        start, s, a = best
        r = ranks[s]
        cost = costs.forward[s] if a.type is ActionType.F else costs.backward[s]
        r.clock = start + cost
        done[(a.type, s, *a.key)] = r.clock
        g, t = a.key
        if a.type is ActionType.F:
            r.next_f[g] += 1
            r.inflight += 1
        else:
            r.b_queue[g].pop(0)
            r.inflight -= 1
        r.order.append(a)
        committed += 1
    return {s: r.order for s, r in enumerate(ranks)}


def _pick(spec, costs, ranks, done, limits, chain, *, respect_limit):
    """The (start, stage, action) to commit next: the stage that can start something earliest, and there, among
    what it can start then, the longest remaining chain first when `chain` (bottom levels) is given, then
    backward first and the earliest in order."""
    best = None
    for s, r in enumerate(ranks):
        cands = []  # (ready, priority, action)
        for g in range(spec.num_groups):
            if r.b_queue[g]:
                t = r.b_queue[g][0]
                ready = _ready(spec, costs, done, ActionType.B, s, g, t)
                if ready < math.inf:
                    first = -chain[(ActionType.B, s, g, t)] if chain else 0.0
                    cands.append((ready, (first, 0, spec.window(t), g, -t), Action(s, ActionType.B, g, t)))
            t = r.next_f[g]
            if t < spec.num_segments and (not respect_limit or r.inflight < limits[s]):
                ready = _ready(spec, costs, done, ActionType.F, s, g, t)
                if ready < math.inf:
                    first = -chain[(ActionType.F, s, g, t)] if chain else 0.0
                    cands.append((ready, (first, 1, spec.window(t), g, t), Action(s, ActionType.F, g, t)))
        if not cands:
            continue
        now = [c for c in cands if c[0] <= r.clock]
        if now:
            choice = min(now, key=lambda c: c[1])
            start = r.clock
        else:
            choice = min(cands, key=lambda c: (c[0], c[1]))
            start = choice[0]
        if best is None or (start, choice[1]) < (best[0], best[3]):
            best = (start, s, choice[2], choice[1])
    return None if best is None else best[:3]


def _inputs(spec: ScheduleSpec, kind: ActionType, s: int, g: int, t: int):
    """The computations (F|B, stage, g, t) whose results computation `kind` of (g, t) on stage `s` needs, each
    with whether the result crosses ranks (a p2p transfer)."""
    P = spec.num_stages
    if kind is ActionType.F:
        if s > 0:
            yield (ActionType.F, s - 1, g, t), True
        if t > 0 and s in spec.readers():
            if spec.topology == "per_layer":
                yield (ActionType.F, s, g, t - 1), False
            else:
                yield (ActionType.F, P - 1, g, t - 1), s != P - 1
        return
    yield (ActionType.F, s, g, t), False
    if s < P - 1:
        yield (ActionType.B, s + 1, g, t), True
    if spec.grad_from_next(t):
        if spec.topology == "per_layer":
            yield (ActionType.B, s, g, t + 1), False
        elif s == P - 1:
            for r in spec.readers():
                yield (ActionType.B, r, g, t + 1), r != P - 1


def _ready(spec: ScheduleSpec, costs: _Costs, done, kind: ActionType, s: int, g: int, t: int) -> float:
    """When computation `kind` of (g, t) on stage `s` can start: inf while an input is not yet computed."""
    ready = 0.0
    for key, hop in _inputs(spec, kind, s, g, t):
        ready = max(ready, done.get(key, math.inf) + (costs.p2p if hop else 0.0))
    return ready


def _bottom_levels(spec: ScheduleSpec, costs: _Costs) -> dict[tuple[ActionType, int, int, int], float]:
    """Per computation, its cost plus the longest chain of computations (and transfers) that depend on it."""
    P, G, S = spec.num_stages, spec.num_groups, spec.num_segments
    nodes = [
        (kind, s, g, t)
        for kind in (ActionType.F, ActionType.B)
        for s in range(P)
        for g in range(G)
        for t in range(S)
    ]
    after: dict[tuple, list[tuple[tuple, bool]]] = {n: [] for n in nodes}
    for n in nodes:
        for key, hop in _inputs(spec, *n):
            after[key].append((n, hop))
    level: dict[tuple, float] = {}
    # Reverse topological order: every edge goes from an earlier to a later entry of this order (forwards by
    # segment then stage; backwards after all forwards, by segment descending then stage descending).
    order = sorted(
        nodes,
        key=lambda n: (0, n[3], n[1]) if n[0] is ActionType.F else (1, -n[3], -n[1]),
    )
    for n in reversed(order):
        own = costs.forward[n[1]] if n[0] is ActionType.F else costs.backward[n[1]]
        level[n] = own + max((level[m] + (costs.p2p if hop else 0.0) for m, hop in after[n]), default=0.0)
    return level


def _with_transfers(spec: ScheduleSpec, order: dict[int, list[Action]]) -> Schedule:
    P, S = spec.num_stages, spec.num_segments
    last = P - 1
    schedule: Schedule = {}
    for s in range(P):
        out: list[Action] = []
        for a in order[s]:
            g, t = a.key
            if a.type is ActionType.F:
                if s > 0:
                    out.append(Action(s, ActionType.RECV_F, g, t))
                if t > 0 and s in spec.memory_route():
                    out.append(Action(s, ActionType.RECV_M, g, t - 1, last))
                out.append(a)
                if s < last:
                    out.append(Action(s, ActionType.SEND_F, g, t))
                if s == last:
                    out += [Action(s, ActionType.SEND_M, g, t, r) for r in spec.memory_route()]
            else:
                if s < last:
                    out.append(Action(s, ActionType.RECV_B, g, t))
                if s == last and spec.grad_from_next(t):
                    out += [Action(s, ActionType.RECV_MG, g, t + 1, r) for r in spec.memory_route()]
                out.append(a)
                if s > 0:
                    out.append(Action(s, ActionType.SEND_B, g, t))
                if s in spec.memory_route() and t > 0 and spec.grad_from_next(t - 1):
                    out.append(Action(s, ActionType.SEND_MG, g, t, last))
        if s in spec.memory_route():  # the memory the next step starts from
            out += [Action(s, ActionType.RECV_M, g, S - 1, last) for g in range(spec.num_groups)]
        out.append(Action(s, ActionType.STEP))
        schedule[s] = out
    return schedule
