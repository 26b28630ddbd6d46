"""The cost model and the layout search behind `memscale plan`: one optimizer step of a layout, before running it.

    shape = ModelShape.from_config(cfg)                       # sizes read off the model, built on the meta device
    cluster = Cluster.make("h100", num_gpus=8, interconnect="ib-400")
    est = estimate(shape, Layout(tp=8, pp=1, dp=1, groups=1, segments=2, zero_stage=1, recompute="none"),
                   cluster, global_streams=64)
    est.step_s, est.bubble, est.memory.total          # predicted step time, idle fraction, bytes on the fullest rank
    result = search(shape, cluster, global_streams=64)    # the fastest layouts that fit, best first

A layout is (tp, pp, dp, G stream groups, k segments per step, ZeRO stage, activation checkpointing). One pipeline
unit (micro-batch) is one segment of b = B / G streams, B = global_streams / dp streams per data-parallel rank.

Time of one step:
  - compute: forward FLOPs of a unit on a stage (2 x block parameters x tokens inside the blocks, plus attention
    4 x D x attended keys per token; the head 2 x V x D per segment token on the last stage; the model's
    `flops_per_token`, the MFU numerator, is 3x this count without rmt's memory tokens, which time must count),
    divided by tp, at `device.mfu` of the device peak; backward 2x forward; recompute adds the forward (full) or
    the attention sub-layer's forward (selective); memory_grad=replay adds the forward again (the simulator).
  - tensor parallel (Megatron): 2 all-reduces of [b, S, D] per layer in forward, 2 in backward (plus those of the
    recomputed forward), ring cost 2 (tp - 1) / tp x bytes / bandwidth + 2 (tp - 1) x latency, inside a node.
  - pipeline: memscale.parallel.pipeline's generator and simulator with the per-stage F / B times and p2p times of
    the activation messages [b, S, D] and the global memory messages, giving makespan, bubble and what each stage
    keeps in flight (activations and memory-state versions).
  - data parallel: the gradient reduce of the stage's parameters (ZeRO-0/1: one all-reduce per step; ZeRO-2: a
    reduce-scatter per micro-batch backward and an all-gather of the updated weights after the step; ZeRO-3: an
    all-gather in each forward and backward and a reduce-scatter per micro-batch), over the dp ring.
    `device.overlap_dp`: on GPUs the per-step reduce is overlapped with the backward of the stage's last unit and
    the per-micro-batch collectives with that unit's compute (bucketed overlap_comm), so only what exceeds it is
    exposed; on the CPU nothing is overlapped (gloo collectives run on the training thread's cores).
  - the optimizer step: Adam is memory-bound, `ADAM_BYTES_PER_PARAM` bytes moved per parameter it updates.

Memory of a rank (the fullest stage is reported):
  - weights, gradients, optimizer: bf16 weights and gradients, fp32 master weights and two Adam moments on GPUs
    (2 + 2 + 12 bytes per parameter, the ZeRO paper's accounting); fp32 weights, gradients and moments on the CPU
    (4 + 4 + 8). ZeRO-1 divides the optimizer part by dp, ZeRO-2 also the gradients, ZeRO-3 also the weights.
    Parameters are divided by tp (layer norms and biases are small and counted as split too).
  - activations: Korthikanti et al. 2022 (arXiv 2205.05198), per layer and segment, without sequence parallelism:
    s b h (10 + 24 / t + 5 a s / (h t)) bytes in 16-bit, adapted: s is the tokens inside the blocks (segment plus
    rmt's read and write memory tokens), the keys of the score matrix are the attended length (xl / lamemo: mem_len
    + T), dropout masks (1 byte per element) only when model.dropout > 0, the score terms only without flash
    attention (GPU presets assume flash: it keeps the output and a log-sum-exp per row); memformer's and
    infinity's per-layer read attention adds a cross-attention over their slots / basis coefficients. Full
    checkpointing keeps each layer's input (plus one layer's activations while its backward runs); memscale's
    selective keeps the attention sub-layer's input instead of its internals. Activations times the segments in
    flight come from the simulator's peak per stage.
  - memory state: the simulator's peak of live state versions per stage (one group's state = b streams).
  - a fixed overhead per rank: `device.overhead_bytes` (CUDA context, NCCL and cuBLAS workspaces, allocator slack).

Placement (Megatron's rank order tp-dp-pp): tp inside a node; the dp ring runs over NVLink when tp x dp fits in a
node, else over the inter-node network; pipeline neighbours are in one node only when the whole job is.

Stages hold the layers training gives them (memscale/parallel/pipeline/balance.py `stage_layers`: balanced by
cost, the head's included, or the config's parallel.pp_layers at its own pp), so per-stage costs and memory follow
the real cut. The search (`search`) enumerates tp | heads and vocab (tp <= gpus per node), pp | layers (training
accepts any pp <= layers; the search keeps to divisors to bound its size), dp = gpus / (tp pp), G |
B (global kinds: G >= pp; G <= max(2 pp, 1) beyond pp = 1 to bound the simulation), k from the given set, ZeRO 0-3
(2 and 3 only with pp = 1) and activation checkpointing none / selective / full; every candidate passes
ParallelDims.validate. Candidates are ranked with a cached simulation of uniform stages (the slowest stage's
costs, ratios rounded) or, beyond `SEARCH_SIM_LIMIT` compute actions, a scaled-down simulation (`_pipeline_fast`);
the best few are then re-estimated with the exact per-stage simulation (up to `SIM_LIMIT` compute actions, the
scaled one beyond) and re-ranked.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace
from typing import Literal

from memscale.config import Config, ConfigError
from memscale.parallel.dims import ParallelDims
from memscale.parallel.pipeline.schedule import ScheduleSpec, generate, inflight_limit
from memscale.parallel.pipeline.simulate import CostModel, simulate

Recompute = Literal["none", "selective", "full"]
GiB = 1024**3

ADAM_BYTES_PER_PARAM = 32
"""Bytes read and written per parameter by one Adam update: weight, gradient, two moments (and fp32 master + bf16
copy on GPUs), rounded up."""
SIM_LIMIT = 1024
"""Compute actions (2 x pp x G x k) above which a reported estimate uses the analytic bubble: the generator's
list scheduling is quadratic and takes seconds beyond this."""
SEARCH_SIM_LIMIT = 256
"""The same limit for the search's rough pass (cached per schedule shape; measured: a 1024-GPU 70B search went
from 16 s to a few seconds); the layouts it ranks best are then estimated under SIM_LIMIT."""


# -- hardware ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    """One accelerator (or this CPU), with the assumptions the model makes about it."""

    name: str
    peak_flops: float
    """Dense matmul peak in the training dtype (bf16 on GPUs, fp32 on the CPU), FLOP/s."""
    mfu: float
    """Achievable fraction of the peak for the model's matmuls (an assumption; the CPU check measures it)."""
    memory_bytes: int
    hbm_Bps: float
    """Memory bandwidth, for the (memory-bound) optimizer step."""
    intra_Bps: float
    """Per-GPU collective bandwidth inside a node (NVLink: what NCCL rings reach, not the nominal figure)."""
    intra_latency_s: float
    act_bytes: int
    """Bytes per activation / weight element: 2 (bf16) on GPUs, 4 (fp32) on the CPU."""
    mixed_precision: bool
    """bf16 weights and gradients with fp32 master weights (GPUs); plain fp32 (the CPU)."""
    flash_attention: bool
    """Attention keeps no score matrix (FlashAttention through SDPA on GPUs)."""
    overhead_bytes: int
    overlap_dp: bool
    """Data-parallel collectives overlap with backward compute (module doc)."""


