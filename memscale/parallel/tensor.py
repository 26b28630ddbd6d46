"""Tensor parallelism of a `MemoryTransformer`, applied from outside: `parallelize(model, groups=...)`.

    torch.manual_seed(seed)
    model = MemoryTransformer(cfg.model, segment_len=T)     # the plain model, the same on every rank
    parallelize(model, groups=init_distributed(dims))        # in place: this rank's tensor-parallel shard

The plain model built from a seed is cut into its shard: each projection is replaced by a megatron-core layer
holding this rank's slice of the plain weights, so TP=n computes the TP=1 function (up to the order of fp32
reductions). Modules get the tensor-parallel group handed to them here; none reads a global.

What is split, per part of the model:

| part | TP layer | split |
| --- | --- | --- |
| attention `qkv` | ColumnParallelLinear | rows [H, 3, K]: a contiguous row block is whole heads |
| attention `out` | RowParallelLinear | columns by heads; bias added after the all-reduce |
| MLP `up` / `down` | ColumnParallelLinear / RowParallelLinear | hidden units |
| token embedding | VocabParallelEmbedding | vocabulary rows |
| head (tied or not) | `VocabParallelHead` | vocabulary rows; the loss is vocab-parallel (kernels/cross_entropy.py) |
| norms, position table | replicated | |

Memory kinds under TP: a tensor is sharded by heads where the kind attends per head (a per-head parameter, or
state that holds per-head attention outputs or normalisers), and replicated where it has the model width D (it is
the residual stream, or an input of projections that every rank applies to the whole of it):

| kind | sharded by heads | replicated, and why |
| --- | --- | --- |
| none | - | - |
| rmt | - | initial memory, read/write position vectors and state `mem` [B, K, D]: memory tokens are rows of the residual stream, which every rank holds whole |
| xl | `u`, `v` [H, K]; each layer's `r_net` (column-parallel, rows [H, K]) | state `mem.l` [B, M, D]: the cached layer inputs, projected by the sharded qkv on every rank; `valid` |
| memformer | each layer's read: `q`, `kv` column-parallel, `out` row-parallel; the writer's `q`, `kv` column-parallel, its heads all-gathered (no output projection to reduce over) | state `mem` [B, M, D] and forgetting bias `b`: slots are width-D vectors normalised over the whole width |
| lamemo | `u`, `v`, `v_future` [H, K]; `r_net`; state `attn.l` [B, M, H*K] (per-head attention outputs before the output projection) and `lognorm.l` [B, M, H] (per-head softmax normalisers) | state `emb` [B, M, D] (layer-0 inputs), `valid` |
| infinity | as xl: `u`, `v`, `r_net`; each layer's `key`, `value` (column-parallel, rows [H, K]) and `out` (row-parallel) | state `mem.l` [B, M + T, D] (as xl), `coef.l` [B, N, D]: basis coefficients of the layer's inputs, a fit of width-D vectors; the CNN `gate` on those inputs; `mu`, `sigma` (one N -> 1 map shared by all heads: its gradient is summed over the ranks' heads); state `mass.l` [B, 128], the sticky-memory histogram, summed over the ranks' heads so that every rank draws the same positions and refits the same coefficients; the KL term, summed over the ranks' heads (forward all-reduce, identity backward) |

Dropout: on replicated activations (embeddings, residual branches, relative-position sinusoids) from the default
generator, equal on every TP rank; on attention probabilities of a rank's own heads inside megatron-core's RNG
tracker stream (`Attention.dropout_rng` is set to `get_cuda_rng_tracker().fork`), different on every rank. A
replayed segment (memory_grad=replay) restores the tracker's streams too (memscale/train/bptt.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core import tensor_parallel as mtp
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import Tensor, nn

__all__ = [
    "ColumnParallel",
    "RowParallel",
    "VocabParallelEmbedding",
    "VocabParallelHead",
    "gather_tensor_parallel",
    "parallelize",
    "partition_dim",
]


def partition_dim(p: Tensor) -> int | None:
    """The dimension along which `p` is split over the TP ranks, or None when it is replicated."""
    return p.partition_dim if getattr(p, "tensor_model_parallel", False) else None


def _mark(p: Tensor, dim: int | None) -> Tensor:
    """megatron-core's attributes of a split parameter (`tensor_model_parallel`, `partition_dim`, `partition_stride`),
    set or overwritten."""
    for name in ("tensor_model_parallel", "partition_dim", "partition_stride"):
        if hasattr(p, name):
            delattr(p, name)
    set_tensor_model_parallel_attributes(p, dim is not None, -1 if dim is None else dim, 1)
    return p


def _rank_size(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _shard(t: Tensor, dim: int, group) -> Tensor:
    r, n = _rank_size(group)
    if t.shape[dim] % n:
        raise ValueError(f"dimension {dim} of a {tuple(t.shape)} tensor does not split over {n} TP ranks")
    return t.chunk(n, dim)[r]


def _copy_attrs(src: nn.Module, dst: nn.Module) -> None:
    for name in ("residual_out", "head_layout", "param_role"):
        if hasattr(src, name):
            setattr(dst, name, getattr(src, name))


class ColumnParallel(mtp.ColumnParallelLinear):
    """megatron-core's column-parallel linear returning its output alone (an nn.Linear's call convention)."""

    param_roles = {"weight": "matrix", "bias": "bias"}

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class RowParallel(mtp.RowParallelLinear):
    """megatron-core's row-parallel linear (input split by columns) returning its output alone."""

    param_roles = {"weight": "matrix", "bias": "bias"}

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class VocabParallelEmbedding(mtp.VocabParallelEmbedding):
    param_roles = {"weight": "embedding"}


