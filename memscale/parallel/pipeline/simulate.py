"""Check a schedule before it runs, and predict its time and memory.

`simulate(schedule, spec, costs)` executes every rank's action list in order, in simulated time:

  - a compute action checks its inputs against the *problem* (`ScheduleSpec`), not against the schedule:
      F(s, g, t) needs the activation of (g, t) received from stage s - 1 (s > 0) and the memory of (g, t - 1)
        (t > 0) where stage s reads it: per-layer, F(s, g, t - 1) done on the same stage; global, the memory
        written by F(P - 1, g, t - 1) received from the last stage (rmt: stage 0 reads it, memformer: every stage,
        so the last stage sends it to each; a stage's own copy needs no transfer);
      B(s, g, t) needs F(s, g, t), the activation gradient of (g, t) received from stage s + 1 (the loss at the
        last stage) and, inside a BPTT window (memory_grad truncated or replay), the memory gradient of segment
        t + 1: per-layer, B(s, g, t + 1) done on the same stage; global, at the last stage, received from each
        stage that read the memory (local for its own read). Never across windows, never when detached.
    A missing input raises `ScheduleError` at once, naming it: the rank's own list is the only way it could have
    arrived, and it has not.
  - a send is asynchronous (the runtime posts an isend and goes on); its tensor must exist, and it arrives
    `latency + bytes / bandwidth` later. A receive blocks until the matching send (type, group, segment,
    source -> destination) has arrived; when no rank can move, the ones waiting are named (a deadlock), or the
    send that the source will never post is.
  - STEP is a barrier over all ranks (the optimizer step clips by the global norm); before it a rank must have
    run the backward of every segment, and each stage that reads a global memory must hold the step's last
    memory of every group (the next step starts from it).
  - at the end, every send was received and every (stage, group, segment) forward and backward ran exactly once.

Memory. Activation bytes: a forward keeps `activation_bytes[s]` until its backward ends (detached, truncated);
with replay a forward keeps only its stage input (`stage_input_bytes[s]`, to recompute from) and the backward
holds the recomputed activations while it runs. Memory-state bytes: a stage holds each version of a group's
state it reads or writes from the forward that writes it (or the receive that brings it) until the last
computation that uses it (the next forward; under BPTT also the next backward, which differentiates through it;
at the writer, also its sends); the last version of each group is kept, as the next step starts from it.

Example (the P = 2, G = 2 schedule of schedule.py, uniform costs F = 1, B = 2):

    >>> from memscale.parallel.pipeline.schedule import ScheduleSpec, generate
    >>> spec = ScheduleSpec(num_stages=2, num_groups=2, num_segments=2)
    >>> r = simulate(generate(spec), spec, CostModel.uniform(2, forward_s=1, backward_s=2))
    >>> r.makespan_s, round(r.bubble, 3)  # 1F1B: (P - 1) / (m + P - 1) = 1 / 5
    (15.0, 0.2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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

A = ActionType


class ScheduleError(ValueError):
    """A schedule that would not run, or would compute something else than the problem: the message names the
    first violated dependency, the deadlock, or the unmatched transfer."""


@dataclass
class CostModel:
    """Per-stage costs, seconds and bytes. Lists have one entry per stage."""

    forward_s: list[float]
    backward_s: list[float]
    """Backward of one segment (input and weight gradients), without replay's recompute."""
    activation_bytes: list[int]
    """What one segment's forward keeps for its backward on the stage."""
    state_bytes: list[int]
    """One group's memory state held by the stage (per-layer: its layers' state; global: the shared memory)."""
    recompute_s: list[float] | None = None
    """replay: the forward recomputed inside each backward; None means forward_s."""
    stage_input_bytes: list[int] | None = None
    """replay: what a segment keeps between its forward and backward (the stage's input); None: the activation
    message from the previous stage (0 at stage 0, whose input is token ids)."""
    activation_msg_bytes: list[int] | None = None
    """Bytes sent from stage s to s + 1 (and its gradient back); None: 0 (latency only)."""
    memory_msg_bytes: int = 0
    """Bytes of one group's global memory (and of its gradient) on the wire."""
    p2p_latency_s: float = 0.0
    p2p_bandwidth_Bps: float = math.inf
    optimizer_s: float = 0.0

    @classmethod
    def uniform(
        cls,
        num_stages: int,
        *,
        forward_s: float = 1.0,
        backward_s: float = 2.0,
        activation_bytes: int = 1,
        state_bytes: int = 1,
        **kw,
    ) -> CostModel:
        P = num_stages
        return cls([forward_s] * P, [backward_s] * P, [activation_bytes] * P, [state_bytes] * P, **kw)

    def check(self, P: int) -> None:
        for name in (
            "forward_s",
            "backward_s",
            "activation_bytes",
            "state_bytes",
            "recompute_s",
            "stage_input_bytes",
            "activation_msg_bytes",
        ):
            v = getattr(self, name)
            if v is not None and (len(v) != P or any(x < 0 for x in v)):
                raise ValueError(
                    f"CostModel.{name} must hold {P} non-negative values (one per stage), got {v!r}"
                )

    def transfer_s(self, nbytes: int) -> float:
        return self.p2p_latency_s + (nbytes / self.p2p_bandwidth_Bps if nbytes else 0.0)

    def msg_bytes(self, a: Action) -> int:
        if a.type in (A.SEND_F, A.RECV_F, A.SEND_B, A.RECV_B):
            lo = min(a.stage, a.peer_stage())  # the boundary between lo and lo + 1
            return self.activation_msg_bytes[lo] if self.activation_msg_bytes else 0
        return self.memory_msg_bytes

    def kept_input(self, s: int) -> int:
        if self.stage_input_bytes is not None:
            return self.stage_input_bytes[s]
        return self.activation_msg_bytes[s - 1] if (self.activation_msg_bytes and s > 0) else 0