@dataclass(frozen=True)
class Network:
    name: str
    Bps: float
    """Per-GPU bandwidth reached by collectives (one NIC per GPU, ~80% of the line rate)."""
    latency_s: float


# Nominal figures from the vendors' data sheets; NVLink per direction (H100/H200 NVLink4: 450 GB/s, A100 NVLink3:
# 300 GB/s) times ~0.8 for what NCCL's ring all-reduce reaches. MFU assumptions: 0.45 of the bf16 dense peak on
# Hopper, 0.5 on A100 (what Megatron-LM reports for GPT models of these sizes without FP8).
DEVICES: dict[str, Device] = {
    "h100": Device("H100-SXM", 989e12, 0.45, 80 * 10**9, 3.35e12, 360e9, 5e-6, 2, True, True, 3 * GiB, True),
    "h200": Device("H200", 989e12, 0.45, 141 * 10**9, 4.8e12, 360e9, 5e-6, 2, True, True, 3 * GiB, True),
    "a100": Device("A100-80GB", 312e12, 0.5, 80 * 10**9, 2.0e12, 240e9, 5e-6, 2, True, True, 3 * GiB, True),
}

INTERCONNECTS: dict[str, Network] = {
    "ib-800": Network("InfiniBand 800 Gb/s per GPU", 80e9, 8e-6),
    "ib-400": Network("InfiniBand 400 Gb/s per GPU", 40e9, 10e-6),
    "ib-200": Network("InfiniBand 200 Gb/s per GPU", 20e9, 10e-6),
    "eth-100": Network("Ethernet 100 Gb/s per GPU (RoCE)", 10e9, 30e-6),
}

# This CPU, when nothing is measured: the p2p figures of gloo over loopback on these machines (bench plan measures
# them), the memory bandwidth of a 2-channel DDR4 desktop.
CPU_DEFAULT_LINK = Network("gloo over loopback (default; `memscale bench plan` measures it)", 2e9, 100e-6)
CPU_MFU = 0.6
"""Assumed fraction of the best matmul sample reached by a training step on the CPU (FIELD-NOTES: 0.49-0.77 for
models of this width); `memscale bench plan` reports the ratio it actually reaches."""


def cpu_device(
    *,
    peak_flops: float | None = None,
    link: Network = CPU_DEFAULT_LINK,
    hbm_Bps: float | None = None,
    mfu: float = CPU_MFU,
) -> Device:
    """This CPU, fp32: the peak measured now (best of three matmul samples) unless given."""
    if peak_flops is None:
        from memscale.utils.flops import PeakMeter

        meter = PeakMeter()
        for _ in range(3):
            meter.sample()
        peak_flops = meter.best
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return Device(
        name=f"this CPU ({os.cpu_count()} cores, fp32, {peak_flops / 1e9:.0f} GFLOP/s matmul peak measured)",
        peak_flops=peak_flops,
        mfu=mfu,
        memory_bytes=pages,
        hbm_Bps=hbm_Bps or 10e9,
        intra_Bps=link.Bps,
        intra_latency_s=link.latency_s,
        act_bytes=4,
        mixed_precision=False,
        flash_attention=False,
        overhead_bytes=GiB // 2,
        overlap_dp=False,
    )


