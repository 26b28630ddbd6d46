"""Layers per pipeline stage (memscale/parallel/pipeline/balance.py): the exact min-max contiguous split, the cost
model's head on the last stage, explicit parallel.pp_layers, and the config checks."""

from __future__ import annotations

import itertools
import random

import pytest

from memscale.config import ConfigError, config_from_dict
from memscale.parallel.pipeline.balance import balanced_split, layer_costs, stage_layers, stage_ranges

SMALL = ["model.d_model=64", "model.num_heads=2", "data.segment_len=16"]


def _cfg(*extra):
    return config_from_dict({}, [*SMALL, *extra])


def _brute(costs, pp):
    """The smallest largest-stage sum over every contiguous split (the reference for the dynamic programme)."""
    L, best = len(costs), float("inf")
    for cuts in itertools.combinations(range(1, L), pp - 1):
        bounds = (0, *cuts, L)
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


def test_uniform_layers_split_evenly():
    for L, pp in [(8, 2), (8, 4), (12, 3), (6, 6), (64, 8)]:
        assert balanced_split([1.0] * L, pp) == [L // pp] * pp
    # Not divisible: the extra layers go to the earlier stages.
    assert balanced_split([1.0] * 7, 2) == [4, 3]
    assert balanced_split([1.0] * 10, 4) == [3, 3, 2, 2]


def test_split_is_minimax_optimal_and_valid():
    rng = random.Random(0)
    for _ in range(200):
        L = rng.randint(1, 9)
        pp = rng.randint(1, L)
        costs = [rng.uniform(0.1, 3.0) for _ in range(L)]
        counts = balanced_split(costs, pp)
        assert len(counts) == pp and sum(counts) == L and min(counts) >= 1
        worst = max(sum(costs[r.start : r.stop]) for r in stage_ranges(counts))
        assert worst == pytest.approx(_brute(costs, pp), rel=1e-12)


def test_large_vocabulary_moves_layers_off_the_last_stage():
    # d 256, V 4096: the head and loss cost ~1.3 layers, so 4 layers on 2 stages split 3, 1 (README's bench shape).
    cfg = _cfg("model.d_model=256", "model.num_layers=4", "model.num_heads=4", "model.vocab_size=4096")
    costs = layer_costs(cfg.model, segment_len=cfg.data.segment_len)
    assert costs[0] == costs[1] == costs[2] < costs[3]
    head = 6 * 256 * 4096 + 6 * 2 * 256  # the output projection and the final norm, forward + backward
    assert costs[3] - costs[2] == pytest.approx(head)
    assert stage_layers(cfg, 2) == [3, 1]
    # A small vocabulary leaves the even split.
    small = _cfg("model.num_layers=8", "model.vocab_size=64")
    assert stage_layers(small, 2) == [4, 4] and stage_layers(small, 4) == [2, 2, 2, 2]


def test_attention_span_counts():
    # xl attends over mem_len + the segment: a longer memory makes the layers dearer, the head relatively cheaper.
    base = ["model.num_layers=4", "model.vocab_size=2048", "model.memory.kind=xl"]
    short = layer_costs(_cfg(*base, "model.memory.mem_len=16").model, segment_len=16)
    long = layer_costs(_cfg(*base, "model.memory.mem_len=1024").model, segment_len=16)
    assert long[0] > short[0] and long[3] - long[0] == pytest.approx(short[3] - short[0])


def test_explicit_pp_layers_pass_through():
    cfg = _cfg("model.num_layers=6", "parallel.pp=3", "parallel.pp_layers=1,2,3")
    assert stage_layers(cfg) == [1, 2, 3]
    assert stage_ranges([1, 2, 3]) == [range(0, 1), range(1, 3), range(3, 6)]
    # Another pp (the planner's search) ignores the list made for parallel.pp.
    assert sum(stage_layers(cfg, 2)) == 6


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["parallel.pp=2", "parallel.pp_layers=3,2"],
            "parallel.pp_layers='3,2' sums to 5 but model.num_layers=4",
        ),
        (["parallel.pp=2", "parallel.pp_layers=4"], "parallel.pp_layers=4 must be a string"),
        (["parallel.pp=2", "parallel.pp_layers=1,1,2"], "has 3 stages but parallel.pp=2"),
        (["parallel.pp=2", "parallel.pp_layers=4,0"], "every stage needs at least one layer"),
        (["parallel.pp=2", "parallel.pp_layers=a,b"], "must be comma-separated layer counts"),
        (["parallel.pp=5"], "parallel.pp=5 > model.num_layers=4"),
    ],
)
def test_config_errors_are_one_line(extra, message):
    with pytest.raises(ConfigError) as e:
        _cfg("model.num_layers=4", *extra)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_pp_need_not_divide_layers():
    cfg = _cfg("model.num_layers=3", "parallel.pp=2")
    assert sum(stage_layers(cfg)) == 3 and min(stage_layers(cfg)) >= 1


def test_bench_runs_the_balanced_split_and_the_even_one_where_they_differ():
    from memscale.bench.pipeline import CASES, _config, _splits

    kind, P, G, grad, k = CASES[0]
    cfg = _config(kind, grad, k, [])
    assert cfg.model.num_layers == 15  # with the head ~16 layers' work: even over 2 and over 4 stages
    assert _splits(cfg, 2, "both") == [("balanced", "8,7")]  # no even split of 15 layers
    assert _splits(cfg, 4, "both") == [("balanced", "4,4,4,3")]
    twelve = _config(kind, grad, k, ["model.num_layers=12"])
    assert _splits(twelve, 2, "both") == [("balanced", "7,5"), ("even", "6,6")]
    assert _splits(twelve, 2, "even") == [("even", "6,6")]
    assert _splits(twelve, 2, "balanced") == [("balanced", "7,5")]
    one_layer = _config(kind, grad, k, ["model.num_layers=4"])
    assert _splits(one_layer, 4, "both") == [("balanced", "1,1,1,1")]  # one layer each: nothing to compare


def test_bench_counts_the_median_round():
    from memscale.bench.pipeline import _median_by, _pipeline_step

    assert _median_by([3.0, 1.0, 2.0], float) == 2.0
    assert _median_by([4.0, 1.0, 3.0, 2.0], float) == 2.0  # the lower middle of an even count
    assert _pipeline_step([{"step_seconds": 1.0}, {"step_seconds": 1.5}]) == 1.5  # the slowest rank paces


def test_planner_cuts_stages_like_training():
    from memscale.parallel.plan import ModelShape

    cfg = _cfg("model.d_model=256", "model.num_layers=4", "model.num_heads=4", "model.vocab_size=4096")
    shape = ModelShape.from_config(cfg)
    assert [s.num_layers for s in shape.stages(2)] == stage_layers(cfg, 2) == [3, 1]
    assert shape.stages(2)[0].head_params == 0 and shape.stages(2)[1].head_params == 4096 * 256


def test_bench_refuses_pipeline_sizes_it_has_no_case_for(capsys):
    import argparse

    from memscale.bench.pipeline import main

    args = argparse.Namespace(
        overrides=[], pp_layers="both", stages=(8,), segments=1, steps=1, warmup=1, rounds=1, out="x"
    )
    assert main(args) == 2
    assert "--stages 8" in capsys.readouterr().out
