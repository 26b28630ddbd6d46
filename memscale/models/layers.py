"""Building blocks of the decoder: attention with a fused QKV projection, MLP, pre-norm block.

Legend: B batch, S sequence inside the blocks, D model width, H heads, K head width.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_REFERENCE_ATTENTION = False


@contextlib.contextmanager
def reference_attention():
    """Within this block every attention of every kind runs as the plain formula (`reference_sdpa`) instead of
    `F.scaled_dot_product_attention`: the reference the fused kernels are tested against (tests/test_reference.py)."""
    global _REFERENCE_ATTENTION
    before, _REFERENCE_ATTENTION = _REFERENCE_ATTENTION, True
    try:
        yield
    finally:
        _REFERENCE_ATTENTION = before


def reference_attention_active() -> bool:
    """True inside `reference_attention()`: kinds with an attention kernel of their own take their reference path."""
    return _REFERENCE_ATTENTION


def reference_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """softmax(q k^T * scale + mask) v, materialising the logits, with SDPA's conventions: a boolean mask is
    True where attention is allowed, a float mask is added, is_causal is the top-left aligned lower triangle."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q @ k.transpose(-2, -1)).float() * scale
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.float()
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


def sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """The one entry to fused attention for every kind (so `reference_attention` swaps all of them at once)."""
    if _REFERENCE_ATTENTION:
        return reference_sdpa(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )


class Attention(nn.Module):
    """Multi-head self-attention; memory kinds reuse `project` / `attend` / `merge` to attend over their own keys.

    The fused projection's output rows are laid out per head, [H, 3, K] (head h's query, key and value rows are
    adjacent), so that a column-parallel split of `qkv` by rows gives each rank whole heads. The head count is
    read off the weight, never stored, so a split needs no bookkeeping here.
    """

    def __init__(self, d_model: int, num_heads: int, *, dropout: float = 0.0):
        super().__init__()
        self.head_dim = d_model // num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=True)  # one GEMM for q, k and v
        self.qkv.head_layout = (3, self.head_dim)  # rows [H, 3, K]; see `init_weights`
        self.out = nn.Linear(d_model, d_model, bias=True)
        self.out.residual_out = True
        self.dropout = dropout
        self.dropout_rng = contextlib.nullcontext
        """Context of the attention-probability dropout: none here; under tensor parallelism the RNG tracker's
        stream (each rank drops its own heads), set by memscale.parallel.tensor.parallelize."""

    @property
    def num_heads(self) -> int:
        """Heads held by this module (all of them, or a tensor-parallel rank's share)."""
        return self.qkv.weight.shape[0] // (3 * self.head_dim)

    def split_heads(self, x_BSD: Tensor) -> Tensor:
        B, S, _ = x_BSD.shape
        return x_BSD.view(B, S, -1, self.head_dim).transpose(1, 2)

    def project(self, h_BSD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h -> q, k, v, each B x H x S x K."""
        B, S, _ = h_BSD.shape
        qkv = self.qkv(h_BSD).view(B, S, -1, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)
        return q, k, v

    def merge(self, o_BHSK: Tensor) -> Tensor:
        """B x H x S x K -> output projection, B x S x D."""
        B, H, S, K = o_BHSK.shape
        return self.out(o_BHSK.transpose(1, 2).reshape(B, S, H * K))

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False
    ):
        p = self.dropout if self.training else 0.0
        with self.dropout_rng() if p else contextlib.nullcontext():
            return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal)

    def forward(self, h_BSD: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = True) -> Tensor:
        q, k, v = self.project(h_BSD)
        return self.merge(
            self.attend(q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None)
        )


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)
        self.down.residual_out = True

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block; its layer's part of the memory kind (`memory`) decides how attention sees the
    memory.

    `block(x_BSD, *ctx, *state) -> (x_BSD, *new_state)`: the per-segment tensors named by `context_names` and
    this layer's state named by `state_names` come in as explicit tensors, and the layer's new state goes out as
    explicit tensors, so that `torch.utils.checkpoint` can replay the block by itself. The kind's attention may
    return fewer rows than came in, the last ones (lamemo's last layer: its memory positions end there); the block
    then carries only those rows on.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        *,
        dropout: float,
        layer: int,
        memory: nn.Module | None = None,
    ):
        super().__init__()
        self.layer = layer
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, num_heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff)
        self.drop = nn.Dropout(dropout)
        self.memory = memory

    @property
    def context_names(self) -> tuple[str, ...]:
        return self.memory.context_names if self.memory is not None else ()

    @property
    def state_names(self) -> tuple[str, ...]:
        return self.memory.state_names if self.memory is not None else ()

    recompute: Literal["none", "full", "selective"] = "none"
    """Activation checkpointing of this block (`train.activation_checkpointing`): `MemoryTransformer.run_blocks`
    recomputes the whole block when "full"; with "selective" the block recomputes its attention sub-layer."""

    def forward(self, x_BSD: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        if self.recompute == "selective":
            a_BSD, *new_state = recomputed(self.attention_sublayer, x_BSD, *inputs)
        else:
            a_BSD, *new_state = self.attention_sublayer(x_BSD, *inputs)
        if a_BSD.shape[1] != x_BSD.shape[1]:
            # The kind's attention returned only the last rows: all that the model needs after this layer (lamemo's
            # last layer, whose memory positions `exit` would drop); the residual stream keeps those rows alone.
            x_BSD = x_BSD[:, x_BSD.shape[1] - a_BSD.shape[1] :]
        x_BSD = x_BSD + self.drop(a_BSD)
        if self.memory is not None:
            names = self.memory.context_names
            x_BSD = self.memory.after_attention(x_BSD, dict(zip(names, inputs[: len(names)], strict=True)))
        return (x_BSD + self.drop(self.mlp(self.norm2(x_BSD))), *new_state)

    def attention_sublayer(self, x_BSD: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        """Norm and attention (the kind's, with its memory): the attention output and the layer's new state."""
        h_BSD = self.norm1(x_BSD)
        if self.memory is None:
            return (self.attn(h_BSD, is_causal=True),)
        names = self.memory.context_names
        ctx = dict(zip(names, inputs[: len(names)], strict=True))
        state = dict(zip(self.memory.state_names, inputs[len(names) :], strict=True))
        a_BSD, new_state = self.memory.attention(self.attn, h_BSD, ctx, state)
        return (a_BSD, *new_state)


def recomputed(fn, *args: Tensor) -> tuple[Tensor, ...]:
    """`fn(*args)` under torch.utils.checkpoint (non-reentrant): only the inputs are kept, and backward runs `fn`
    again under the random streams of the first run.

    torch restores the CPU and CUDA generators itself; megatron-core's RNG tracker (attention dropout on a
    tensor-parallel rank's heads) is restored here, which its own `tensor_parallel.checkpoint` does only in its
    reentrant form (one backward per forward: replay's several roots and ZeRO's hooks need the non-reentrant one).
    """
    from torch.utils.checkpoint import checkpoint

    from memscale.parallel.random import set_tracker_states, tracker_states

    first = tracker_states()
    runs = [0]

    def body(*a: Tensor):
        runs[0] += 1
        if runs[0] == 1 or not first:
            return fn(*a)
        current = tracker_states()
        set_tracker_states(first)
        try:
            return fn(*a)
        finally:
            set_tracker_states(current)

    return checkpoint(body, *args, use_reentrant=False, preserve_rng_state=True)


# -- parameter roles -------------------------------------------------------------------------------------------
ParamRole = Literal["matrix", "bias", "norm", "embedding", "vector"]
"""What a parameter is, from the module that holds it (never from its name):
matrix: the weight of a projection (nn.Linear), memory projections included;
bias: a projection's bias; norm: a LayerNorm gain or bias; embedding: a token or position table (nn.Embedding);
vector: a learned tensor held directly by a memory module (initial memory, memory position embeddings, per-head
attention biases, the forgetting bias)."""


def param_role(module: nn.Module, name: str) -> ParamRole:
    """The role of `module`'s own parameter `name`; a module may declare it (`module.param_role`, e.g. an output
    projection that is tied to the token embedding), or declare all of its own (`module.param_roles`, a dict by
    name: the tensor-parallel layers of memscale/parallel/tensor.py)."""
    declared_all = getattr(module, "param_roles", None)
    if declared_all is not None and name in declared_all and getattr(module, "param_role", None) is None:
        return declared_all[name]
    declared = getattr(module, "param_role", None)
    if declared is not None and name == "weight":
        return declared
    if isinstance(module, nn.LayerNorm):
        return "norm"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "matrix" if name == "weight" else "bias"
    # megatron-core's tensor-parallel layers (memscale/parallel/tensor.py) are not nn.Linear / nn.Embedding. Looked
    # up only when megatron-core is already imported: a single-process run never pays for that import.
    mcore = sys.modules.get("megatron.core.tensor_parallel.layers")
    if mcore is not None:
        if isinstance(module, (mcore.ColumnParallelLinear, mcore.RowParallelLinear)):
            return "matrix" if name == "weight" else "bias"
        if isinstance(module, mcore.VocabParallelEmbedding):
            return "embedding"
    return "vector"


def param_roles(model: nn.Module) -> dict[nn.Parameter, ParamRole]:
    """Every parameter of `model` (each once, tied ones included) with its role."""
    roles: dict[nn.Parameter, ParamRole] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            roles.setdefault(p, param_role(module, name))
    return roles


def init_weights(params, *, num_layers: int) -> None:
    """GPT-2 initialisation by role, over `(module, name)` pairs in the order given (the order of the draws):

    matrices, embeddings and memory vectors N(0, 0.02), the residual output projections (a Linear marked
    `residual_out`) N(0, 0.02 / sqrt(2 L)); biases 0; norms gain 1, bias 0. A Linear marked `head_layout = (G, K)`
    (rows laid out per head, [H, G, K]) draws its numbers in the stacked order [G, H, K] and stores them per head,
    so that the per-head layout holds the same initial function as the stacked one.
    """
    with torch.no_grad():
        for module, name in params:
            p = getattr(module, name)
            role = param_role(module, name)
            if role == "norm":
                nn.init.ones_(p) if name == "weight" else nn.init.zeros_(p)
            elif role == "bias":
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * num_layers) if getattr(module, "residual_out", False) else 0.02
                layout = getattr(module, "head_layout", None) if role == "matrix" else None
                if layout is not None:
                    groups, head_dim = layout
                    out, d_in = p.shape
                    stacked = p.new_empty(groups, out // (groups * head_dim), head_dim, d_in)
                    nn.init.normal_(stacked, mean=0.0, std=std)
                    p.copy_(stacked.transpose(0, 1).reshape(out, d_in))
                else:
                    nn.init.normal_(p, mean=0.0, std=std)