@dataclass(frozen=True)
class Cluster:
    device: Device
    num_gpus: int
    gpus_per_node: int
    inter: Network
    memory_bytes: int
    """Usable memory per rank (the device's, or --gpu-memory)."""

    @classmethod
    def make(
        cls,
        gpu: str,
        *,
        num_gpus: int,
        gpus_per_node: int = 8,
        interconnect: str = "ib-400",
        gpu_memory_gb: float | None = None,
        device: Device | None = None,
    ) -> Cluster:
        if device is None:
            if gpu == "cpu":
                device = cpu_device()
            elif gpu in DEVICES:
                device = DEVICES[gpu]
            else:
                raise ConfigError(f"--gpu {gpu} is not known: choose one of {', '.join([*DEVICES, 'cpu'])}")
        if interconnect not in INTERCONNECTS:
            raise ConfigError(
                f"--interconnect {interconnect} is not known: choose one of {', '.join(INTERCONNECTS)}"
            )
        if num_gpus < 1 or gpus_per_node < 1:
            raise ConfigError(f"--gpus {num_gpus} / --gpus-per-node {gpus_per_node} must be >= 1")
        if gpu_memory_gb is not None and gpu_memory_gb <= 0:
            raise ConfigError(f"--gpu-memory {gpu_memory_gb} must be > 0 (GB per GPU)")
        mem = int(gpu_memory_gb * 10**9) if gpu_memory_gb is not None else device.memory_bytes
        return cls(device, num_gpus, gpus_per_node, INTERCONNECTS[interconnect], mem)


# -- the model's sizes -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageShape:
    """What one pipeline stage of the model holds, per stream where it scales with streams."""

    params: int
    block_params: int
    """Parameters of the blocks (with their per-layer memory parts): the ones applied to every block token."""
    head_params: int
    """The output projection on the last stage (V x D), else 0."""
    num_layers: int
    state_numel: int
    """Memory-state elements per stream this stage holds of one group (its layers' state and, if it reads or
    writes it, the global memory)."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes the cost model needs, read off the real model built on the meta device (no memory, no time)."""

    cfg: Config
    num_params: int
    flops_per_token: float
    """The model's `flops_per_token` (model FLOPs: the MFU numerator)."""
    d_model: int
    num_heads: int
    num_layers: int
    d_ff: int
    vocab_size: int
    segment_len: int
    block_tokens: int
    """Tokens inside the blocks per stream and segment: T, plus 2 K for rmt (read and write memory tokens)."""
    attended: float
    """Mean keys a segment token attends to (the kind's `mean_attended_len`)."""
    key_len: int
    """Keys of the score matrix (memory activations): S; xl / lamemo mem_len + T."""
    cross_keys: int
    """Keys of a per-layer read attention of its own (memformer's slots, infinity's basis functions), else 0."""
    global_state_numel: int
    """Elements per stream of a global memory message (rmt / memformer), else 0."""
    topology: str
    kind: str
    _stage_cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg: Config) -> ModelShape:
        import torch

        from memscale.models.transformer import MemoryTransformer

        m, T = cfg.model, cfg.data.segment_len
        with torch.device("meta"):
            model = MemoryTransformer(m, segment_len=T)
        mem = model.memory
        kind = m.memory.kind
        K = m.memory.num_tokens
        block_tokens = T + 2 * K if kind == "rmt" else T
        key_len = block_tokens
        if kind in ("xl", "lamemo"):
            key_len = (m.memory.mem_len or T) + T
        cross = {"memformer": K, "infinity": m.memory.num_basis}.get(kind, 0)
        state = model.init_state(1)
        glob = sum(t.numel() for n, t in state.items() if not _layer_of(n)[1])
        return cls(
            cfg=cfg,
            num_params=model.num_params(),
            flops_per_token=model.flops_per_token(),
            d_model=m.d_model,
            num_heads=m.num_heads,
            num_layers=m.num_layers,
            d_ff=m.d_ff or 4 * m.d_model,
            vocab_size=m.vocab_size,
            segment_len=T,
            block_tokens=block_tokens,
            attended=float(mem.mean_attended_len(T)),
            key_len=key_len,
            cross_keys=cross,
            global_state_numel=glob if type(mem).topology == "global" else 0,
            topology=type(mem).topology,
            kind=kind,
        )

    def stages(self, pp: int) -> tuple[StageShape, ...]:
        if pp not in self._stage_cache:
            self._stage_cache[pp] = _stages(self.cfg, pp)
        return self._stage_cache[pp]


def _layer_of(name: str) -> tuple[str, bool]:
    base, _, tail = name.rpartition(".")
    return (base, True) if base and tail.isdigit() else (name, False)


def _stages(cfg: Config, pp: int) -> tuple[StageShape, ...]:
    """Each stage's model built on the meta device: the exact cut that training makes (memscale/parallel/pipeline/
    balance.py `stage_layers`: layers balanced by cost, or parallel.pp_layers; embedding on the first, head on the
    last, a tied head's copy on a last stage of its own)."""
    import torch

    from memscale.models.transformer import MemoryTransformer
    from memscale.parallel.pipeline.balance import stage_layers, stage_ranges

    T = cfg.data.segment_len
    out = []
    for layers in stage_ranges(stage_layers(cfg, pp)):
        with torch.device("meta"):
            stage = MemoryTransformer(cfg.model, segment_len=T, layers=layers)
        blocks = sum(p.numel() for p in stage.blocks.parameters())
        head = stage.head.weight.numel() if stage.head is not None else 0
        state = stage.init_state(1)
        out.append(
            StageShape(
                params=stage.num_params(),
                block_params=blocks,
                head_params=head,
                num_layers=len(layers),
                state_numel=sum(t.numel() for t in state.tensors.values()),
            )
        )
    return tuple(out)


