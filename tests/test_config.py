"""Config loading: types, unknown keys, inconsistent values, dotted overrides; one clear line each."""

import pytest

from memscale.config import ConfigError, config_from_dict, load_config


def test_overrides_apply_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  d_model: 64\n  num_heads: 4\ntrain:\n  max_steps: 5\n")
    cfg = load_config(
        path, ["train.max_steps=20", "model.memory.kind=rmt", "train.lr=3e-4", "train.overwrite=true"]
    )
    assert cfg.model.d_model == 64 and cfg.train.max_steps == 20 and cfg.model.memory.kind == "rmt"
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.overwrite is True


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.max_stepz=3"], "unknown config key 'train.max_stepz'"),
        (["model.memory.kind=rmtt"], "model.memory.kind='rmtt' is not one of"),
        (["train.max_steps=abc"], "train.max_steps='abc' must be an integer"),
        (["train.max_steps=2.5"], "train.max_steps=2.5 must be an integer"),
        (["data.segment_len=0"], "data.segment_len=0 must be > 0"),
        (["data.segment_len=-4"], "data.segment_len=-4 must be > 0"),
        (["model.num_heads=3"], "model.num_heads=3 must divide model.d_model=512"),
        (
            ["model.memory.kind=memformer", "model.memory.num_tokens=0"],
            "model.memory.num_tokens=0 must be > 0",
        ),
        (["model.memory.kind=infinity", "model.memory.num_basis=0"], "model.memory.num_basis=0 must be > 0"),
        (["parallel.tp=3"], "parallel.tp=3 must divide model.num_heads=8"),
        (["train.dtype=bfloat16"], "bfloat16 on train.device=cpu"),
        (["train"], "must look like key.path=value"),
        (["train.max_steps.x=1"], "train.max_steps={'x': 1} must be an integer"),
        (["parallel.pp=2", "parallel.stream_groups=-1"], "parallel.stream_groups=-1 must be >= 1, or 0"),
        (
            ["parallel.pp=2", "data.num_streams=3", "model.memory.kind=xl", "parallel.stream_groups=2"],
            "data.num_streams=3 is not divisible by parallel.stream_groups=2",
        ),
        (
            ["parallel.pp=4", "model.memory.kind=memformer", "parallel.stream_groups=2"],
            "parallel.stream_groups=2 < parallel.pp=4 with model.memory.kind=memformer",
        ),
        (["model.memory.kind=rmt", "train.bptt_depth=-1"], "train.bptt_depth=-1 must be >= 0"),
        (
            ["model.memory.kind=rmt", "train.memory_grad=detached", "train.bptt_depth=2"],
            "train.bptt_depth=2 with train.memory_grad=detached",
        ),
        (
            ["model.memory.kind=rmt", "model.num_layers=2", "parallel.pp=2", "train.bptt_depth=2"],
            "train.bptt_depth=2 runs on one process or under data parallelism only",
        ),
        (["model.memory.kind=rmt", "train.bptt_depth=two"], "train.bptt_depth='two' has the wrong type"),
    ],
)
def test_bad_values_fail_with_one_line(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        config_from_dict({}, overrides)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg


@pytest.mark.parametrize(
    "kind, asked, runs",
    [
        ("rmt", "auto", "truncated"),
        ("memformer", "auto", "replay"),
        ("xl", "auto", "detached"),
        ("rmt", "replay", "replay"),
        # A memory that carries no gradient: BPTT would give the same gradients, so the kind is one switch.
        ("none", "truncated", "detached"),
        ("lamemo", "replay", "detached"),
    ],
)
def test_memory_grad_follows_the_kind(kind, asked, runs):
    cfg = config_from_dict({}, [f"model.memory.kind={kind}", f"train.memory_grad={asked}"])
    assert cfg.train.memory_grad == runs


@pytest.mark.parametrize(
    "kind, asked, depth, runs",
    [
        ("rmt", "auto", 3, ("truncated", 3)),
        ("memformer", "auto", 0, ("replay", 0)),
        ("armt", "replay", 2, ("replay", 2)),
        ("rmt", "auto", None, ("truncated", None)),
        # As memory_grad: a memory that carries no gradient runs detached, and has no depth.
        ("xl", "auto", 3, ("detached", None)),
        ("infinity", "truncated", 3, ("detached", None)),
    ],
)
def test_bptt_depth_follows_the_kind(kind, asked, depth, runs):
    cfg = config_from_dict(
        {},
        [
            f"model.memory.kind={kind}",
            f"train.memory_grad={asked}",
            f"train.bptt_depth={'null' if depth is None else depth}",
        ],
    )
    assert (cfg.train.memory_grad, cfg.train.bptt_depth) == runs


@pytest.mark.parametrize(
    "kind, pp, groups",
    [("rmt", 2, 2), ("memformer", 4, 4), ("xl", 2, 1), ("none", 4, 1), ("rmt", 1, 0)],
)
def test_stream_groups_default_to_what_the_pipeline_needs(kind, pp, groups):
    """0 resolves at load time (so config.yaml records it): pp for a global memory, 1 for the others; pp=1 leaves
    it alone."""
    cfg = config_from_dict({}, [f"model.memory.kind={kind}", f"parallel.pp={pp}", "data.num_streams=8"])
    assert cfg.parallel.stream_groups == groups


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+ is not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  d_modell: 3\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: unknown config key 'model.d_modell'"):
        load_config(wrong)


def test_shipped_configs_load():
    quick, default = load_config("configs/quickstart.yaml"), load_config("configs/default.yaml")
    assert quick.model.memory.kind == "rmt" and quick.data.dir == "data/prepared/bundled"
    # The default config is the benchmark shape (README throughput table).
    assert (default.model.d_model, default.model.num_layers, default.data.segment_len) == (512, 8, 512)


def test_kernels_backend_key(monkeypatch):
    """train.kernels: auto by default; triton on a CPU device is refused at load time, naming the key and the
    fix, unless Triton's CPU interpreter is on (the kernel tests); a value outside auto | torch | triton fails."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert config_from_dict({}, []).train.kernels == "auto"
    assert config_from_dict({}, ["train.kernels=torch"]).train.kernels == "torch"
    with pytest.raises(
        ConfigError, match="train.kernels=triton needs train.device=cuda .*use train.kernels=auto"
    ):
        config_from_dict({}, ["train.kernels=triton"])
    assert config_from_dict({}, ["train.kernels=triton", "train.device=cuda"]).train.kernels == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert config_from_dict({}, ["train.kernels=triton"]).train.kernels == "triton"
    with pytest.raises(ConfigError, match="train.kernels"):
        config_from_dict({}, ["train.kernels=cuda"])
