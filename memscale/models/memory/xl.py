"""Transformer-XL memory (Dai et al., 2019), after kimiyoung/transformer-xl `pytorch/mem_transformer.py`
(`RelPartialLearnableMultiHeadAttn`, attn_type 0, the official default).

Each layer caches the hidden states that entered it over the last M positions; the segment's queries attend over
[memory; segment] with relative positions (paper §3.3, the decomposition of A^rel_{i,j}):

    score(i, j) = (q_i + u)^T k_j  +  (q_i + v)^T W_r R_{i-j}         AC = terms (a)+(c), BD = terms (b)+(d)

R is the sinusoid of the distance i - j (clamped at `clamp_len`, `PositionalEmbedding` + `pos_seq.clamp_`), W_r a
per-layer projection without bias (`r_net`), u and v learned biases that all layers share (`r_w_bias`, `r_r_bias`
live on `MemTransformerLM`; the TF code unties them only with --untie_r, default False). BD is computed
for every distance once and moved into place by `rel_shift` (paper appendix B). The new memory is the last M rows
of cat(old memory, this segment's layer inputs), detached (`_update_mems`).

Three paths compute that attention (`model.attention`): `fused`, the blockwise kernel of
memscale/kernels/relative_attention.py (no T x C score matrix, BD per query block from a band of distances, the
memory rows projected to keys and values only); `flex`, the GPU path, FlexAttention with BD read by a score
modification (memscale/kernels/flex_relative_attention.py, same projections); `reference`, the official formula
above with `rel_shift` and SDPA given BD + mask as a float mask. They agree to fp32 rounding
(tests/test_relative_attention.py, tests/test_flex_relative_attention.py, tests/test_gpu.py); attention dropout
always takes the reference path.

What is cached. The official pre-norm layer computes `qkv_net(layer_norm(cat(mems, w)))` with `mems` the raw layer
inputs; our Block hands the hook h = norm1(x), already normed. LayerNorm acts on each position alone, so caching h
gives exactly the keys and values of one long forward over the concatenated segments (the test pins this); the
only difference is in training, where the official code re-normalises the old x with the current LayerNorm
weights while we keep the normalisation of the step that cached it. The cached rows are stale by one optimizer
step either way (x itself is), and keys/values are still recomputed from h with the current q/k/v weights.

Differences from the official code, both from the shared Block: it is pre-norm (official default post-norm,
pre_lnorm=False) and its q/k/v and output projections have biases (official bias-free). `ext_len` (0 by default)
is not carried over.

State, fixed shapes and batch first so that a reset, a pipeline stage or a checkpoint sees plain tensors:
    mem.l [B, M, D]  layer l's normed inputs of the last M positions, oldest first (new rows enter on the right)
    valid [B, M]     which slots hold a position of the current document (False after a reset or at the start);
                     invalid slots are masked out of attention, so an empty memory is the official `mems=[]`.
                     The same for every layer: each pipeline stage holds and updates its own copy.

Where the parameters live: each layer's `r_net` in its block (`RelativeLayer`); u and v, which all layers share,
in the kind (`model.memory`), handed to the layers as explicit tensors every segment. One parameter, not one per
layer: untying them would leave the official default (and change training). Under pipeline parallelism every
stage holds a replica, and the parallel runtime sums their gradients over the stages (as Megatron does for an
embedding tied to the head).

Legend: B batch, T segment tokens, M memory positions, C = M + T keys, D width, H heads, K head width, L layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memscale.kernels.flex_relative_attention import flex_relative_attention
from memscale.kernels.relative_attention import relative_attention
from memscale.models.layers import reference_attention_active
from memscale.models.memory.base import LayerMemory, MemoryKind, MemoryState, layer_state_name


def sinusoid(dist_C: Tensor, d_model: int) -> Tensor:
    """Sinusoidal embedding of relative distances, [sin | cos] halves (`PositionalEmbedding`), C x D float32."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0, device=dist_C.device) / d_model))
    angle_CD = dist_C.float()[:, None] * inv_freq[None, :]
    return torch.cat([angle_CD.sin(), angle_CD.cos()], dim=-1)