class VocabParallelHead(nn.Module):
    """The output projection on this rank's vocabulary rows [vocab_start, vocab_start + V_local).

    `memscale.train.loss.token_loss` sees `tp_group` and computes the loss vocab-parallel; called, it returns the
    full logits (all-gathered: evaluation only)."""

    param_roles = {"weight": "matrix"}

    def __init__(self, weight: nn.Parameter, *, vocab_start: int, vocab_size: int, tp_group):
        super().__init__()
        self.weight = weight
        self.vocab_start = vocab_start
        self.vocab_size = vocab_size
        self.tp_group = tp_group

    def forward(self, h: Tensor) -> Tensor:
        local = F.linear(mtp.copy_to_tensor_model_parallel_region(h, group=self.tp_group), self.weight)
        return mtp.gather_from_tensor_model_parallel_region(local, group=self.tp_group)


class ReplicatedInParallelRegion(nn.Linear):
    """A replicated linear applied to per-head tensors (infinity's mu and sigma maps, shared by all heads): each
    rank's gradient covers its own heads only, so the weight enters through megatron-core's copy-to-TP-region
    (identity forward, all-reduce of the gradient backward)."""

    def __init__(self, src: nn.Linear, tp_group):
        super().__init__(src.in_features, src.out_features, bias=src.bias is not None)
        with torch.no_grad():
            self.weight.copy_(src.weight)
            if src.bias is not None:
                self.bias.copy_(src.bias)
        self.tp_group = tp_group

    def forward(self, x: Tensor) -> Tensor:
        group = self.tp_group
        w = mtp.copy_to_tensor_model_parallel_region(self.weight, group=group)
        b = (
            mtp.copy_to_tensor_model_parallel_region(self.bias, group=group)
            if self.bias is not None
            else None
        )
        return F.linear(x, w, b)


def tracker_fork():
    """The model-parallel stream of megatron-core's RNG tracker, looked up at each use: reseeding
    (`memscale.parallel.random.model_parallel_seed`) replaces the tracker."""
    return mtp.get_cuda_rng_tracker().fork()


def _config(group) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=dist.get_world_size(group),
        use_cpu_initialization=True,
        perform_initialization=False,  # weights are copied from the plain model
        params_dtype=torch.float32,
    )


def _keep(w: Tensor) -> Tensor:
    return w


def column(src: nn.Linear, group) -> ColumnParallel:
    """`src` split by output rows: with rows laid out per head, rank r gets heads [r H/n, (r+1) H/n)."""
    layer = ColumnParallel(
        src.in_features,
        src.out_features,
        config=_config(group),
        init_method=_keep,
        bias=src.bias is not None,
        gather_output=False,
        tp_group=group,
    )
    with torch.no_grad():
        layer.weight.copy_(_shard(src.weight, 0, group))
        _mark(layer.weight, 0)
        if src.bias is not None:
            layer.bias.copy_(_shard(src.bias, 0, group))
            _mark(layer.bias, 0)
    _copy_attrs(src, layer)
    return layer.to(src.weight.device)


def row(src: nn.Linear, group) -> RowParallel:
    """`src` split by input columns (the heads or hidden units of a column-parallel producer); bias replicated."""
    layer = RowParallel(
        src.in_features,
        src.out_features,
        config=_config(group),
        init_method=_keep,
        bias=src.bias is not None,
        input_is_parallel=True,
        skip_bias_add=False,
        tp_group=group,
    )
    with torch.no_grad():
        layer.weight.copy_(_shard(src.weight, 1, group))
        _mark(layer.weight, 1)
        if src.bias is not None:
            layer.bias.copy_(src.bias)
    _copy_attrs(src, layer)
    return layer.to(src.weight.device)