# -- a layout and its estimate ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    groups: int
    """G stream groups per data-parallel rank (pipeline units are segments of B / G streams)."""
    segments: int
    """k: segments per optimizer step (train.bptt_segments; the BPTT window when memory_grad is not detached)."""
    zero_stage: int
    recompute: Recompute

    def __str__(self) -> str:
        return (
            f"tp={self.tp} pp={self.pp} dp={self.dp} G={self.groups} k={self.segments} "
            f"ZeRO-{self.zero_stage} ckpt={self.recompute}"
        )


@dataclass
class Memory:
    """Bytes on one rank."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    state: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.state + self.overhead


@dataclass
class Estimate:
    layout: Layout
    streams_per_rank: int
    step_s: float
    tokens_per_step: int
    bubble: float
    memory: Memory
    """The fullest stage's rank."""
    memory_per_stage: list[Memory]
    fits: bool
    mfu: float
    """Model FLOPs (`flops_per_token` semantics, 3x the forward) per second over the cluster's peak."""
    stage_forward_s: list[float] = field(default_factory=list)
    """One unit's forward on each stage (compute, tp and ZeRO-3 collectives): what the simulator was given."""
    stage_backward_s: list[float] = field(default_factory=list)
    parts: dict[str, float] = field(default_factory=dict)
    """Seconds: compute and tp communication per stage, pipeline makespan, dp exposed, optimizer."""
    pipeline: str = "exact simulation"
    """How the makespan and bubble were obtained (exact simulation, or `_pipeline_fast`'s approximations)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    def to_dict(self) -> dict:
        lay = self.layout
        return {
            "layout": {
                "tp": lay.tp,
                "pp": lay.pp,
                "dp": lay.dp,
                "groups": lay.groups,
                "segments": lay.segments,
                "zero_stage": lay.zero_stage,
                "activation_checkpointing": lay.recompute,
            },
            "streams_per_rank": self.streams_per_rank,
            "step_s": self.step_s,
            "tokens_per_step": self.tokens_per_step,
            "tokens_per_s": self.tokens_per_s,
            "bubble": self.bubble,
            "mfu": self.mfu,
            "fits": self.fits,
            "memory_bytes": {**vars(self.memory), "total": self.memory.total},
            "memory_total_per_stage": [m.total for m in self.memory_per_stage],
            "parts_s": self.parts,
            "pipeline": self.pipeline,
        }


def _ring(kind: Literal["all_reduce", "half"], n: int, nbytes: float, Bps: float, lat: float) -> float:
    """Ring collective over n ranks: all-reduce 2 (n - 1) / n of the bytes, reduce-scatter or all-gather half."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    steps = 2 * (n - 1) if kind == "all_reduce" else n - 1
    return steps / n * nbytes / Bps + steps * lat


@dataclass
class _Unit:
    """Per-stage costs of one pipeline unit, and per-stage bytes."""

    forward_s: list[float]
    backward_s: list[float]
    recompute_s: list[float]
    compute_s: float
    tp_s: float
    activation_bytes: list[float]
    transient_bytes: list[float]
    gathered_bytes: list[float]
    """ZeRO-3: the gathered full weights of two layers."""
    input_bytes: list[float]
    state_bytes: list[float]
    act_msg_bytes: float
    mem_msg_bytes: float
    p2p_Bps: float
    p2p_latency_s: float
    dp_s: list[float]
    """Exposed data-parallel time per stage after the pipeline."""
    optimizer_s: float
    model_flops_per_token: float


def _layer_activation_bytes(shape: ModelShape, dev: Device, b: int, tp: int, recompute: Recompute) -> tuple:
    """(kept per layer and segment, transient while one layer's backward runs), bytes; see the module doc."""
    e, s, h, a, t = dev.act_bytes, shape.block_tokens, shape.d_model, shape.num_heads, tp
    keys, f = shape.key_len, shape.d_ff
    drop = shape.cfg.model.dropout > 0
    sbh = s * b * h

    def scores(nkeys: int, rows: int) -> float:
        if dev.flash_attention:
            return 4 * a * rows * b / t  # fp32 log-sum-exp per row and head
        return (e + (1 + e if drop else 0)) * a * rows * nkeys * b / t  # probabilities (+ mask, dropped copy)

    attention = (
        2 * e * sbh  # norm input, QKV input
        + e * (s + 2 * keys + s) * b * h / t  # Q, K, V, output-projection input
        + scores(keys, s)
        + (sbh if drop else 0)  # dropout mask after the output projection
    )
    mlp = 2 * e * sbh + 2 * e * s * b * f / t + (sbh if drop else 0)
    cross = 0.0
    if shape.cross_keys:
        T = shape.segment_len
        cross = (
            2 * e * T * b * h + e * (2 * T + 2 * shape.cross_keys) * b * h / t + scores(shape.cross_keys, T)
        )
    full_layer = attention + mlp + cross
    if recompute == "full":
        return e * sbh, full_layer
    if recompute == "selective":
        return e * sbh + mlp + cross, attention
    return full_layer, 0.0


