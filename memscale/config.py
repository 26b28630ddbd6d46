"""Typed configuration: dataclasses loaded from YAML, with dotted overrides from the command line.

    cfg = load_config("configs/tiny.yaml", ["train.max_steps=20", "model.memory.kind=rmt"])

Every field is declared once, with its type and a docstring-style comment; the loader checks that each YAML key
exists and each value has the declared type, then `Config.validate()` checks the values against each other. Any
failure raises `ConfigError` with one line that names the key and the fix. This module imports no torch, so
`memscale --help` and config validation stay fast.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

import yaml

MemoryKindName = Literal["none", "rmt", "xl", "memformer", "lamemo", "infinity", "armt"]
MemoryGrad = Literal["auto", "detached", "truncated", "replay"]
DataSource = Literal["corpus", "copy", "reverse", "assoc", "recall"]

# Kinds whose memory carries gradient from one segment to the next (rmt and memformer: global topology, DESIGN.md
# §2; armt: per layer). The other per-layer kinds (xl, lamemo, infinity) detach their memory by construction, as
# in their papers.
GRAD_CARRYING_KINDS = ("rmt", "memformer", "armt")
GLOBAL_MEMORY_KINDS = ("rmt", "memformer")
"""Kinds whose memory is one global state written by the last layer (topology "global", memscale/models/memory/)."""
# How each kind is trained in its paper, what `train.memory_grad=auto` (the default) picks: BPTT over the window for
# RMT, memory replay back-propagation for Memformer (the same gradients in less memory), detached otherwise.
OWN_MEMORY_GRAD = {"memformer": "replay"}


def own_memory_grad(kind: str) -> str:
    """The `train.memory_grad` that `auto` means for memory kind `kind`."""
    return OWN_MEMORY_GRAD.get(kind, "truncated" if kind in GRAD_CARRYING_KINDS else "detached")


class ConfigError(ValueError):
    """A user error in a config file or override; the message is one line naming the key and the fix."""


@dataclass
class MemoryConfig:
    kind: MemoryKindName = "none"
    """Memory mechanism: none (control), rmt, xl, memformer, lamemo, infinity, armt."""
    num_tokens: int = 16
    """rmt / armt: memory tokens K; memformer: memory slots K."""
    mem_len: int = 0
    """xl / lamemo / infinity: cached positions per layer (infinity: its short-term memory, a multiple of
    `data.segment_len`); 0 means `data.segment_len`."""
    clamp_len: int = -1
    """xl / lamemo / infinity: relative distances beyond this are clamped (-1: no clamp), as in Transformer-XL."""
    same_length: bool = False
    """xl / lamemo / infinity: every token attends to exactly mem_len keys (Transformer-XL's --same_length; off by
    default)."""
    write_temperature: float = 0.5
    """memformer: softmax temperature of the slot-attention write (< 1 sharpens, as in the paper)."""
    write_own_value: Literal["raw", "projected"] = "raw"
    """memformer: what a slot contributes to its own write: `raw`, the slot m_i itself (the paper's
    softmax(A / tau) [m_i; V_x]), or `projected`, m_i W_V like the tokens' values (measured worse: README)."""
    write_order: Literal["sequential", "joint", "normalized"] = "normalized"
    """armt: how a segment's K memory tokens write the associative memory: `normalized` (default), all against
    the memory the segment read with each key's share divided by its overlap with the segment's keys, which cannot
    overshoot; `joint`, the same undivided (the official update: it diverged on the quick start's long
    documents); or `sequential`, one after another (the delta rule per token). README "Recall probe"."""
    write_norm: bool = True
    """armt: the write's keys, values and gates read the memory tokens layer-normalised (as every other projection
    of a pre-norm transformer reads its input); false: the raw residual stream (the official code), which carries
    the memory's own read, so that the written values grow with the memory: measured, the memory grew without
    bound on long documents and lost the fact (README "Recall probe")."""
    write_penalty: float = 3e-4
    """armt: adds write_penalty x the mean write gate beta to the training loss per token (0: off), so that the
    memory writes only what a later segment needs and keeps what it holds: measured, the recall probe's curve went
    flat from 16K to 1M tokens where without it the fact faded (README "Recall probe")."""
    num_basis: int = 128
    """infinity: number N of Gaussian radial basis functions of the long-term memory."""
    ridge_lambda: float = 0.5
    """infinity: ridge penalty of the basis fit (official code default)."""
    tau: float = 0.75
    """infinity: fraction of [0, 1] given to the compressed old signal when new states are appended."""
    sticky: bool = True
    """infinity: sample the old signal at positions drawn from the previous attention density (sticky memories)."""
    num_samples: int = 512
    """infinity: how many points of the old signal are resampled when the memory is updated."""
    gate: bool = True
    """infinity: the CNN gate on the vectors entering the long-term memory (official `mask_type='cnn'`)."""
    kl_lambda: float = 1e-6
    """infinity: weight of the KL regulariser KL(N(mu, sigma^2) || N(mu, sigma_0^2)) of the long-term reads, added
    to the training loss (official `kl_m`, 1e-6 in sorting/run_sort_inftyformer.sh); 0 turns it off."""
    sigma_0: float = 0.05
    """infinity: standard deviation of the KL regulariser's reference density (official `sigma_0`)."""