def clamp_distances(dist_C: Tensor, clamp_len: int) -> Tensor:
    """Distances beyond `clamp_len` share its embedding; clamp_len <= 0 disables it, as in the official code."""
    return dist_C.clamp(max=clamp_len) if clamp_len > 0 else dist_C


def rel_shift(bd_BHTC: Tensor) -> Tensor:
    """Column c of the input scores distance C-1-c; after the shift, entry (i, j) scores distance M + i - j.

    The pad-and-reshape trick of `_rel_shift` (paper appendix B) on batch-first scores: prepending a zero column
    and re-reading the rows with length T shifts row i left by T-1-i. Entries with j > M + i (the future) hold
    other rows' values and must be masked.
    """
    B, H, T, C = bd_BHTC.shape
    padded = F.pad(bd_BHTC, (1, 0))  # B x H x T x (C+1)
    return padded.view(B, H, C + 1, T)[:, :, 1:].reshape(B, H, T, C)


def causal_mask(valid_BM: Tensor, T: int, *, same_length: bool, dtype: torch.dtype) -> Tensor:
    """Additive B x 1 x T x C mask over [memory; segment]: 0 where query i may attend key j, -inf elsewhere.

    A key is visible if it is valid, not in the future (j <= M + i) and, with `same_length`, closer than M (the
    official `same_length` mask: each query sees exactly the last mem_len positions, itself included).
    """
    B, M = valid_BM.shape
    device = valid_BM.device
    dist_TC = (M + torch.arange(T, device=device))[:, None] - torch.arange(M + T, device=device)[None, :]
    ok_TC = dist_TC >= 0
    if same_length:
        ok_TC = ok_TC & (dist_TC < M)
    key_valid_BC = torch.cat([valid_BM, valid_BM.new_ones(B, T)], dim=1)
    ok_BTC = ok_TC[None] & key_valid_BC[:, None, :]
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(ok_BTC, zero, torch.tensor(float("-inf"), dtype=dtype, device=device))[:, None]


def slide(old_BxMx: Tensor, new_BxTx: Tensor, *, dim: int) -> Tensor:
    """Last M rows (along `dim`) of cat(old, new): the FIFO update of `_update_mems`, at a fixed size M."""
    M = old_BxMx.shape[dim]
    return torch.cat([old_BxMx, new_BxTx.to(old_BxMx.dtype)], dim=dim).narrow(dim, -M, M)


def relative_positions(dist_C: Tensor, d_model: int, *, dropout: float, training: bool, dtype) -> Tensor:
    """The step's relative-position sinusoids, with dropout drawn once for all layers (`self.drop(pos_emb)`).

    The rate is the attention's, which the model builds from `model.dropout`, the official `dropout`. Under
    pipeline parallelism each stage draws its own mask for its layers.
    """
    return F.dropout(sinusoid(dist_C, d_model).to(dtype), dropout, training)


def relative_kernel(flex: bool):
    """The fused relative attention of `model.attention`: FlexAttention (flex, the GPU path) or the blockwise
    kernel (fused). Both take the same arguments and return (o, lse)."""
    return flex_relative_attention if flex else relative_attention


def use_fused(layer: LayerMemory, attn: nn.Module) -> bool:
    """Whether `layer` runs the blockwise kernel: `model.attention=fused`, outside `reference_attention()`, and no
    attention dropout this step (the kernel has none; the reference path draws it as before)."""
    p_drop = attn.dropout if layer.training else 0.0
    return layer.fused and not p_drop and not reference_attention_active()


