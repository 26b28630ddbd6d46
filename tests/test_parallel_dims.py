"""ParallelDims: validation without any collective, and the process groups of a tp=2 x dp=2 layout."""

from __future__ import annotations

import pytest

from memscale.config import ConfigError, ParallelConfig
from memscale.parallel.dims import ParallelDims
from tests.distributed import run_distributed


def dims(tp=1, pp=1, dp=1, zero=0, world=None):
    world = tp * pp * dp if world is None else world
    return ParallelDims(tp=tp, pp=pp, dp=dp, zero_stage=zero, world_size=world)


def test_valid_layouts_pass():
    for d in (dims(), dims(tp=2, dp=2), dims(pp=2, dp=2, zero=1), dims(tp=2, dp=2, zero=3), dims(dp=4, zero=2)):
        assert d.validate(num_heads=8, vocab_size=512, num_layers=4) is d


@pytest.mark.parametrize(
    "d, sizes, needle",
    [
        (dims(tp=2, world=3), {}, "world size 3 != parallel.tp*pp*dp = 2*1*1 = 2"),
        (dims(tp=3), {"num_heads": 8}, "parallel.tp=3 must divide model.num_heads=8"),
        (dims(tp=2), {"num_heads": 8, "vocab_size": 501}, "pad the vocabulary to 502"),
        (dims(pp=3), {"num_layers": 8}, "parallel.pp=3 must divide model.num_layers=8"),
        (dims(pp=2, zero=2), {}, "use zero_stage=1 or pp=1"),
        (dims(pp=2, zero=3), {}, "zero_stage=3 cannot combine with parallel.pp=2"),
        (dims(zero=4), {}, "must be 0, 1, 2 or 3"),
        (dims(tp=0, world=1), {}, "parallel.tp=0 must be >= 1"),
    ],
)
def test_inconsistent_layouts_fail_in_one_line(d, sizes, needle):
    with pytest.raises(ConfigError) as e:
        d.validate(**sizes)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_world_size_mismatch_names_the_fix():
    with pytest.raises(ConfigError, match=r"launch 2 processes, or set parallel.dp=2"):
        ParallelDims.from_config(ParallelConfig(tp=2, dp=1), world_size=4).validate()


def test_for_config_checks_the_model():
    from memscale.config import config_from_dict

    cfg = config_from_dict({}, ["model.num_heads=8", "model.d_model=64", "model.vocab_size=501"])
    cfg.parallel = ParallelConfig(tp=2, dp=0)  # Config.validate still refuses parallel layouts
    with pytest.raises(ConfigError, match="model.vocab_size=501"):
        ParallelDims.for_config(cfg, world_size=4)
    cfg.model.vocab_size = 512
    assert ParallelDims.for_config(cfg, world_size=4) == dims(tp=2, dp=2)


def test_dp_inferred_from_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    d = ParallelDims.from_config(ParallelConfig(tp=2, pp=2, dp=0, zero_stage=1))
    assert (d.tp, d.pp, d.dp, d.zero_stage, d.world_size) == (2, 2, 2, 1, 8)
    with pytest.raises(ConfigError, match="not a multiple of parallel.tp\\*pp=3\\*1"):
        ParallelDims.from_config(ParallelConfig(tp=3, dp=0), world_size=4)
    monkeypatch.delenv("WORLD_SIZE")
    assert ParallelDims.from_config(ParallelConfig()).world_size == 1


def _groups_worker():
    import torch
    import torch.distributed as dist

    from memscale.parallel.dims import destroy_distributed, init_distributed

    d = ParallelDims.from_config(ParallelConfig(tp=2, dp=0)).validate(num_heads=4, vocab_size=64, num_layers=2)
    g = init_distributed(d)
    assert init_distributed(d) is g  # built once
    # A collective on each group sums the global ranks of its members: membership checked by traffic, too.
    sums = {}
    for name in ("tp", "dp", "pp"):
        t = torch.tensor([float(g.rank)])
        dist.all_reduce(t, group=getattr(g, name))
        sums[name] = t.item()
    out = dict(
        rank=g.rank,
        backend=g.backend,
        tp_ranks=g.tp_ranks,
        dp_ranks=g.dp_ranks,
        pp_ranks=g.pp_ranks,
        coords=(g.tp_rank, g.pp_rank, g.dp_rank),
        sums=sums,
    )
    destroy_distributed()
    return out


def test_groups_tp2_dp2_four_processes():
    res = run_distributed(_groups_worker, 4)
    for r, out in enumerate(res):
        assert out["rank"] == r and out["backend"] == "gloo"
        # megatron-core order tp-cp-ep-dp-pp: tp ranks are neighbours.
        assert out["tp_ranks"] == ((0, 1) if r < 2 else (2, 3))
        assert out["dp_ranks"] == ((0, 2) if r % 2 == 0 else (1, 3))
        assert out["pp_ranks"] == (r,)
        assert out["coords"] == (r % 2, 0, r // 2)
        assert out["sums"] == {
            "tp": float(sum(out["tp_ranks"])),
            "dp": float(sum(out["dp_ranks"])),
            "pp": float(r),
        }