@dataclass
class ModelConfig:
    vocab_size: int = 16000
    """Vocabulary size; must equal the tokenizer's (checked when training starts)."""
    d_model: int = 512
    num_layers: int = 8
    num_heads: int = 8
    d_ff: int = 0
    """MLP hidden width; 0 means 4 x d_model."""
    max_segment_len: int = 0
    """Size of the learned position table; 0 means `data.segment_len`."""
    dropout: float = 0.0
    tie_embeddings: bool = True
    fused_loss: bool = True
    """Training loss by the chunked fused projection + cross-entropy (memscale/kernels/cross_entropy.py), which
    keeps no logits for backward; false uses the plain head and F.cross_entropy (the reference)."""
    attention: Literal["fused", "flex", "reference"] = "fused"
    """xl / lamemo / infinity's short-term memory: relative-position attention by the blockwise kernel
    (memscale/kernels/relative_attention.py), which keeps no score matrix for backward; flex: by FlexAttention
    (memscale/kernels/flex_relative_attention.py), the GPU path (train.device=cuda: on CPU torch compiles it for
    inference only); reference: the papers' formula with materialised scores. Attention dropout (model.dropout > 0
    in training) always takes the reference path: neither kernel has dropout.
    rmt: fused or flex run its read/write mask on CUDA as three attentions with no mask tensor (flash kernels that
    skip the hidden tiles; `memscale.models.memory.rmt.read_write_attention`), and on CPU as one masked SDPA call
    (measured faster there); reference: one masked call everywhere."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)


@dataclass
class DataConfig:
    dir: str = "data/prepared/bundled"
    """Prepared data directory (from `memscale data prepare`): tokenizer.model, train/ and val/ shards."""
    source: DataSource = "corpus"
    """corpus: the token shards in `dir`; copy / reverse / assoc: synthetic memory tasks; recall: the recall probe
    (a fact planted in the text of `dir`, asked for at the end; memscale/data/recall.py)."""
    segment_len: int = 512
    num_streams: int = 4
    """Parallel document streams per rank (the batch size of one segment step)."""
    num_workers: int = 0
    """Loader worker processes reading shards (0: read in the training process)."""
    seed: int = 0
    task_segments: int = 8
    """Synthetic tasks and the recall probe: segments per example (information early, question late)."""
    task_vocab: int = 32
    """Synthetic tasks: number of distinct symbols."""


@dataclass
class TrainConfig:
    max_steps: int = 200
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (> 0)."""
    max_bad_steps: int = 10
    """A step whose loss or gradient norm is NaN or inf is skipped (no optimizer update); this many skipped steps
    in a row stop the run with exit code 3 (diverged), before any checkpoint of the bad state is written."""
    bptt_segments: int = 2
    """Segments per optimizer step (their losses are the step's loss)."""
    memory_grad: MemoryGrad = "auto"
    """detached: no gradient across segments; truncated: BPTT keeping every segment's graph; replay: the same
    gradients by memory replay (recompute, less memory); auto: the memory kind's own (`own_memory_grad`). A kind
    whose memory carries no gradient trains detached whatever is asked: truncated or replay would give the same
    gradients, so switching kinds is one key."""
    bptt_depth: int | None = None
    """Sliding BPTT depth k (truncated / replay): the loss of every segment reaches exactly k segments back through
    the memory, across optimizer steps (memscale/train/bptt.py; LM-RMT's mem_backprop_depth). Unset (the
    default): the window of the step's segments, where segment j of the window reaches j back."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward instead of keeping them: full: every block; selective: each block's
    attention sub-layer (its score and probability tensors grow with T x (M + T)), keeping the MLP's."""
    eval_every: int = 50
    eval_segments: int = 16
    """Segment steps of held-out data per validation (over all streams)."""
    log_every: int = 10
    save_every: int = 0
    """Checkpoint every N optimizer steps (0: only at the end of the run)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    out_dir: str = "runs/default"
    overwrite: bool = False
    """Allow writing into a non-empty out_dir (otherwise the run refuses, so nothing is overwritten)."""
    seed: int = 1234
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "cpu"
    threads: int = 0
    """torch intra-op threads; 0 leaves torch's default."""
    kernels: Literal["auto", "torch", "triton"] = "auto"
    """Backend of the fused kernels (memscale/kernels/): torch (any device), triton (Triton kernels, CUDA only),
    or auto: triton on CUDA when triton imports, torch otherwise."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel degree (megatron-core layers; memscale/parallel/)."""
    pp: int = 1
    """Pipeline-parallel degree: each of pp ranks holds a contiguous slice of the layers (`pp_layers`;
    memscale/parallel/pipeline/); composes with tp and with dp under zero_stage 0 or 1. At most num_layers."""
    pp_layers: str = ""
    """Layers per pipeline stage, first to last, e.g. "3,1": pp counts >= 1 that sum to model.num_layers. Empty
    (the default) balances the stages' compute (memscale/parallel/pipeline/balance.py: the last stage also runs the
    head and the loss over the vocabulary, so it gets fewer layers when the vocabulary is large)."""
    dp: int = 0
    """Data-parallel degree; 0 (the default) means the world size / (tp x pp). The world size is the number of processes that
    torchrun (or `memscale train --nproc N`) starts; tp x pp x dp must equal it."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage over the data-parallel group: 0 (replicated), 1 (optimizer state sharded), 2 (and
    gradients), 3 (and parameters)."""
    stream_groups: int = 0
    """With pp > 1: the rank's data.num_streams streams are split into this many groups that take turns in the
    pipeline (a micro-batch is one segment of one group). 0 chooses: pp for rmt and memformer, whose memory must
    come back from the last stage before a group's next segment enters (fewer than pp groups leave stages idle,
    and the schedule refuses them), 1 for the other kinds (their memory stays on each stage, so consecutive
    segments of one group already fill the pipe). Must divide data.num_streams."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> Config:
        m, d, t, p, mem = self.model, self.data, self.train, self.parallel, self.model.memory
        _check_finite(self, "")
        _positive(d.segment_len, "data.segment_len", "use a positive segment length, e.g. 512")
        _positive(d.num_streams, "data.num_streams", "use at least one stream")
        _positive(m.d_model, "model.d_model", "use a positive width")
        _positive(m.num_layers, "model.num_layers", "use at least one layer")
        _positive(m.num_heads, "model.num_heads", "use at least one head")
        _positive(m.vocab_size, "model.vocab_size", "match the tokenizer's vocabulary")
        _positive(t.max_steps, "train.max_steps", "train for at least one step")
        _positive(t.bptt_segments, "train.bptt_segments", "use at least one segment per step")
        _positive(t.eval_segments, "train.eval_segments", "evaluate on at least one segment")
        _positive(t.log_every, "train.log_every", "log at least every N steps with N >= 1")
        if m.d_model % m.num_heads:
            raise ConfigError(f"model.num_heads={m.num_heads} must divide model.d_model={m.d_model}")
        if m.max_segment_len and m.max_segment_len < d.segment_len:
            raise ConfigError(
                f"model.max_segment_len={m.max_segment_len} is smaller than data.segment_len={d.segment_len}: "
                "raise it or set it to 0"
            )
        if d.num_workers < 0:
            raise ConfigError(f"data.num_workers={d.num_workers} must be >= 0")
        if not 0.0 <= m.dropout < 1.0:
            raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
        if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
            raise ConfigError(f"train.lr={t.lr} / train.min_lr={t.min_lr}: need 0 <= min_lr <= lr and lr > 0")
        if t.save_every < 0 or t.keep_checkpoints < 1:
            raise ConfigError(
                f"train.save_every={t.save_every} / train.keep_checkpoints={t.keep_checkpoints}: "
                "need save_every >= 0 and keep_checkpoints >= 1"
            )
        if t.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be >= 0")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(t, key) < 1.0:
                raise ConfigError(f"train.{key}={getattr(t, key)} must be in [0, 1), e.g. 0.9 / 0.95")
        if t.weight_decay < 0:
            raise ConfigError(f"train.weight_decay={t.weight_decay} must be >= 0 (0 turns it off)")
        if t.grad_clip <= 0:
            raise ConfigError(f"train.grad_clip={t.grad_clip} must be > 0, e.g. 1.0")
        _positive(t.max_bad_steps, "train.max_bad_steps", "stop after N >= 1 skipped steps in a row, e.g. 10")
        if mem.kind in ("rmt", "memformer", "armt"):
            _positive(mem.num_tokens, "model.memory.num_tokens", f"{mem.kind} needs at least one memory slot")
        if mem.kind == "armt" and mem.write_penalty < 0:
            raise ConfigError(
                f"model.memory.write_penalty={mem.write_penalty} must be >= 0 (0 turns the penalty off)"
            )
        if mem.kind == "infinity":
            _positive(mem.num_basis, "model.memory.num_basis", "use N >= 1 basis functions, e.g. 128")
            _positive(mem.num_samples, "model.memory.num_samples", "resample the old signal at >= 1 points")
            if not 0.0 < mem.tau < 1.0:
                raise ConfigError(f"model.memory.tau={mem.tau} must be in (0, 1)")
            if mem.ridge_lambda <= 0:
                raise ConfigError(f"model.memory.ridge_lambda={mem.ridge_lambda} must be > 0")
            if mem.kl_lambda < 0:
                raise ConfigError(
                    f"model.memory.kl_lambda={mem.kl_lambda} must be >= 0 (0 turns the KL term off)"
                )
            if mem.sigma_0 <= 0:
                raise ConfigError(f"model.memory.sigma_0={mem.sigma_0} must be > 0, e.g. 0.05")
            if mem.mem_len % d.segment_len:
                raise ConfigError(
                    f"model.memory.mem_len={mem.mem_len} must be a multiple of data.segment_len={d.segment_len} "
                    f"for infinity (or 0 for one segment): the block leaving its short-term memory is one segment"
                )
        if mem.kind == "memformer" and not 0.0 < mem.write_temperature:
            raise ConfigError(f"model.memory.write_temperature={mem.write_temperature} must be > 0")
        if mem.mem_len < 0:
            raise ConfigError(f"model.memory.mem_len={mem.mem_len} must be >= 0 (0 means data.segment_len)")
        if t.bptt_depth is not None and t.bptt_depth < 0:
            raise ConfigError(
                f"train.bptt_depth={t.bptt_depth} must be >= 0 (segments the gradient reaches back), or unset "
                "for the window of train.bptt_segments"
            )
        if t.memory_grad == "auto" or mem.kind not in GRAD_CARRYING_KINDS:
            # Resolved once here, so the run directory's config.yaml and every reader see the mode that runs.
            t.memory_grad = own_memory_grad(mem.kind) if t.memory_grad == "auto" else "detached"
        if mem.kind not in GRAD_CARRYING_KINDS:
            # As memory_grad: no gradient crosses this kind's memory, so there is no depth to slide.
            t.bptt_depth = None
        if t.bptt_depth is not None and t.memory_grad == "detached":
            raise ConfigError(
                f"train.bptt_depth={t.bptt_depth} with train.memory_grad=detached: a depth needs gradient through "
                "memory; use train.memory_grad=truncated, replay or auto, or unset train.bptt_depth"
            )
        if t.bptt_depth is not None and (p.pp > 1 or p.tp > 1):
            raise ConfigError(
                f"train.bptt_depth={t.bptt_depth} runs on one process or under data parallelism only, not with "
                f"parallel.pp={p.pp} / parallel.tp={p.tp}: unset train.bptt_depth (the window of the step)"
            )
        if t.dtype == "bfloat16" and t.device == "cpu":
            raise ConfigError(
                "train.dtype=bfloat16 on train.device=cpu is ~100x slower than float32: use float32 on CPU"
            )
        if m.attention == "flex" and not t.device.startswith("cuda"):
            raise ConfigError(
                f"model.attention=flex needs train.device=cuda (got {t.device}): FlexAttention has no backward on "
                "CPU; use model.attention=fused (the blockwise kernel, the same model)"
            )
        if (
            t.kernels == "triton"
            and not t.device.startswith("cuda")
            and os.environ.get("TRITON_INTERPRET") != "1"
        ):
            raise ConfigError(
                f"train.kernels=triton needs train.device=cuda (got {t.device}): the Triton kernels compile for "
                "GPUs; use train.kernels=auto or torch (on CPU they run only under TRITON_INTERPRET=1, in tests)"
            )
        for name in ("tp", "pp"):
            _positive(getattr(p, name), f"parallel.{name}", "use a parallel degree >= 1")
        if p.dp < 0:
            raise ConfigError(f"parallel.dp={p.dp} must be >= 1, or 0 for 'the world size / (tp x pp)'")
        if m.num_heads % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} must divide model.num_heads={m.num_heads}")
        if p.pp > m.num_layers:
            raise ConfigError(
                f"parallel.pp={p.pp} > model.num_layers={m.num_layers}: every stage needs a layer; lower pp"
            )
        parse_pp_layers(p.pp_layers, pp=p.pp, num_layers=m.num_layers)
        if p.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage={p.zero_stage} must be 0, 1, 2 or 3")
        _check_stream_groups(self)
        if (p.dp > 1 or p.tp > 1 or p.pp > 1 or p.zero_stage) and d.source != "corpus":
            raise ConfigError(
                f"data.source={d.source} runs on one process: multi-process training reads a prepared corpus "
                "(data.source=corpus); remove the parallel overrides"
            )
        return self


def _check_stream_groups(cfg: Config) -> None:
    """`parallel.stream_groups` (resolved here when 0, so config.yaml records the groups that run) against the
    pipeline's needs: a global memory needs G >= pp groups, and every group the same number of streams."""
    p, kind, streams = cfg.parallel, cfg.model.memory.kind, cfg.data.num_streams
    if p.stream_groups < 0:
        raise ConfigError(f"parallel.stream_groups={p.stream_groups} must be >= 1, or 0 to choose")
    if p.pp == 1:
        return
    if p.stream_groups == 0:
        p.stream_groups = p.pp if kind in GLOBAL_MEMORY_KINDS else 1
    G = p.stream_groups
    if kind in GLOBAL_MEMORY_KINDS and G < p.pp:
        raise ConfigError(
            f"parallel.stream_groups={G} < parallel.pp={p.pp} with model.memory.kind={kind}: its memory returns "
            f"from the last stage before a group's next segment, so use at least {p.pp} groups (or 0 to choose)"
        )
    if streams % G:
        raise ConfigError(
            f"data.num_streams={streams} is not divisible by parallel.stream_groups={G}: every stream group "
            "needs the same number of streams; change one of them"
        )