def _unit_costs(shape: ModelShape, layout: Layout, cluster: Cluster, b: int) -> _Unit:
    dev, lay = cluster.device, layout
    tp, pp, dp = lay.tp, lay.pp, lay.dp
    stages = shape.stages(pp)
    rate = tp * dev.peak_flops * dev.mfu
    S, T, D, e = shape.block_tokens, shape.segment_len, shape.d_model, dev.act_bytes
    # Forward FLOPs of one unit (b streams, one segment): weight matmuls over every block token; attention scores
    # and weighted sums 4 D per (query, key) pair: segment tokens over `attended` keys, rmt's memory tokens over
    # all S (counted though flops_per_token leaves them out: they are computed).
    attn_pairs = T * shape.attended + (S - T) * S
    attn_fwd = 4 * D * attn_pairs * b
    attn_proj_fwd = 2 * 4 * D * D * S * b  # the QKV and output projections, recomputed by selective
    ar_bytes = b * S * D * e
    tp_ar = _ring("all_reduce", tp, ar_bytes, dev.intra_Bps, dev.intra_latency_s)
    fwd, bwd, rec, act, trans, inp, st, dp_exposed, gather = [], [], [], [], [], [], [], [], []
    recompute_ar = {"none": 0, "selective": 1, "full": 2}[lay.recompute]
    zero = lay.zero_stage
    dp_net = (dev.intra_Bps, dev.intra_latency_s)
    if tp * dp > cluster.gpus_per_node:
        dp_net = (min(cluster.inter.Bps, dev.intra_Bps), cluster.inter.latency_s)
    grad_bytes = 2 if dev.mixed_precision else 4
    compute_total = tp_total = 0.0
    units_per_step = lay.groups * lay.segments
    for i, stg in enumerate(stages):
        layers = stg.num_layers
        f_flops = layers * (2 * (stg.block_params / layers) * S * b + attn_fwd) + 2 * stg.head_params * T * b
        f_c = f_flops / rate
        b_c = 2 * f_c
        rc = {"none": 0.0, "selective": layers * (attn_proj_fwd + attn_fwd) / rate, "full": f_c}[
            lay.recompute
        ]
        f_tp = 2 * layers * tp_ar
        b_tp = (2 + recompute_ar) * layers * tp_ar
        params_rank = stg.params / tp
        # ZeRO-2/3 collectives run per micro-batch, ZeRO-0/1's once per step (module doc).
        per_unit_f = per_unit_b = 0.0
        if zero == 3:
            per_unit_f = _ring("half", dp, params_rank * e, *dp_net)
            per_unit_b = per_unit_f + _ring("half", dp, params_rank * grad_bytes, *dp_net)
        elif zero == 2:
            per_unit_b = _ring("half", dp, params_rank * grad_bytes, *dp_net)
        F, B = f_c + f_tp, b_c + rc + b_tp
        if dev.overlap_dp:
            F, B = max(F, per_unit_f), max(B, per_unit_b)
        else:
            F, B = F + per_unit_f, B + per_unit_b
        fwd.append(F)
        bwd.append(B)
        rec.append(F)  # replay recomputes the whole forward of the segment
        compute_total += (f_c + b_c + rc) * units_per_step
        tp_total += (f_tp + b_tp) * units_per_step
        if zero in (0, 1):
            exposed = _ring("all_reduce", dp, params_rank * grad_bytes, *dp_net)
            if dev.overlap_dp:
                exposed = max(0.0, exposed - B)
        elif zero == 2:
            exposed = _ring("half", dp, params_rank * e, *dp_net)  # the updated weights' all-gather
        else:
            exposed = 0.0
        dp_exposed.append(exposed)
        kept, transient = _layer_activation_bytes(shape, dev, b, tp, lay.recompute)
        a_bytes = layers * kept
        if i == pp - 1 and not shape.cfg.model.fused_loss:
            a_bytes += 4 * b * T * shape.vocab_size / tp  # fp32 logits kept for the plain cross-entropy
        act.append(a_bytes)
        trans.append(transient)
        # ZeRO-3 holds whole weights only of the layer it runs and the next one (prefetched).
        gather.append(2 * e * (stg.block_params / layers) if zero == 3 else 0.0)
        inp.append(b * S * D * e if i > 0 else b * T * 8)  # stage 0 keeps token ids (int64)
        st.append(b * stg.state_numel * e)
    opt_params = max(s.params for s in stages) / tp / (dp if zero >= 1 else 1)
    if pp * tp * dp <= cluster.gpus_per_node:
        p2p = (dev.intra_Bps, dev.intra_latency_s)
    else:
        p2p = (min(cluster.inter.Bps, dev.intra_Bps), cluster.inter.latency_s)
    return _Unit(
        forward_s=fwd,
        backward_s=bwd,
        recompute_s=rec,
        compute_s=compute_total / pp,
        tp_s=tp_total / pp,
        activation_bytes=act,
        transient_bytes=trans,
        gathered_bytes=gather,
        input_bytes=inp,
        state_bytes=st,
        act_msg_bytes=b * S * D * e,
        mem_msg_bytes=b * shape.global_state_numel * e,
        p2p_Bps=p2p[0],
        p2p_latency_s=p2p[1],
        dp_s=dp_exposed,
        optimizer_s=opt_params * ADAM_BYTES_PER_PARAM / dev.hbm_Bps,
        model_flops_per_token=shape.flops_per_token,
    )


def schedule_spec(shape: ModelShape, layout: Layout) -> ScheduleSpec:
    from memscale.parallel.pipeline.schedule import GLOBAL_READERS

    mg = shape.cfg.train.memory_grad
    return ScheduleSpec(
        num_stages=layout.pp,
        num_groups=layout.groups,
        num_segments=layout.segments,
        bptt_segments=layout.segments if mg != "detached" else 1,
        memory_grad=mg,
        topology=shape.topology,  # type: ignore[arg-type]
        memory_readers=GLOBAL_READERS.get(shape.kind, "first"),
    )


