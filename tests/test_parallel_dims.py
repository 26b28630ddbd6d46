"""ParallelDims: validation without any collective."""

from __future__ import annotations

import pytest

from memscale.config import ConfigError, ParallelConfig
from memscale.parallel.dims import ParallelDims


def dims(tp=1, pp=1, dp=1, zero=0, world=None):
    world = tp * pp * dp if world is None else world
    return ParallelDims(tp=tp, pp=pp, dp=dp, zero_stage=zero, world_size=world)


def test_valid_layouts_pass():
    for d in (
        dims(),
        dims(tp=2, dp=2),
        dims(pp=2, dp=2, zero=1),
        dims(tp=2, dp=2, zero=3),
        dims(dp=4, zero=2),
    ):
        assert d.validate(num_heads=8, vocab_size=512, num_layers=4) is d


@pytest.mark.parametrize(
    "d, sizes, needle",
    [
        (dims(tp=2, world=3), {}, "world size 3 != parallel.tp*pp*dp = 2*1*1 = 2"),
        (dims(tp=3), {"num_heads": 8}, "parallel.tp=3 must divide model.num_heads=8"),
        (dims(tp=2), {"num_heads": 8, "vocab_size": 501}, "pad the vocabulary to 502"),
        (dims(pp=3), {"num_layers": 2}, "parallel.pp=3 > model.num_layers=2"),
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
    cfg.parallel = ParallelConfig(tp=2, dp=0)  # set after loading: the vocabulary check is ParallelDims' own
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


# The process groups of tp=2 x dp=2 are checked in tests/test_parallel_zero_tp.py (test_groups_tp2_dp2), by the
# same four processes that train there: starting four more costs ~20 s of imports on two cores.