def parse_pp_layers(text: str, *, pp: int, num_layers: int) -> list[int] | None:
    """`parallel.pp_layers` as a list of pp layer counts (None when empty: balanced automatically), checked."""
    text = str(text).strip()
    if not text:
        return None
    key = f"parallel.pp_layers={text!r}"
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"{key} must be comma-separated layer counts per stage, e.g. '3,1'") from None
    if len(counts) != pp:
        raise ConfigError(f"{key} has {len(counts)} stages but parallel.pp={pp}: give one count per stage")
    if min(counts) < 1:
        raise ConfigError(f"{key}: every stage needs at least one layer")
    if sum(counts) != num_layers:
        raise ConfigError(
            f"{key} sums to {sum(counts)} but model.num_layers={num_layers}: the counts must add up to it"
        )
    return counts


def _check_finite(node: Any, prefix: str) -> None:
    """Every number in the config is finite: NaN passes every `<` / `>` check, so it is refused first."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, key + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number")


def _positive(value: int, key: str, fix: str) -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value} must be > 0: {fix}")


# --------------------------------------------------------------------------------------------------------------
# Loading: YAML mapping -> dataclasses, with type checks naming the dotted key.


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, arm, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {tp}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    raise TypeError(f"unsupported config field type {tp} at {key}")  # a bug in this file, not user input


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{dotted}': known keys here are {known}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted)
        else:
            kwargs[key] = _check_type(value, tp, dotted)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=3` -> ("a.b", 3); the value is parsed as YAML so numbers, booleans and strings keep their type."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value, e.g. train.max_steps=20")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    tree = dict(data or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return _build(Config, tree, "").validate()


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    data: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(
                f"config file {path} not found: pass a path such as configs/tiny.yaml"
            ) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {path}{where} is not valid YAML: fix the syntax there") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping (model:, data:, train:, parallel:)")
    try:
        return config_from_dict(data, overrides)
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None


# Model fields that change how a step is computed but not which weights exist or what they mean.
RUNTIME_MODEL_FIELDS = ("dropout", "fused_loss")


def model_architecture(model: ModelConfig | dict) -> dict:
    """The model fields a checkpoint's weights depend on; older checkpoints get today's defaults for new fields."""
    if isinstance(model, dict):
        model = _build(ModelConfig, model, "model")
    return {k: v for k, v in dataclasses.asdict(model).items() if k not in RUNTIME_MODEL_FIELDS}


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