@dataclass
class _PipeResult:
    makespan_s: float
    bubble: float
    peak_activation: list[float]
    peak_state: list[float]
    how: str
    """How: exact simulation, uniform stages simulated, or scaled from pp=P', G=G' (`_pipeline_fast`)."""


def _pipeline_exact(spec: ScheduleSpec, u: _Unit) -> _PipeResult:
    """generate + simulate with the real per-stage costs and bytes."""
    costs = CostModel(
        forward_s=u.forward_s,
        backward_s=u.backward_s,
        activation_bytes=[int(x) for x in u.activation_bytes],
        state_bytes=[int(x) for x in u.state_bytes],
        recompute_s=u.recompute_s,
        stage_input_bytes=[int(x) for x in u.input_bytes],
        activation_msg_bytes=[int(u.act_msg_bytes)] * spec.num_stages,
        memory_msg_bytes=int(u.mem_msg_bytes),
        p2p_latency_s=u.p2p_latency_s,
        p2p_bandwidth_Bps=u.p2p_Bps,
        optimizer_s=u.optimizer_s,
    )
    p2p = costs.transfer_s(int(u.act_msg_bytes))
    sched = generate(spec, forward=u.forward_s, backward=u.backward_s, p2p=p2p)
    r = simulate(sched, spec, costs)
    return _PipeResult(
        r.makespan_s,
        r.bubble,
        [float(x.peak_activation_bytes) for x in r.ranks],
        [float(x.peak_state_bytes) for x in r.ranks],
        "exact simulation",
    )


def _round_ratio(x: float) -> float:
    """Round to 2 significant digits (cache keys of the search's uniform simulation)."""
    if x <= 0:
        return 0.0
    return float(f"{x:.2g}")


@functools.lru_cache(maxsize=4096)
def _uniform_sim(spec: ScheduleSpec, bwd_ratio: float, p2p_ratio: float) -> tuple:
    """Makespan (in forward units), bubble, and per stage: peak kept units, peak state versions; F = 1."""
    P = spec.num_stages
    replay = spec.memory_grad == "replay"
    costs = CostModel.uniform(
        P,
        forward_s=1.0,
        backward_s=bwd_ratio,
        activation_bytes=0 if replay else 1,
        state_bytes=1,
        stage_input_bytes=[1] * P if replay else None,
        p2p_latency_s=p2p_ratio,
    )
    sched = generate(spec, forward=1.0, backward=bwd_ratio, p2p=p2p_ratio)
    r = simulate(sched, spec, costs)
    return (
        r.makespan_s,
        r.bubble,
        [x.peak_activation_bytes for x in r.ranks],
        [x.peak_state_bytes for x in r.ranks],
    )


def _fill_drain(P: int, m: int) -> float:
    """1F1B's bubble with m micro-batches on P stages: (P - 1) / (m + P - 1)."""
    return (P - 1) / (m + P - 1)


def _pipeline_fast(spec: ScheduleSpec, u: _Unit) -> _PipeResult:
    """Uniform stages at the slowest stage's costs, simulated once per schedule shape and cost ratios (cached).

    Beyond SEARCH_SIM_LIMIT compute actions (the generator is quadratic) a scaled-down schedule is simulated
    instead: P' = 8 stages (fewer if it would pass SIM_LIMIT) with the same groups per stage G / P and the same k; its bubble
    is carried to P stages by the ratio of 1F1B's fill-drain bubbles, (P - 1) / (m + P - 1) over the same for P'
    (m = G k). Checked against full simulations (F = 1, B = 2, p2p 0.05), bubble scaled / simulated: rmt with BPTT
    P = 16, G = 32, k = 2: 0.348 / 0.352 (the plain 1F1B formula says 0.19); P = 20, G = 20: 0.427 / 0.431;
    per-layer detached P = 16, G = 16: 0.340 / 0.340; replay P = 16, G = 32: 0.291 / 0.309 (tests/test_plan.py).
    """
    P, G, k = spec.num_stages, spec.num_groups, spec.num_segments
    F, B = max(u.forward_s), max(u.backward_s)
    R = max(u.recompute_s) if spec.memory_grad == "replay" else 0.0
    p2p = u.p2p_latency_s + u.act_msg_bytes / u.p2p_Bps if P > 1 else 0.0
    replay = spec.memory_grad == "replay"
    m = G * k
    # The simulator adds replay's recompute (= the forward) itself; the ratios are those of its inputs.
    ratios = (_round_ratio(B / F), _round_ratio(p2p / F)) if F > 0 else (0.0, 0.0)
    if 2 * P * m <= SEARCH_SIM_LIMIT and F > 0:
        span, bubble, kept, versions = _uniform_sim(spec, *ratios)
        return _PipeResult(
            span * F + u.optimizer_s,
            bubble,
            _kept_bytes(kept, u, replay),
            [versions[s] * u.state_bytes[s] for s in range(P)],
            "uniform stages, simulated",
        )
    small_P = 8
    while True:
        small_G = max(small_P if spec.topology == "global" else 1, round(G * small_P / P))
        if 2 * small_P * small_G * k <= SIM_LIMIT or small_P == 1:
            break
        small_P //= 2
    small = replace(spec, num_stages=small_P, num_groups=small_G)
    _, small_bubble, _, small_versions = _uniform_sim(small, *ratios) if F > 0 else (0, 0.0, [0], [0])
    small_m = small_G * k
    if small_P > 1 and P > 1:
        bubble = min(0.99, small_bubble * _fill_drain(P, m) / _fill_drain(small_P, small_m))
    else:
        bubble = _fill_drain(P, m)
    makespan = m * (F + B + R) / (1 - bubble) + u.optimizer_s
    kept = [min(inflight_limit(spec, s), m) for s in range(P)]
    scale = G / small_G
    versions = [max(small_versions) * scale] * P
    state = [versions[s] * u.state_bytes[s] for s in range(P)]
    return _PipeResult(
        makespan, bubble, _kept_bytes(kept, u, replay), state, f"scaled from pp={small_P}, G={small_G}"
    )


