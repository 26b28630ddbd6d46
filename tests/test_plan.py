"""The planner (memscale/parallel/plan.py, `memscale plan`): memory model against hand-computed numbers, ZeRO
factors, only valid layouts searched, 7B / 70B on 8 GPUs, the CLI without a data directory, and the pipeline
bubble it reports equal to the simulator's."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from memscale.cli import main
from memscale.config import config_from_dict, load_config
from memscale.parallel.pipeline.schedule import ScheduleSpec, generate
from memscale.parallel.pipeline.simulate import CostModel, simulate
from memscale.parallel.plan import (
    DEVICES,
    Cluster,
    Layout,
    ModelShape,
    _pipeline_fast,
    _Unit,
    candidate_layouts,
    estimate,
    schedule_spec,
    search,
)

# A 16-bit device with no flash attention and free links, so that the paper's formula applies as printed.
PLAIN16 = replace(
    DEVICES["h100"], flash_attention=False, overhead_bytes=0, intra_Bps=math.inf, intra_latency_s=0.0
)


def _shape(*overrides: str) -> ModelShape:
    base = [
        "model.vocab_size=512",
        "model.d_model=64",
        "model.num_layers=4",
        "model.num_heads=4",
        "model.dropout=0.1",
        "data.segment_len=32",
        "data.num_streams=2",
        "train.bptt_segments=1",
    ]
    return ModelShape.from_config(config_from_dict({}, [*base, *overrides]))


def _cluster(n: int = 1, device=PLAIN16, **kw) -> Cluster:
    return Cluster.make("h100", num_gpus=n, device=device, **kw)


def test_memory_matches_hand_computed_numbers():
    """kind none, one segment of b = 2 streams in flight, 16-bit, dropout on, no flash attention: per layer
    s b h (34 + 5 a s / h) bytes (Korthikanti et al. 2022, eq. 1), and with tp = 2 s b h (10 + 24 / t + 5 a s /
    (h t)); weights, gradients and Adam 2 + 2 + 12 bytes per parameter of the rank."""
    shape = _shape()
    s, b, h, a, L = 32, 2, 64, 4, 4
    one = estimate(shape, Layout(1, 1, 1, 1, 1, 0, "none"), _cluster(), global_streams=2)
    assert one.memory.activations == pytest.approx(L * s * b * h * (34 + 5 * a * s / h))
    params = shape.num_params
    assert (one.memory.weights, one.memory.grads, one.memory.optimizer) == pytest.approx(
        (2 * params, 2 * params, 12 * params)
    )
    assert one.memory.state == 0 and one.memory.overhead == 0
    t = 2
    two = estimate(shape, Layout(t, 1, 1, 1, 1, 0, "none"), _cluster(2), global_streams=2)
    assert two.memory.activations == pytest.approx(L * s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
    assert two.memory.weights == pytest.approx(2 * params / t)
    # Full checkpointing keeps each layer's 16-bit input and, while one layer's backward runs, its activations.
    full = estimate(shape, Layout(1, 1, 1, 1, 1, 0, "full"), _cluster(), global_streams=2)
    assert full.memory.activations == pytest.approx(L * 2 * s * b * h + s * b * h * (34 + 5 * a * s / h))


def test_memory_tokens_enter_the_activations_as_extra_positions():
    """rmt runs 2 K memory tokens through every block: s = T + 2 K in the formula, keys included."""
    K = 8
    shape = _shape("model.memory.kind=rmt", f"model.memory.num_tokens={K}", "model.dropout=0.0")
    assert shape.block_tokens == 32 + 2 * K
    s, b, h, a, L = 32 + 2 * K, 2, 64, 4, 4
    e = estimate(shape, Layout(1, 1, 1, 1, 1, 0, "none"), _cluster(), global_streams=2)
    # Without dropout there are no masks (2 s b h) and no dropped copy of the probabilities (3 a s^2 b).
    assert e.memory.activations == pytest.approx(L * (s * b * h * 32 + 2 * a * s * s * b))
    assert e.memory.state > 0  # the K x D memory of each stream, live across the step


@pytest.mark.parametrize(
    "stage, parts", [(1, ("optimizer",)), (2, ("optimizer", "grads")), (3, ("optimizer", "grads", "weights"))]
)
def test_zero_stages_divide_their_parts_by_dp(stage, parts):
    shape = _shape()
    dp = 4
    c = _cluster(dp)
    base = estimate(shape, Layout(1, 1, dp, 1, 1, 0, "none"), c, global_streams=8).memory
    z = estimate(shape, Layout(1, 1, dp, 1, 1, stage, "none"), c, global_streams=8).memory
    for name in ("weights", "grads", "optimizer"):
        factor = dp if name in parts else 1
        extra = 0.0
        # ZeRO-3 also holds the gathered bf16 weights of the running and the prefetched layer.
        if name == "weights" and stage == 3:
            stages = shape.stages(1)
            extra = 2 * 2 * stages[0].block_params / stages[0].num_layers
        assert getattr(z, name) == pytest.approx(getattr(base, name) / factor + extra), name
    assert z.activations == base.activations


def test_search_lists_only_valid_layouts():
    """6 heads and a vocabulary of 4096: tp = 4 and 8 (heads), 3 and 6 (vocabulary) never appear; pp divides the
    layers; ZeRO-2/3 never with pp > 1; G >= pp for the global-topology rmt."""
    shape = _shape(
        "model.num_heads=6",
        "model.d_model=96",
        "model.vocab_size=4096",
        "model.memory.kind=rmt",
        "train.memory_grad=truncated",
        "train.bptt_segments=2",
    )
    cluster = _cluster(24, gpus_per_node=8)
    cands = candidate_layouts(shape, cluster, global_streams=48, segments=(2,))
    assert cands
    for lay in cands:
        assert lay.tp in (1, 2) and 4 % lay.pp == 0 and lay.tp * lay.pp * lay.dp == 24, lay
        assert not (lay.pp > 1 and lay.zero_stage >= 2), lay
        assert lay.groups >= lay.pp and 48 // lay.dp % lay.groups == 0, lay
    assert {lay.tp for lay in cands} == {1, 2} and {lay.pp for lay in cands} == {1, 2, 4}
    found = search(shape, cluster, global_streams=48, top=3)
    assert found.best and all(e.layout in cands and e.fits for e in found.best)
    assert [e.tokens_per_s for e in found.best] == sorted((e.tokens_per_s for e in found.best), reverse=True)


def test_7b_on_8_h100_fits_and_70b_reports_the_memory_it_needs(capsys):
    cfg = load_config("configs/plan-7b.yaml")
    shape = ModelShape.from_config(cfg)
    assert 6e9 < shape.num_params < 8e9
    found = search(shape, Cluster.make("h100", num_gpus=8), global_streams=64, top=3)
    best = found.best[0]
    assert best.fits and best.memory.total <= 80e9 and best.layout.tp * best.layout.pp * best.layout.dp == 8

    assert main(["plan", "configs/plan-70b.yaml", "--gpus", "8", "--gpu", "h100"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("memscale: error: no layout of 8 x H100-SXM (80 GB each) fits")
        and len(err.splitlines()) == 1
    )
    needed = float(err.split("the smallest needs ")[1].split(" GB")[0])
    # 16 bytes per parameter over 8 GPUs is already 129 GB before any activation.
    assert needed > 16 * 64.7e9 / 8 / 1e9


def test_cli_prints_the_quickstart_layout_without_a_data_dir(capsys, tmp_path):
    out = tmp_path / "plan.json"
    rc = main(
        ["plan", "configs/quickstart.yaml", "--set", f"data.dir={tmp_path / 'absent'}", "--json", str(out)]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    for what in ("tp=1 pp=1 dp=1", "step time", "tokens/s", "bubble", "memory per rank", "assumptions:"):
        assert what in text
    assert out.exists() and '"step_s"' in out.read_text()


def test_plan_configs_pass_validation():
    sizes = [load_config(f"configs/plan-{name}.yaml").model.d_model for name in ("1b", "7b", "70b")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3  # three distinct shapes, growing


def test_bad_flags_are_one_line(capsys):
    assert main(["plan", "configs/quickstart.yaml", "--gpus", "8", "--interconnect", "ib-9000"]) == 2
    assert "--interconnect ib-9000 is not known" in capsys.readouterr().err
    assert main(["plan", "configs/quickstart.yaml", "--gpus", "8", "--gpu", "tpu"]) == 2
    assert "--gpu tpu is not known" in capsys.readouterr().err


def test_bubble_equals_the_simulators():
    """pp = 2, G = 2 groups of rmt with BPTT over k = 2: the bubble and makespan the planner reports are those
    of memscale's generator + simulator run on the planner's per-stage costs."""
    shape = _shape("model.memory.kind=rmt", "train.memory_grad=truncated", "train.bptt_segments=2")
    lay = Layout(1, 2, 1, 2, 2, 0, "none")
    e = estimate(shape, lay, _cluster(2), global_streams=4)
    spec = schedule_spec(shape, lay)
    F, B = e.stage_forward_s, e.stage_backward_s
    costs = CostModel(F, B, [1, 1], [1, 1], optimizer_s=e.parts["optimizer"])
    r = simulate(generate(spec, forward=F, backward=B), spec, costs)
    assert e.pipeline == "exact simulation"
    assert e.bubble == pytest.approx(r.bubble, rel=1e-12) and 0 < e.bubble < 1
    assert e.step_s == pytest.approx(r.makespan_s + e.parts["dp_exposed"], rel=1e-12)


@pytest.mark.parametrize("memory_grad", ["truncated", "replay"])
def test_scaled_simulation_of_a_long_pipeline_is_close_to_the_full_one(memory_grad):
    """Beyond the search's limit a 16-stage rmt pipeline is estimated from an 8-stage one with the same groups per
    stage: makespan within 5% of the full simulation (where 1F1B's formula is off by 20%)."""
    P, G, k = 16, 32, 2
    spec = ScheduleSpec(
        num_stages=P,
        num_groups=G,
        num_segments=k,
        bptt_segments=k,
        memory_grad=memory_grad,
        topology="global",
    )
    u = _Unit(
        forward_s=[1.0] * P, backward_s=[2.0] * P, recompute_s=[1.0] * P, compute_s=0.0, tp_s=0.0,
        activation_bytes=[1.0] * P, transient_bytes=[0.0] * P, gathered_bytes=[0.0] * P, input_bytes=[1.0] * P,
        state_bytes=[1.0] * P, act_msg_bytes=0.0, mem_msg_bytes=0.0, p2p_Bps=math.inf, p2p_latency_s=0.05,
        dp_s=[0.0] * P, optimizer_s=0.0, model_flops_per_token=0.0,
    )  # fmt: skip
    fast = _pipeline_fast(spec, u)
    assert fast.how == "scaled from pp=8, G=16"
    full = simulate(
        generate(spec, forward=1.0, backward=2.0, p2p=0.05), spec, CostModel.uniform(P, p2p_latency_s=0.05)
    )
    assert fast.makespan_s == pytest.approx(full.makespan_s, rel=0.05)
    one_f_one_b = (P - 1) / (G * k + P - 1)
    assert abs(fast.bubble - full.bubble) < 0.5 * abs(one_f_one_b - full.bubble)
