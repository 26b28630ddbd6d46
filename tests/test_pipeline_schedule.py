"""Pipeline schedules over segments: the IR round-trips, every generated schedule passes the simulator, and broken
ones are rejected with the missing dependency named. Pure Python (no torch) except where torch's IR is compared."""

import itertools
import random

import pytest

from memscale.parallel.pipeline.schedule import (
    Action,
    ActionType,
    ScheduleSpec,
    dump_csv,
    format_actions,
    format_order,
    generate,
    load_csv,
    parse_actions,
    spec_for_kind,
    to_torch,
)
from memscale.parallel.pipeline.simulate import CostModel, ScheduleError, simulate

A = ActionType


def _specs():
    for P, G, k, topology, mode in itertools.product(
        [1, 2, 4], range(1, 9), [1, 2, 4], ["per_layer", "global"], ["detached", "truncated", "replay"]
    ):
        if topology == "global" and G < P:
            continue
        readers = ["first", "every"] if topology == "global" else ["first"]
        for r in readers:
            yield ScheduleSpec(
                num_stages=P,
                num_groups=G,
                num_segments=max(4, 2 * k),  # two windows per step where k allows
                bptt_segments=k,
                memory_grad=mode,
                topology=topology,
                memory_readers=r,
            )


def test_every_generated_schedule_passes_the_simulator():
    n = 0
    for spec in _specs():
        schedule = generate(spec)
        r = simulate(schedule, spec, CostModel.uniform(spec.num_stages))
        assert 0.0 <= r.bubble < 1.0, spec
        computes = [a for acts in schedule.values() for a in acts if a.type in (A.F, A.B)]
        assert len(computes) == 2 * spec.num_stages * spec.num_groups * spec.num_segments
        n += 1
    assert n == 576


def test_eight_stages_pass_the_simulator():
    """P = 8 with G in {1, P, 2P} and k in {1, 4}, both topologies and every mode (42 schedules; G < P only per
    layer): dependency-correct and deadlock-free."""
    n = 0
    for G, k, topology, mode in itertools.product(
        [1, 8, 16], [1, 4], ["per_layer", "global"], ["detached", "truncated", "replay"]
    ):
        if topology == "global" and G < 8:
            continue
        for r in ["first", "every"] if topology == "global" else ["first"]:
            spec = ScheduleSpec(
                num_stages=8,
                num_groups=G,
                num_segments=max(4, 2 * k),
                bptt_segments=k,
                memory_grad=mode,
                topology=topology,
                memory_readers=r,
            )
            result = simulate(generate(spec), spec, CostModel.uniform(8))
            assert 0.0 <= result.bubble < 1.0, spec
            n += 1
    assert n == 42


@pytest.mark.parametrize("topology", ["per_layer", "global"])
@pytest.mark.parametrize("mode", ["detached", "truncated", "replay"])
def test_generated_schedules_stay_valid_under_other_costs(topology, mode):
    """The order is derived with uniform costs; the lists must still run (no deadlock) when stages are uneven and
    transfers take time."""
    rng = random.Random(0)
    for P, G in [(2, 2), (4, 4), (4, 6)]:
        spec = ScheduleSpec(
            num_stages=P,
            num_groups=G,
            num_segments=4,
            bptt_segments=2,
            memory_grad=mode,
            topology=topology,
            memory_readers="every",
        )
        costs = CostModel(
            forward_s=[rng.uniform(0.5, 2) for _ in range(P)],
            backward_s=[rng.uniform(1, 4) for _ in range(P)],
            activation_bytes=[10] * P,
            state_bytes=[1] * P,
            activation_msg_bytes=[1000] * P,
            memory_msg_bytes=100,
            p2p_latency_s=0.3,
            p2p_bandwidth_Bps=1e3,
            optimizer_s=0.5,
        )
        r = simulate(generate(spec), spec, costs)
        assert r.makespan_s > 0


# -- the IR -----------------------------------------------------------------------------------------------------------
def test_strings_round_trip_and_extend_torch_notation():
    spec = ScheduleSpec(
        num_stages=2,
        num_groups=2,
        num_segments=4,
        bptt_segments=2,
        memory_grad="truncated",
        topology="global",
        memory_readers="every",
    )
    schedule = generate(spec)
    for actions in schedule.values():
        assert parse_actions(format_actions(actions)) == actions
    assert str(Action(1, A.F, 3, 2)) == "1F3.2"
    assert str(Action(3, A.SEND_M, 1, 2, 0)) == "3SEND_M1.2>0"
    assert Action.parse("3RECV_MG1.2<0") == Action(3, A.RECV_MG, 1, 2, 0)
    assert Action.parse("0SEND_MG1.2>3").type is A.SEND_MG  # not SEND_M followed by garbage
    assert Action.parse("2STEP") == Action(2, A.STEP)
    for bad in ["1F3", "F0.1", "1X0.1", "0SEND_M1.2", "0SEND_M1.2<3", "1F0.1>2"]:
        with pytest.raises(ValueError):
            Action.parse(bad)