def _kept_bytes(kept: list, u: _Unit, replay: bool) -> list[float]:
    """Activation peak per stage from the units kept in flight (replay: their inputs, plus one recomputed)."""
    return [
        kept[s] * (u.input_bytes[s] if replay else u.activation_bytes[s])
        + (u.activation_bytes[s] if replay else 0)
        for s in range(len(kept))
    ]


def estimate(
    shape: ModelShape,
    layout: Layout,
    cluster: Cluster,
    *,
    global_streams: int,
    exact: bool = True,
) -> Estimate:
    """Predicted step time and per-rank memory of `layout`; `exact=False` is the search's cached approximation."""
    lay = layout
    if global_streams % lay.dp:
        raise ValueError(f"{global_streams} global streams do not split over dp={lay.dp}")
    B = global_streams // lay.dp
    if B % lay.groups:
        raise ValueError(f"G={lay.groups} groups must divide the {B} streams of a data-parallel rank")
    b = B // lay.groups
    u = _unit_costs(shape, lay, cluster, b)
    spec = schedule_spec(shape, lay)
    big = 2 * lay.pp * lay.groups * lay.segments > SIM_LIMIT
    pipe = _pipeline_exact(spec, u) if exact and not big else _pipeline_fast(spec, u)
    dev, zero, dp = cluster.device, lay.zero_stage, lay.dp
    mems = []
    for s, stg in enumerate(shape.stages(lay.pp)):
        n = stg.params / lay.tp
        if dev.mixed_precision:
            w, g, o = 2 * n, 2 * n, 12 * n
        else:
            w, g, o = 4 * n, 4 * n, 8 * n
        if zero >= 1:
            o /= dp
        if zero >= 2:
            g /= dp
        if zero >= 3:
            w = w / dp + u.gathered_bytes[s]
        act = pipe.peak_activation[s] + u.transient_bytes[s]
        mems.append(Memory(w, g, o, act, pipe.peak_state[s], dev.overhead_bytes))
    worst = max(mems, key=lambda m: m.total)
    step = pipe.makespan_s + max(u.dp_s)
    tokens = global_streams * lay.segments * shape.segment_len
    world = lay.tp * lay.pp * lay.dp
    mfu = tokens / step * u.model_flops_per_token / (world * dev.peak_flops)
    return Estimate(
        layout=lay,
        streams_per_rank=B,
        step_s=step,
        tokens_per_step=tokens,
        bubble=pipe.bubble,
        memory=worst,
        memory_per_stage=mems,
        fits=worst.total <= cluster.memory_bytes,
        mfu=mfu,
        stage_forward_s=list(u.forward_s),
        stage_backward_s=list(u.backward_s),
        parts={
            "compute_per_stage": u.compute_s,
            "tp_comm_per_stage": u.tp_s,
            "pipeline_makespan": pipe.makespan_s,
            "dp_exposed": max(u.dp_s),
            "optimizer": u.optimizer_s,
        },
        pipeline=pipe.how,
    )