def _shard_parameter(owner: nn.Module, name: str, group, dim: int = 0) -> None:
    p = getattr(owner, name)
    setattr(owner, name, _mark(nn.Parameter(_shard(p.detach(), dim, group).clone()), dim))


def _parallelize_memory(model, group) -> None:
    kind = model.memory
    name = kind.kind
    parts = [block.memory for block in model.blocks.values()]
    if name in ("xl", "lamemo", "infinity"):  # Transformer-XL's relative attention: u, v and r_net by heads
        for p in ("u_HK", "v_HK", "v_future_HK"):
            if hasattr(kind, p):
                _shard_parameter(kind, p, group)
        for part in parts:
            part.r_net = column(part.r_net, group)
    if name == "memformer":
        for read in parts:
            read.q, read.kv, read.out = column(read.q, group), column(read.kv, group), row(read.out, group)
        if kind.last:
            kind.write.q, kind.write.kv = column(kind.write.q, group), column(kind.write.kv, group)
            kind.write.tp_group = group
    elif name == "infinity":
        for part in parts:
            part.key, part.value = column(part.key, group), column(part.value, group)
            part.out = row(part.out, group)
            part.mu = ReplicatedInParallelRegion(part.mu, group)
            part.sigma = ReplicatedInParallelRegion(part.sigma, group)
            part.tp_group = group
    elif name not in ("none", "rmt", "armt", "xl", "lamemo"):  # armt: its memory projections are replicated
        raise NotImplementedError(f"tensor parallelism of memory kind {name!r}")


def parallelize(model: nn.Module, *, groups=None, tp_group=None) -> nn.Module:
    """Cut the plain `model` (a `MemoryTransformer`, whole or a pipeline stage) into this rank's TP shard, in place.

    `groups`: the `ParallelGroups` of `memscale.parallel.dims.init_distributed`, or `tp_group` alone. Every rank
    must pass a model built from the same seed (the plain weights are sliced, not redrawn). Head counts must
    divide by the TP size (`ParallelDims.validate` checks it), and so must the vocabulary. With one TP rank the
    model is left unchanged. Returns the model.
    """
    group = tp_group if tp_group is not None else groups.tp
    if group is None:
        raise ValueError("parallelize needs the tensor-parallel group (groups=... or tp_group=...)")
    _, n = _rank_size(group)
    if n == 1:
        return model
    if getattr(model, "tp_group", None) is not None:
        raise RuntimeError("model is already tensor-parallel")
    for block in model.blocks.values():
        attn = block.attn
        if attn.num_heads % n:
            raise ValueError(f"{attn.num_heads} heads do not split over {n} TP ranks")
        attn.qkv, attn.out = column(attn.qkv, group), row(attn.out, group)
        attn.dropout_rng = tracker_fork
        block.mlp.up, block.mlp.down = column(block.mlp.up, group), row(block.mlp.down, group)
    _parallelize_memory(model, group)

    tied = model.head is not None and model.embed is not None and model.head.weight is model.embed.weight
    if model.embed is not None:
        src = model.embed
        emb = VocabParallelEmbedding(
            src.num_embeddings, src.embedding_dim, init_method=_keep, config=_config(group), tp_group=group
        )
        with torch.no_grad():
            emb.weight.copy_(src.weight[emb.vocab_start_index : emb.vocab_end_index])
        _mark(emb.weight, 0)
        model.embed = emb.to(src.weight.device)
    if model.head is not None:
        V = model.head.weight.shape[0]
        r = dist.get_rank(group)
        per = V // n
        if V % n:
            raise ValueError(f"vocabulary {V} does not split over {n} TP ranks")
        if tied:
            weight = model.embed.weight
        else:
            weight = _mark(nn.Parameter(model.head.weight.detach()[r * per : (r + 1) * per].clone()), 0)
        head = VocabParallelHead(weight, vocab_start=r * per, vocab_size=V, tp_group=group)
        _copy_attrs(model.head, head)
        model.head = head
    model.tp_group = group
    return model


def gather_tensor_parallel(model: nn.Module, tensors: dict[str, Tensor], group) -> dict[str, Tensor]:
    """Full tensors from this rank's shards: `tensors` keyed by parameter name of `model` (its parameters, or their
    gradients), each all-gathered along its parameter's partition dimension; replicated ones are returned as is."""
    # Every name a state dict can hold: a tied head's second name, and buffers (never split).
    params = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    n = dist.get_world_size(group)
    for name, t in tensors.items():
        dim = partition_dim(params[name]) if name in params else None
        if dim is None or n == 1:
            out[name] = t
            continue
        parts = [torch.empty_like(t) for _ in range(n)]
        dist.all_gather(parts, t.contiguous(), group=group)
        out[name] = torch.cat(parts, dim=dim)
    return out