def project_kv(attn: nn.Module, x_BSD: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values of rows that ask no query (cached memory): the key and value rows of the fused projection
    only. A tensor-parallel projection (not an nn.Linear) projects all three and drops the queries."""
    if type(attn.qkv) is not nn.Linear:
        return attn.project(x_BSD)[1:]
    B, S, _ = x_BSD.shape
    K = attn.head_dim
    w_HGKD = attn.qkv.weight.view(-1, 3, K, x_BSD.shape[-1])[:, 1:]
    b_HGK = attn.qkv.bias.view(-1, 3, K)[:, 1:]
    kv = F.linear(x_BSD, w_HGKD.reshape(-1, x_BSD.shape[-1]), b_HGK.reshape(-1)).view(B, S, -1, 2, K)
    k, v = kv.permute(3, 0, 2, 1, 4).unbind(0)
    return k, v


class RelativeLayer(LayerMemory):
    """A layer of Transformer-XL: relative attention over [its cached inputs; segment]."""

    context_names = ("mask", "pos", "u", "v", "valid")
    state_names = ("mem",)

    def __init__(self, d_model: int, *, fused: bool = True, flex: bool = False, same_length: bool = False):
        super().__init__()
        self.r_net = nn.Linear(d_model, d_model, bias=False)
        self.fused = fused
        """`model.attention` is fused or flex: a fused kernel, not the reference formula."""
        self.flex = flex
        """`model.attention == "flex"`: FlexAttention (memscale/kernels/flex_relative_attention.py), else the
        blockwise kernel (memscale/kernels/relative_attention.py)."""
        self.same_length = same_length

    def attention(self, attn, h_BTD, ctx, state):
        out_BTD, _ = xl_attention(
            attn,
            self.r_net,
            h_BTD,
            state["mem"],
            ctx,
            fused=use_fused(self, attn),
            flex=self.flex,
            same_length=self.same_length,
        )
        return out_BTD, (slide(state["mem"], h_BTD.detach(), dim=1).detach(),)


def xl_attention(
    attn: nn.Module,
    r_net: nn.Module,
    h_BTD: Tensor,
    mem_BMD: Tensor,
    ctx: dict[str, Tensor],
    *,
    fused: bool,
    flex: bool = False,
    same_length: bool = False,
) -> tuple[Tensor, Tensor]:
    """Relative attention of the segment over [memory; segment] (`RelPartialLearnableMultiHeadAttn.forward`):
    the output B x T x D (after the output projection) and the segment's queries q B x H x T x K (without u).

    `ctx` holds the additive `mask` (`causal_mask`), the key validity `valid` of the memory rows, the sinusoids
    `pos` of the M + T distances and the biases `u`, `v`; `r_net` is the layer's position projection W_r.
    `fused`: a fused kernel (FlexAttention with `flex`, else the blockwise kernel), else the official formula.
    """
    M, K = mem_BMD.shape[1], attn.head_dim
    mem_BMD = mem_BMD.to(h_BTD.dtype)
    u_HK, v_HK = ctx["u"], ctx["v"]
    pos_CD = ctx["pos"]
    r_CHK = r_net(pos_CD).view(pos_CD.shape[0], -1, K)
    if fused:
        # The memory rows need keys and values only, and no input gradient (they are detached): projected
        # apart from the segment's rows, which saves a third of their projection and all of its backward.
        q_BHTK, k_BHTK, v_BHTK = attn.project(h_BTD)
        k_BHMK, v_BHMK = project_kv(attn, mem_BMD)
        k_BHCK, v_BHCK = torch.cat([k_BHMK, k_BHTK], dim=2), torch.cat([v_BHMK, v_BHTK], dim=2)
        # Query i (block position M + i) and key j are M + i - j apart: shift M; r_CHK is already in the
        # kernel's descending order (distances C-1 .. 0). The mask is rebuilt from `valid` per block.
        B, T = h_BTD.shape[:2]
        key_valid_BC = torch.cat([ctx["valid"], ctx["valid"].new_ones(B, T)], dim=1)
        o_BHTK, _ = relative_kernel(flex)(
            q_BHTK + u_HK[:, None],
            q_BHTK + v_HK[:, None],
            k_BHCK,
            v_BHCK,
            r_CHK,
            shift=M,
            window=M if same_length else 0,
            key_valid_BN=key_valid_BC,
            return_lse=False,
        )
        return attn.merge(o_BHTK), q_BHTK
    # Like the official code, q/k/v come from one fused projection of cat(mem, h); memory queries are dropped.
    q_BHCK, k_BHCK, v_BHCK = attn.project(torch.cat([mem_BMD, h_BTD], dim=1))
    q_BHTK = q_BHCK[:, :, M:]
    bd_BHTC = rel_shift(torch.einsum("bhtk,chk->bhtc", q_BHTK + v_HK[:, None], r_CHK))
    # SDPA computes softmax(q'k^T * scale + mask) v; with q' = q + u and BD * scale folded into the additive
    # mask, that is softmax((AC + BD) * scale) exactly (same 1/sqrt(K) scale as `self.scale`).
    bias_BHTC = bd_BHTC * K**-0.5 + ctx["mask"]
    o_BHTK = attn.attend(q_BHTK + u_HK[:, None], k_BHCK, v_BHCK, attn_mask=bias_BHTC)
    return attn.merge(o_BHTK), q_BHTK


class TransformerXLMemory(MemoryKind):
    kind = "xl"
    topology = "per_layer"
    carries_grad = False
    absolute_positions = False

    def __init__(self, **kw):
        super().__init__(**kw)
        D, H = self.d_model, self.num_heads
        self.mem_len = self.cfg.mem_len or self.segment_len
        fused, flex, same = self.attention != "reference", self.attention == "flex", self.cfg.same_length
        self._layer_parts = [RelativeLayer(D, fused=fused, flex=flex, same_length=same) for _ in self.layers]
        self.u_HK = nn.Parameter(torch.empty(H, D // H))  # r_w_bias: content bias, shared by all layers
        self.v_HK = nn.Parameter(torch.empty(H, D // H))  # r_r_bias: position bias, shared by all layers
        self.reset_parameters(self._layer_parts)

    def reset_parameters(self, parts) -> None:
        # train.py `weights_init`: Linear weights and r_w_bias / r_r_bias ~ N(0, init_std = 0.02).
        for p in (*(part.r_net.weight for part in parts), self.u_HK, self.v_HK):
            nn.init.normal_(p, std=0.02)

    # -- state ------------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device, dtype) -> MemoryState:
        M, D = self.mem_len, self.d_model
        mems = {
            layer_state_name("mem", layer): torch.zeros(batch_size, M, D, device=device, dtype=dtype)
            for layer in self.layers
        }
        return MemoryState({**mems, "valid": torch.zeros(batch_size, M, dtype=torch.bool, device=device)})

    # -- hooks --------------------------------------------------------------------------------------------------
    def begin(self, state, *, num_tokens, device, dtype):
        T, M = num_tokens, self.mem_len
        valid_BM = state["valid"]
        B = valid_BM.shape[0]
        # Keys sit at distances C-1 .. 0 from the last query (`pos_seq = arange(klen-1, -1, -1)`).
        dist_C = clamp_distances(torch.arange(M + T - 1, -1, -1, device=device), self.cfg.clamp_len)
        ctx = {
            "mask": causal_mask(valid_BM, T, same_length=self.cfg.same_length, dtype=dtype),
            "pos": relative_positions(
                dist_C, self.d_model, dropout=self.dropout, training=self.training, dtype=dtype
            ),
            "u": self.u_HK,
            "v": self.v_HK,
            "valid": valid_BM,
        }
        return ctx, {"valid": slide(valid_BM, valid_BM.new_ones(B, T), dim=1)}

    def mean_attended_len(self, segment_len: int) -> float:
        # With a full memory a query sees M cached positions plus its causal past, or exactly M with same_length.
        if self.cfg.same_length:
            return float(self.mem_len)
        return self.mem_len + (segment_len + 1) / 2