def test_csv_round_trip(tmp_path):
    spec = ScheduleSpec(
        num_stages=4, num_groups=4, num_segments=4, bptt_segments=2, memory_grad="replay", topology="global"
    )
    schedule = generate(spec)
    path = tmp_path / "schedule.csv"
    dump_csv(schedule, path)
    assert load_csv(path) == schedule
    assert [p.name for p in tmp_path.iterdir()] == ["schedule.csv"]  # no temporary left behind


def test_csv_errors_name_the_file_and_cell(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("0F0.0,0SEND_F0.0\n1RECV_F0.0,1Q0.0\n")
    with pytest.raises(ValueError, match=r"bad.csv: row 2, cell 2: '1Q0.0' is not an action"):
        load_csv(path)
    path.write_text("0F0.0,1F0.0\n")
    with pytest.raises(ValueError, match=r"row 1, cell 2: 1F0.0 is stage 1's action in rank 0's row"):
        load_csv(path)


def test_torch_reads_the_activation_part():
    from torch.distributed.pipelining.schedules import _Action

    spec = ScheduleSpec(num_stages=2, num_groups=2, num_segments=2, topology="per_layer")
    schedule = generate(spec)
    no_step = {r: [a for a in acts if a.type is not A.STEP] for r, acts in schedule.items()}
    converted = to_torch(no_step, num_groups=2)
    for rank, acts in no_step.items():
        for ours, theirs in zip(acts, converted[rank], strict=True):
            assert _Action.from_str(str(theirs)) == theirs
            assert theirs.microbatch_index == ours.segment * 2 + ours.group
            assert theirs.computation_type.value == ours.type.value
    spec = ScheduleSpec(num_stages=2, num_groups=2, num_segments=2, topology="global")
    with pytest.raises(ValueError, match="torch.distributed.pipelining has no RECV_M action"):
        to_torch(generate(spec), num_groups=2)


def test_format_order_is_a_rank_table():
    spec = ScheduleSpec(num_stages=2, num_groups=2, num_segments=2)
    lines = format_order(generate(spec)).splitlines()
    assert lines[0].split() == ["Rank", "0", "Rank", "1"]
    assert lines[1].split() == ["Step", "00:", "0F0.0", "1RECV_F0.0"]
    assert lines[-1].split() == ["Step", "16:", "0STEP", "1STEP"]


# -- the spec --------------------------------------------------------------------------------------------------------
def test_global_topology_needs_as_many_groups_as_stages():
    with pytest.raises(ValueError, match=r"num_groups=2 < num_stages=4.*at least 4 groups"):
        ScheduleSpec(num_stages=4, num_groups=2, num_segments=4, topology="global")
    ScheduleSpec(num_stages=4, num_groups=2, num_segments=4, topology="per_layer")


def test_spec_errors():
    with pytest.raises(ValueError, match="not a multiple of bptt_segments=4"):
        ScheduleSpec(num_stages=2, num_groups=2, num_segments=6, bptt_segments=4, memory_grad="truncated")
    with pytest.raises(ValueError, match="no memory to backpropagate through"):
        ScheduleSpec(num_stages=2, num_groups=2, num_segments=2, memory_grad="replay", topology="none")
    with pytest.raises(ValueError, match="num_stages=0"):
        ScheduleSpec(num_stages=0, num_groups=2, num_segments=2)


def test_spec_reads_the_topology_each_kind_declares():
    assert spec_for_kind("rmt", num_stages=2, num_groups=2, num_segments=2).readers() == (0,)
    assert spec_for_kind("memformer", num_stages=2, num_groups=2, num_segments=2).readers() == (0, 1)
    for kind in ("xl", "lamemo", "infinity"):
        assert spec_for_kind(kind, num_stages=2, num_groups=1, num_segments=2).topology == "per_layer"
    assert spec_for_kind("none", num_stages=2, num_groups=1, num_segments=2).topology == "none"
    with pytest.raises(ValueError, match="global topology"):
        spec_for_kind("rmt", num_stages=4, num_groups=2, num_segments=2)


# -- predictions ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("P", [2, 4])
@pytest.mark.parametrize("G", [1, 2, 3])
@pytest.mark.parametrize("f,b", [(1.0, 1.0), (1.0, 2.0)])
def test_detached_per_layer_bubble_is_1f1b(P, G, f, b):
    S = 4
    spec = ScheduleSpec(num_stages=P, num_groups=G, num_segments=S)
    r = simulate(generate(spec, forward=f, backward=b), spec, CostModel.uniform(P, forward_s=f, backward_s=b))
    m = G * S
    assert r.bubble == pytest.approx((P - 1) / (m + P - 1), abs=1e-12)
    assert r.makespan_s == pytest.approx((m + P - 1) * (f + b))


@pytest.mark.parametrize("kind", ["rmt", "memformer"])
@pytest.mark.parametrize("mode", ["truncated", "replay"])
@pytest.mark.parametrize("P,G", [(2, 2), (2, 4), (4, 8)])
@pytest.mark.parametrize("k", [2, 4])
def test_global_bptt_bubble_is_1f1b(kind, mode, P, G, k):
    """A global memory under BPTT makes every window one chain through all stages and back; ordered by the
    longest remaining chain, with one more window in flight, the schedule still idles only 1F1B's (P - 1) /
    (m + P - 1) (backward-first ordering idled up to 0.21 here, against 0.045)."""
    S = 8
    spec = spec_for_kind(kind, num_stages=P, num_groups=G, num_segments=S, bptt_segments=k, memory_grad=mode)
    f, b = 1.0, 2.0
    r = simulate(generate(spec, forward=f, backward=b), spec, CostModel.uniform(P, forward_s=f, backward_s=b))
    m = G * S
    assert r.bubble == pytest.approx((P - 1) / (m + P - 1), abs=1e-9)


def test_global_bptt_with_g_equal_p_at_four_stages_is_near_1f1b():
    """With only as many groups as stages at P = 4 the chains leave a little more idle time (simulated 0.09-0.13
    against 1F1B's 0.086); 2P groups reach 1F1B (above)."""
    for k in (2, 4):
        spec = spec_for_kind(
            "rmt", num_stages=4, num_groups=4, num_segments=8, bptt_segments=k, memory_grad="truncated"
        )
        r = simulate(generate(spec), spec, CostModel.uniform(4, forward_s=1.0, backward_s=2.0))
        assert 3 / 35 - 1e-9 <= r.bubble <= 0.13


@pytest.mark.parametrize("topology", ["per_layer", "global"])
def test_detached_activations_are_bounded_as_in_1f1b(topology):
    for P, G in [(2, 2), (4, 4), (4, 8)]:
        spec = ScheduleSpec(num_stages=P, num_groups=G, num_segments=4, topology=topology)
        r = simulate(generate(spec), spec, CostModel.uniform(P, activation_bytes=100))
        assert r.ranks[0].peak_activation_bytes == P * 100  # P micro-batches in flight on stage 0
        for s, rep in enumerate(r.ranks):
            assert rep.peak_activation_bytes <= (P - s) * 100


def test_replay_keeps_less_than_truncated():
    P, G = 4, 4
    costs = CostModel.uniform(P, activation_bytes=1000, stage_input_bytes=[10] * P)
    peaks = {}
    for mode in ("truncated", "replay"):
        spec = ScheduleSpec(
            num_stages=P, num_groups=G, num_segments=8, bptt_segments=4, memory_grad=mode, topology="global"
        )
        r = simulate(generate(spec), spec, costs)
        peaks[mode] = max(rep.peak_activation_bytes for rep in r.ranks)
    assert peaks["truncated"] >= 4 * 1000  # a whole window of k = 4 segments
    assert peaks["replay"] < 2 * 1000  # one recomputed segment plus the kept stage inputs


def test_memory_state_lives_where_the_kind_keeps_it():
    P, G = 4, 4
    rmt = ScheduleSpec(num_stages=P, num_groups=G, num_segments=4, topology="global", memory_readers="first")
    r = simulate(generate(rmt), rmt, CostModel.uniform(P, state_bytes=7))
    assert [rep.peak_state_bytes > 0 for rep in r.ranks] == [True, False, False, True]  # rmt: first and last
    memformer = ScheduleSpec(
        num_stages=P, num_groups=G, num_segments=4, topology="global", memory_readers="every"
    )
    r = simulate(generate(memformer), memformer, CostModel.uniform(P, state_bytes=7))
    assert all(rep.peak_state_bytes >= G * 7 for rep in r.ranks)
    per_layer = ScheduleSpec(num_stages=P, num_groups=G, num_segments=4)
    r = simulate(generate(per_layer), per_layer, CostModel.uniform(P, state_bytes=7))
    assert [rep.peak_state_bytes for rep in r.ranks] == [
        (G + 1) * 7
    ] * P  # a state per group, and one being written


def test_global_topology_fills_the_pipe_with_groups():
    """G >= P interleaved groups keep the pipe as full as independent micro-batches would."""
    P = 4
    glob = ScheduleSpec(num_stages=P, num_groups=P, num_segments=4, topology="global")
    per_layer = ScheduleSpec(num_stages=P, num_groups=P, num_segments=4)
    costs = CostModel.uniform(P)
    assert simulate(generate(glob), glob, costs).bubble == pytest.approx(
        simulate(generate(per_layer), per_layer, costs).bubble
    )


# -- broken schedules ---------------------------------------------------------------------------------------------
def _edit(schedule, rank, fn):
    out = {r: list(acts) for r, acts in schedule.items()}
    out[rank] = fn(out[rank])
    return out


def _without(*strings):
    drop = {Action.parse(s) for s in strings}
    return lambda acts: [a for a in acts if a not in drop]


def _swap(x, y):
    x, y = Action.parse(x), Action.parse(y)

    def fn(acts):
        i, j = acts.index(x), acts.index(y)
        acts[i], acts[j] = acts[j], acts[i]
        return acts

    return fn


def _check(schedule, spec, message):
    with pytest.raises(ScheduleError) as e:
        simulate(schedule, spec, CostModel.uniform(spec.num_stages))
    assert message in str(e.value), str(e.value)


DETACHED = ScheduleSpec(num_stages=2, num_groups=1, num_segments=4)
GLOBAL = ScheduleSpec(num_stages=2, num_groups=2, num_segments=4, topology="global")


def test_a_removed_send_is_named():
    broken = _edit(generate(DETACHED), 0, _without("0SEND_F0.1"))
    _check(
        broken,
        DETACHED,
        "rank 1 waits at 1RECV_F0.1 for the activation of (g0, t1) from stage 0, which never sends it",
    )


def test_swapped_forwards_of_one_group_are_named():
    broken = _edit(generate(DETACHED), 0, _swap("0F0.0", "0F0.1"))
    _check(
        broken,
        DETACHED,
        "rank 0: 0F0.1 needs memory of (g0, t0) on stage 0, which F(0,g0,t0) has not produced",
    )


def test_a_missing_memory_send_is_named():
    broken = _edit(generate(GLOBAL), 1, _without("1SEND_M1.0>0"))
    _check(
        broken,
        GLOBAL,
        "rank 0 waits at 0RECV_M1.0<1 for the memory of (g1, t0) from stage 1, which never sends it",
    )
    # Without the receive either, the forward that reads the memory is the one that fails.
    broken = _edit(broken, 0, _without("0RECV_M1.0<1"))
    _check(
        broken,
        GLOBAL,
        "rank 0: 0F1.1 needs memory of (g1, t0) on stage 0, which has not been received from stage 1",
    )


def test_a_memory_send_to_a_stage_that_does_not_read_it_is_refused():
    spec = ScheduleSpec(num_stages=4, num_groups=4, num_segments=2, topology="global", memory_readers="first")

    def add(acts):
        i = acts.index(Action.parse("3SEND_M0.0>0"))
        return acts[: i + 1] + [Action.parse("3SEND_M0.0>2")] + acts[i + 1 :]

    _check(_edit(generate(spec), 3, add), spec, "rank 3: 3SEND_M0.0>2 sends to stage 2, but the problem")


@pytest.mark.parametrize("topology", ["per_layer", "global"])
def test_backward_of_a_window_out_of_order_is_named(topology):
    spec = ScheduleSpec(
        num_stages=2,
        num_groups=2,
        num_segments=4,
        bptt_segments=2,
        memory_grad="truncated",
        topology=topology,
    )
    schedule = generate(spec)
    if topology == "per_layer":
        broken = _edit(schedule, 1, _swap("1B0.0", "1B0.1"))
        message = "rank 1: 1B0.0 needs the memory gradient of (g0, t1) on stage 1, which B(1,g0,t1) has not produced"
    else:
        broken = _edit(schedule, 1, _without("1RECV_MG0.1<0"))
        message = (
            "rank 1: 1B0.0 needs the memory gradient of (g0, t1) from stage 0, which has not been received"
        )
    _check(broken, spec, message)


def test_no_memory_gradient_across_windows_or_when_detached():
    spec = ScheduleSpec(
        num_stages=2, num_groups=2, num_segments=4, bptt_segments=2, memory_grad="replay", topology="global"
    )
    # Segment 2 starts a window: its backward sends no memory gradient to segment 1.
    assert not any(a.type is A.SEND_MG and a.segment == 2 for a in generate(spec)[0])

    def add_after_b(acts):
        i = acts.index(Action.parse("0B0.2"))
        return acts[: i + 1] + [Action.parse("0SEND_MG0.2>1")] + acts[i + 1 :]

    _check(_edit(generate(spec), 0, add_after_b), spec, "no such memory gradient edge")
    _check(
        _edit(generate(GLOBAL), 0, lambda acts: [Action.parse("0SEND_MG0.1>1")] + acts),
        GLOBAL,
        "memory_grad=detached) has no such memory gradient edge",
    )


def test_a_receive_before_its_send_deadlocks():
    # Rank 0 waits for the gradient of (g0, t0) before sending that segment's activation.
    broken = _edit(generate(DETACHED), 0, _swap("0SEND_F0.0", "0RECV_B0.0"))
    _check(
        broken,
        DETACHED,
        "deadlock: ranks 0 and 1 wait: rank 0 at 0RECV_B0.0 (from stage 1, which sends it later, at 1SEND_B0.0); rank 1 at 1RECV_F0.0 (from stage 0, which sends it later, at 0SEND_F0.0)",
    )


def test_missing_and_repeated_computations_are_named():
    schedule = generate(DETACHED)
    broken = _edit(schedule, 0, _without("0RECV_B0.3", "0B0.3"))
    broken = _edit(broken, 1, _without("1B0.3", "1SEND_B0.3"))
    _check(broken, DETACHED, "rank 0: STEP before B(0,g0,t3) has run")

    def twice(acts):
        i = acts.index(Action.parse("1B0.0"))
        return acts[: i + 1] + [acts[i]] + acts[i + 1 :]

    _check(_edit(schedule, 1, twice), DETACHED, "rank 1: 1B0.0 runs twice")
    _check(
        _edit(schedule, 1, lambda acts: acts[:-1]), DETACHED, "rank 1: the list must end with its one STEP"
    )


def test_the_next_steps_memory_must_arrive_before_step():
    broken = _edit(generate(GLOBAL), 0, _without("0RECV_M1.3<1"))
    _check(broken, GLOBAL, "rank 0: STEP before the memory of (g1, t3) was received from stage 1")


def test_the_documented_examples_hold():
    import doctest

    import memscale.parallel.pipeline as pkg
    import memscale.parallel.pipeline.schedule as schedule_mod
    import memscale.parallel.pipeline.simulate as simulate_mod

    for mod in (pkg, simulate_mod):
        failed, attempted = doctest.testmod(mod)
        assert attempted > 0 and failed == 0, mod.__name__
    # schedule.py shows the head of a printed table.
    doc = schedule_mod.__doc__
    shown = doc[doc.index("Rank 0") :].splitlines()
    printed = format_order(generate(ScheduleSpec(num_stages=2, num_groups=2, num_segments=2))).splitlines()
    for line in shown[1:]:
        if line.strip() == "...":
            break
        assert line.split() in [p.split() for p in printed], line


def test_timeline_shows_idle_time():
    spec = ScheduleSpec(num_stages=2, num_groups=1, num_segments=1)
    text = simulate(generate(spec), spec, CostModel.uniform(2)).format_timeline()
    assert text.splitlines() == [
        "time  Rank 0 Rank 1",
        "   0  0F0.0  .",
        "   1  .      1F0.0",
        "   2  .      1B0.0",
        "   4  0B0.0  .",
    ]


def test_transfer_and_optimizer_times_add_up():
    # One segment through two stages: F0, activation transfer, F1, B1, gradient transfer, B0, then the optimizer.
    spec = ScheduleSpec(num_stages=2, num_groups=1, num_segments=1)
    costs = CostModel.uniform(
        2,
        forward_s=1.0,
        backward_s=2.0,
        activation_msg_bytes=[100, 0],
        p2p_latency_s=0.25,
        p2p_bandwidth_Bps=400.0,
        optimizer_s=0.5,
    )
    r = simulate(generate(spec), spec, costs)
    transfer = 0.25 + 100 / 400.0
    assert r.makespan_s == pytest.approx(1 + transfer + 1 + 2 + transfer + 2 + 0.5)
    assert r.ranks[0].busy_s == pytest.approx(1 + 2 + 0.5)