@dataclass
class RankReport:
    busy_s: float = 0.0
    bubble: float = 0.0
    """Idle fraction of the makespan."""
    peak_activation_bytes: int = 0
    peak_state_bytes: int = 0
    spans: list[tuple[float, float, Action]] = field(default_factory=list)
    """(start, end, action) of every computation, in order."""


@dataclass
class SimResult:
    makespan_s: float
    bubble: float
    """Idle fraction over all ranks."""
    ranks: list[RankReport]

    def format_timeline(self) -> str:
        """Time (row) x rank (column): the computation each rank starts at that time, `.` while it is idle."""
        times = sorted({start for r in self.ranks for start, _, _ in r.spans})
        cols = []
        for r in self.ranks:
            starts = {start: (end, a) for start, end, a in r.spans}
            col, busy_until = [], 0.0
            for t in times:
                if t in starts:
                    col.append(str(starts[t][1]))
                    busy_until = starts[t][0]
                else:
                    col.append("" if t < busy_until else ".")
            cols.append(col)
        widths = [max([len(f"Rank {i}")] + [len(c) for c in col]) for i, col in enumerate(cols)]
        tw = max([len("time")] + [len(f"{t:g}") for t in times])
        lines = [f"{'time':>{tw}}  " + " ".join(f"{f'Rank {i}':<{w}}" for i, w in enumerate(widths))]
        for i, t in enumerate(times):
            lines.append(
                (
                    f"{t:>{tw}g}  " + " ".join(f"{c[i]:<{w}}" for c, w in zip(cols, widths, strict=True))
                ).rstrip()
            )
        return "\n".join(lines) + "\n"


def _g(g: int, t: int) -> str:
    return f"(g{g}, t{t})"


class _RankState:
    def __init__(self, rank: int):
        self.rank = rank
        self.pc = 0
        self.clock = 0.0
        self.done: set[tuple[ActionType, int, int]] = set()  # (F|B, g, t) run here
        self.received: set[tuple[ActionType, int, int, int]] = set()  # (RECV type, g, t, src)
        self.act_bytes = 0
        self.state_versions: dict[tuple[int, int], int] = {}  # (g, t) -> remaining uses here
        self.report = RankReport()