# -- the search ------------------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    best: list[Estimate]
    """The fastest layouts that fit, best first (exact estimates)."""
    considered: int
    fitting: int
    smallest: Estimate | None
    """When nothing fits: the layout that needs the least memory."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(
    shape: ModelShape,
    cluster: Cluster,
    *,
    global_streams: int,
    segments: tuple[int, ...],
    zero_stages: tuple[int, ...] = (0, 1, 2, 3),
    recomputes: tuple[Recompute, ...] = ("none", "selective", "full"),
) -> list[Layout]:
    """Every layout the rules allow (module doc); each passes ParallelDims.validate."""
    out = []
    N = cluster.num_gpus
    for tp in _divisors(min(N, cluster.gpus_per_node)):
        for pp in _divisors(shape.num_layers):
            if N % (tp * pp):
                continue
            dp = N // (tp * pp)
            if global_streams % dp:
                continue
            B = global_streams // dp
            for zero in zero_stages:
                try:
                    ParallelDims(tp=tp, pp=pp, dp=dp, zero_stage=zero, world_size=N).validate(
                        num_heads=shape.num_heads, vocab_size=shape.vocab_size, num_layers=shape.num_layers
                    )
                except ConfigError:
                    continue
                if dp == 1 and zero > 0:
                    continue  # nothing to shard over
                for G in _divisors(B):
                    if shape.topology == "global" and G < pp:
                        continue
                    if pp > 1 and G > 2 * pp:
                        continue
                    for k in segments:
                        for rc in recomputes:
                            out.append(Layout(tp, pp, dp, G, k, zero, rc))
    return out


def search(
    shape: ModelShape,
    cluster: Cluster,
    *,
    global_streams: int,
    segments: tuple[int, ...] | None = None,
    top: int = 5,
) -> SearchResult:
    """The fastest layouts of `cluster` that fit its memory, best first (by tokens/s: k changes the step)."""
    ks = segments or (shape.cfg.train.bptt_segments,)
    cands = candidate_layouts(shape, cluster, global_streams=global_streams, segments=tuple(ks))
    if not cands:
        raise ConfigError(
            f"no layout of {cluster.num_gpus} GPUs divides the model and the batch: tp must divide "
            f"num_heads={shape.num_heads} and vocab_size={shape.vocab_size}, pp num_layers={shape.num_layers}, "
            f"dp={cluster.num_gpus}/(tp pp) the {global_streams} global streams: change --gpus or --global-streams"
        )
    rough = [estimate(shape, c, cluster, global_streams=global_streams, exact=False) for c in cands]

    # Fastest first (to 3 significant digits: the model is no finer); among equally fast layouts the simplest (lower
    # ZeRO stage, less recompute, fewer groups), then the one with the most memory to spare. The exact simulation
    # can disagree with the rough one about fitting, so candidates are re-estimated until enough fit exactly.
    def key(e: Estimate) -> tuple:
        lay = e.layout
        rc = ("none", "selective", "full").index(lay.recompute)
        return (-float(f"{e.tokens_per_s:.3g}"), lay.zero_stage, rc, lay.groups, e.memory.total)

    fitting = sorted((r for r in rough if r.fits), key=key)
    exact: list[Estimate] = []
    for r in fitting:
        e = estimate(shape, r.layout, cluster, global_streams=global_streams)
        if e.fits:
            exact.append(e)
        if len(exact) >= 3 * top:
            break
    if exact:
        return SearchResult(sorted(exact, key=key)[:top], len(cands), len(fitting), None)
    smallest = min(rough, key=lambda r: r.memory.total)
    return SearchResult(
        [], len(cands), 0, estimate(shape, smallest.layout, cluster, global_streams=global_streams)
    )


def config_layout(cfg: Config) -> Layout:
    """The config's own layout (parallel.*, dp = 0 -> 1), one group per pipeline stage for global kinds."""
    p = cfg.parallel
    dp = p.dp or 1
    dims = ParallelDims(tp=p.tp, pp=p.pp, dp=dp, zero_stage=p.zero_stage, world_size=p.tp * p.pp * dp)
    dims.validate(
        num_heads=cfg.model.num_heads, vocab_size=cfg.model.vocab_size, num_layers=cfg.model.num_layers
    )
    return Layout(
        tp=p.tp,
        pp=p.pp,
        dp=dp,
        groups=1,
        segments=cfg.train.bptt_segments,
        zero_stage=p.zero_stage,
        recompute=cfg.train.activation_checkpointing,
    )


def with_groups(layout: Layout, shape: ModelShape, streams_per_rank: int) -> Layout:
    """The config's layout with G: the fewest groups that keep a global kind's pipe full (G >= pp, G | B)."""
    if layout.pp == 1 or shape.topology != "global":
        return layout
    for G in _divisors(streams_per_rank):
        if G >= layout.pp:
            return replace(layout, groups=G)
    raise ConfigError(
        f"data.num_streams={streams_per_rank} streams per rank cannot form G >= pp={layout.pp} groups, which the "
        f"{shape.kind} memory needs to keep the pipeline full: set data.num_streams to a multiple of {layout.pp}"
    )


def assumptions(cluster: Cluster) -> list[str]:
    d, net = cluster.device, cluster.inter
    lines = [
        f"device {d.name}: peak {d.peak_flops / 1e12:.3g} TFLOP/s ({'bf16' if d.mixed_precision else 'fp32'}), "
        f"assumed MFU {d.mfu:.2f} on matmuls; {cluster.memory_bytes / 1e9:.0f} GB per rank, "
        f"{d.overhead_bytes / GiB:.1f} GiB of it fixed overhead",
        f"in-node collectives {d.intra_Bps / 1e9:.0f} GB/s per GPU, {d.intra_latency_s * 1e6:.0f} us per ring step; "
        f"between nodes {net.name}: {net.Bps / 1e9:.0f} GB/s, {net.latency_s * 1e6:.0f} us; "
        f"{cluster.gpus_per_node} GPUs per node, tp inside a node",
        "memory: "
        + (
            "bf16 weights+grads, fp32 master + Adam (16 B/param, ZeRO-partitioned)"
            if d.mixed_precision
            else "fp32 weights, grads, Adam (16 B/param, ZeRO-partitioned)"
        )
        + "; activations per Korthikanti et al. 2022 with memory tokens in s"
        + (", flash attention (no score matrix)" if d.flash_attention else ", score matrices kept"),
        "data parallel: "
        + (
            "gradient reduce overlapped with the last micro-batch's backward"
            if d.overlap_dp
            else "gradient reduce not overlapped"
        )
        + f"; Adam step memory-bound ({ADAM_BYTES_PER_PARAM} B/param at {d.hbm_Bps / 1e12:.2g} TB/s)",
        f"pipeline: memscale's schedule generator + simulator (exact for the reported layouts up to {SIM_LIMIT} "
        "compute actions per step; beyond, a simulation scaled down to 8 stages with the same groups per stage)",
    ]
    return lines


__all__ = [
    "DEVICES",
    "INTERCONNECTS",
    "Cluster",
    "Device",
    "Estimate",
    "Layout",
    "Memory",
    "ModelShape",
    "Network",
    "SearchResult",
    "assumptions",
    "candidate_layouts",
    "config_layout",
    "cpu_device",
    "estimate",
    "schedule_spec",
    "search",
    "with_groups",
]