def simulate(schedule: Schedule, spec: ScheduleSpec, costs: CostModel) -> SimResult:
    """Run `schedule` for `spec` under `costs`; raise ScheduleError if it is not a valid schedule of `spec`."""
    P = spec.num_stages
    costs.check(P)
    if sorted(schedule) != list(range(P)):
        raise ScheduleError(f"the schedule has ranks {sorted(schedule)}; {P} stages need ranks 0..{P - 1}")
    for rank, actions in schedule.items():
        for a in actions:
            if a.stage != rank:
                raise ScheduleError(f"rank {rank}: {a} is stage {a.stage}'s action (one stage per rank)")
        steps = [i for i, a in enumerate(actions) if a.type is A.STEP]
        if steps != [len(actions) - 1]:
            raise ScheduleError(f"rank {rank}: the list must end with its one STEP (found STEP at {steps})")
    sim = _Sim(schedule, spec, costs)
    sim.run()
    return sim.result()


class _Sim:
    def __init__(self, schedule: Schedule, spec: ScheduleSpec, costs: CostModel):
        self.schedule, self.spec, self.costs = schedule, spec, costs
        self.P = spec.num_stages
        self.ranks = [_RankState(r) for r in range(self.P)]
        self.in_flight: dict[tuple[ActionType, int, int, int, int], float] = {}  # (RECV type, g, t, src, dst)
        self.ran: set[tuple[ActionType, int, int, int]] = set()  # (F|B, stage, g, t)
        self.readers = set(spec.readers())
        for r in self.ranks:
            if self._uses(r.rank, -1) != 0:
                for g in range(spec.num_groups):
                    r.state_versions[(g, -1)] = self._uses(r.rank, -1)
            self._account_state(r)
        self.makespan = 0.0

    # -- memory-state accounting ----------------------------------------------------------------------------------
    def _uses(self, s: int, t: int) -> int:
        """How many actions on stage s use the state version written by segment t (t = -1: the version the step
        starts from) before the stage can drop it; the step's last version is kept (returns -1): the next step
        starts from it."""
        spec = self.spec
        if t == spec.num_segments - 1:
            return -1
        uses = 0
        if s in self.readers:
            # F(s, g, t + 1) reads it; under BPTT B(s, g, t + 1) differentiates through it (truncated) or
            # recomputes the segment from it (replay).
            uses += 2 if spec.bptt else 1
        if spec.topology == "global" and s == self.P - 1 and t >= 0:
            uses += len(spec.memory_route())  # the writer's sends
        return uses

    def _use_state(self, r: _RankState, g: int, t: int) -> None:
        v = (g, t)
        if v in r.state_versions and r.state_versions[v] > 0:
            r.state_versions[v] -= 1
            if r.state_versions[v] == 0:
                del r.state_versions[v]

    def _add_state(self, r: _RankState, g: int, t: int) -> None:
        uses = self._uses(r.rank, t)
        if uses != 0:
            r.state_versions[(g, t)] = uses
        self._account_state(r)

    def _account_state(self, r: _RankState) -> None:
        now = len(r.state_versions) * self.costs.state_bytes[r.rank]
        r.report.peak_state_bytes = max(r.report.peak_state_bytes, now)

    # -- the run --------------------------------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            moved = False
            for r in self.ranks:
                while r.pc < len(self.schedule[r.rank]) and self._try(r):
                    r.pc += 1
                    moved = True
            if all(r.pc == len(self.schedule[r.rank]) for r in self.ranks):
                break
            if not moved and not self._try_step():
                self._stuck()
        self._final_checks()

    def _next(self, r: _RankState) -> Action | None:
        acts = self.schedule[r.rank]
        return acts[r.pc] if r.pc < len(acts) else None

    def _try(self, r: _RankState) -> bool:
        a = self._next(r)
        if a.type is A.STEP:
            return False  # a barrier: _try_step
        if a.type in COMPUTE:
            self._compute(r, a)
            return True
        if a.type in SENDS:
            self._send(r, a)
            return True
        return self._recv(r, a)

    def _compute(self, r: _RankState, a: Action) -> None:
        spec, s = self.spec, r.rank
        g, t = a.key
        self._check_range(r, a)
        key = (a.type, s, g, t)
        if key in self.ran:
            raise ScheduleError(f"rank {s}: {a} runs twice")
        self.ran.add(key)
        if a.type is A.F:
            self._check_forward(r, a, g, t)
        else:
            self._check_backward(r, a, g, t)
        c = self.costs
        start = r.clock
        if a.type is A.F:
            dur = c.forward_s[s]
            keep = c.kept_input(s) if spec.memory_grad == "replay" else c.activation_bytes[s]
            r.act_bytes += keep
            r.report.peak_activation_bytes = max(r.report.peak_activation_bytes, r.act_bytes)
            # The forward holds the version it reads and the one it writes at once.
            if spec.topology == "per_layer" or (spec.topology == "global" and s == self.P - 1):
                self._add_state(r, g, t)
            if s in self.readers:
                self._use_state(r, g, t - 1)
        else:
            dur = c.backward_s[s]
            if spec.memory_grad == "replay":
                dur += (c.recompute_s or c.forward_s)[s]
                r.report.peak_activation_bytes = max(
                    r.report.peak_activation_bytes, r.act_bytes + c.activation_bytes[s]
                )
                r.act_bytes -= c.kept_input(s)
            else:
                r.act_bytes -= c.activation_bytes[s]
            if s in self.readers and spec.bptt:
                self._use_state(r, g, t - 1)
        self._account_state(r)
        r.clock = start + dur
        r.report.busy_s += dur
        r.report.spans.append((start, r.clock, a))
        r.done.add((a.type, g, t))

    def _check_range(self, r: _RankState, a: Action) -> None:
        g, t = a.key
        if not (0 <= g < self.spec.num_groups and 0 <= t < self.spec.num_segments):
            raise ScheduleError(
                f"rank {r.rank}: {a} names {_g(g, t)}, outside the {self.spec.num_groups} groups x "
                f"{self.spec.num_segments} segments of the step"
            )

    def _check_forward(self, r: _RankState, a: Action, g: int, t: int) -> None:
        s, P, spec = r.rank, self.P, self.spec
        if s > 0 and (A.RECV_F, g, t, s - 1) not in r.received:
            raise ScheduleError(
                f"rank {s}: {a} needs the activation of {_g(g, t)} from stage {s - 1}, which has not been "
                f"received (no {Action(s, A.RECV_F, g, t)} before it)"
            )
        if t == 0 or s not in self.readers:
            return
        if spec.topology == "per_layer" or s == P - 1:
            if (A.F, g, t - 1) not in r.done:
                raise ScheduleError(
                    f"rank {s}: {a} needs memory of {_g(g, t - 1)} on stage {s}, which F({s},g{g},t{t - 1}) "
                    "has not produced"
                )
        elif (A.RECV_M, g, t - 1, P - 1) not in r.received:
            raise ScheduleError(
                f"rank {s}: {a} needs memory of {_g(g, t - 1)} on stage {s}, which has not been received from "
                f"stage {P - 1} (no {Action(s, A.RECV_M, g, t - 1, P - 1)} before it; F({P - 1},g{g},t{t - 1}) "
                "writes it)"
            )

    def _check_backward(self, r: _RankState, a: Action, g: int, t: int) -> None:
        s, P, spec = r.rank, self.P, self.spec
        if (A.F, g, t) not in r.done:
            raise ScheduleError(f"rank {s}: {a} needs F({s},g{g},t{t}), which has not run on stage {s}")
        if s < P - 1 and (A.RECV_B, g, t, s + 1) not in r.received:
            raise ScheduleError(
                f"rank {s}: {a} needs the activation gradient of {_g(g, t)} from stage {s + 1}, which has not "
                f"been received (no {Action(s, A.RECV_B, g, t)} before it)"
            )
        if not spec.grad_from_next(t):
            return
        if spec.topology == "per_layer":
            if (A.B, g, t + 1) not in r.done:
                raise ScheduleError(
                    f"rank {s}: {a} needs the memory gradient of {_g(g, t + 1)} on stage {s}, which "
                    f"B({s},g{g},t{t + 1}) has not produced (a BPTT window runs backward from its last segment)"
                )
            return
        if s != P - 1:
            return
        for src in spec.readers():
            if src == s:
                if (A.B, g, t + 1) not in r.done:
                    raise ScheduleError(
                        f"rank {s}: {a} needs the memory gradient of {_g(g, t + 1)} on stage {s}, which "
                        f"B({s},g{g},t{t + 1}) has not produced (a BPTT window runs backward from its last segment)"
                    )
            elif (A.RECV_MG, g, t + 1, src) not in r.received:
                raise ScheduleError(
                    f"rank {s}: {a} needs the memory gradient of {_g(g, t + 1)} from stage {src}, which has not "
                    f"been received (no {Action(s, A.RECV_MG, g, t + 1, src)} before it; B({src},g{g},t{t + 1}) "
                    "produces it)"
                )

    def _send(self, r: _RankState, a: Action) -> None:
        s, spec = r.rank, self.spec
        self._check_range(r, a)
        g, t = a.key
        dst = a.peer_stage()
        err = _edge_error(spec, a.type, s, dst, t)
        if err:
            raise ScheduleError(f"rank {s}: {a} sends to stage {dst}, {err}")
        need, what = _PRODUCER[a.type], _what(a)[4:]
        if (need, g, t) not in r.done:
            producer = f"{need.value}({s},g{g},t{t})"
            raise ScheduleError(
                f"rank {s}: {a} sends the {what} of {_g(g, t)}, which {producer} has not produced"
            )
        key = (MATCHING_RECV[a.type], g, t, s, dst)
        if key in self.in_flight:
            raise ScheduleError(f"rank {s}: {a} sends the {what} of {_g(g, t)} to stage {dst} a second time")
        self.in_flight[key] = r.clock + self.costs.transfer_s(self.costs.msg_bytes(a))
        if a.type is A.SEND_M:
            self._use_state(r, g, t)
            self._account_state(r)

    def _recv(self, r: _RankState, a: Action) -> bool:
        self._check_range(r, a)
        g, t = a.key
        src = a.peer_stage()
        err = _edge_error(self.spec, a.type, src, r.rank, t)
        if err:
            raise ScheduleError(f"rank {r.rank}: {a} receives from stage {src}, {err}")
        key = (a.type, g, t, src, r.rank)
        if key not in self.in_flight:
            return False
        if (a.type, g, t, src) in r.received:
            raise ScheduleError(f"rank {r.rank}: {a} receives (g{g}, t{t}) from stage {src} a second time")
        r.clock = max(r.clock, self.in_flight.pop(key))
        r.received.add((a.type, g, t, src))
        if a.type is A.RECV_M:
            self._add_state(r, g, t)
        return True

    def _try_step(self) -> bool:
        if not all(self._next(r) is not None and self._next(r).type is A.STEP for r in self.ranks):
            return False
        spec = self.spec
        for r in self.ranks:
            for g in range(spec.num_groups):
                for t in range(spec.num_segments):
                    for kind in (A.F, A.B):
                        if (kind, g, t) not in r.done:
                            raise ScheduleError(
                                f"rank {r.rank}: STEP before {kind.value}({r.rank},g{g},t{t}) has run (every "
                                "segment's forward and backward belong to the step)"
                            )
            if r.rank in spec.memory_route():
                for g in range(spec.num_groups):
                    if (A.RECV_M, g, spec.num_segments - 1, self.P - 1) not in r.received:
                        raise ScheduleError(
                            f"rank {r.rank}: STEP before the memory of {_g(g, spec.num_segments - 1)} was received "
                            f"from stage {self.P - 1}: the next step's first segment needs it"
                        )
        end = max(r.clock for r in self.ranks) + self.costs.optimizer_s
        for r in self.ranks:
            r.report.busy_s += self.costs.optimizer_s
            r.clock = end
            r.pc += 1
        return True

    def _stuck(self) -> None:
        waits, who = [], []
        for r in self.ranks:
            a = self._next(r)
            who.append(str(r.rank))
            if a.type is A.STEP:
                waits.append(f"rank {r.rank} at {a} (the optimizer step's barrier)")
                continue
            src = a.peer_stage()
            g, t = a.key
            send = next(
                (
                    x
                    for x in self.schedule[src][self.ranks[src].pc :]
                    if x.type in SENDS
                    and MATCHING_RECV[x.type] is a.type
                    and x.key == (g, t)
                    and x.peer_stage() == r.rank
                ),
                None,
            )
            if send is None:
                raise ScheduleError(
                    f"rank {r.rank} waits at {a} for {_what(a)} of {_g(g, t)} from stage {src}, which never sends it"
                )
            waits.append(f"rank {r.rank} at {a} (from stage {src}, which sends it later, at {send})")
        names = f"ranks {', '.join(who[:-1])} and {who[-1]}" if len(who) > 1 else f"rank {who[0]}"
        raise ScheduleError(f"deadlock: {names} wait: " + "; ".join(waits))

    def _final_checks(self) -> None:
        # A backstop: every transfer the problem has feeds a computation (or STEP) that checks its receive, so a
        # send left in flight means the checks above missed something.
        if self.in_flight:
            (kind, g, t, src, dst), _ = min(self.in_flight.items())
            send = next(k for k, v in MATCHING_RECV.items() if v is kind)
            raise ScheduleError(
                f"rank {src} sent {_what_type(kind)} of {_g(g, t)} to stage {dst} ({send.value}), which never "
                "receives it"
            )
        spec = self.spec
        for s in range(self.P):
            for g in range(spec.num_groups):
                for t in range(spec.num_segments):
                    for kind in (A.F, A.B):
                        if (kind, s, g, t) not in self.ran:
                            raise ScheduleError(f"{kind.value}({s},g{g},t{t}) never runs")
        self.makespan = max((r.clock for r in self.ranks), default=0.0)

    def result(self) -> SimResult:
        reports = [r.report for r in self.ranks]
        m = self.makespan
        for rep in reports:
            rep.bubble = 1.0 - rep.busy_s / m if m > 0 else 0.0
        total = sum(rep.busy_s for rep in reports)
        bubble = 1.0 - total / (m * len(reports)) if m > 0 else 0.0
        return SimResult(makespan_s=m, bubble=bubble, ranks=reports)


def _what_type(kind: ActionType) -> str:
    return {
        A.RECV_F: "the activation",
        A.RECV_B: "the activation gradient",
        A.RECV_M: "the memory",
        A.RECV_MG: "the memory gradient",
    }[kind]


def _what(a: Action) -> str:
    return _what_type(a.type if a.type in RECVS else MATCHING_RECV[a.type])


_PRODUCER = {A.SEND_F: A.F, A.SEND_B: A.B, A.SEND_M: A.F, A.SEND_MG: A.B}
"""The computation on the sending stage that produces what each send carries (of the same group and segment)."""


def _edge_error(spec: ScheduleSpec, kind: ActionType, src: int, dst: int, t: int) -> str | None:
    """Why the problem has no transfer of `kind` from stage src to dst for segment t, or None if it has one."""
    P = spec.num_stages
    kind = MATCHING_RECV.get(kind, kind)
    if kind is A.RECV_F:
        ok = 0 <= src < P - 1 and dst == src + 1
    elif kind is A.RECV_B:
        ok = 0 < src < P and dst == src - 1
    elif kind is A.RECV_M:
        ok = src == P - 1 and dst in spec.memory_route()
    else:
        ok = (
            spec.bptt and dst == P - 1 and src in spec.memory_route() and t > 0 and spec.grad_from_next(t - 1)
        )
    if ok:
        return None
    return f"but the problem ({spec.topology} topology, memory_grad={spec.memory_grad}) has no such {_what_type(kind)[4:]} edge"


__all__ = ["CostModel", "RankReport", "ScheduleError", "SimResult", "simulate"]
