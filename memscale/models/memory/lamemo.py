"""Look-Ahead Memory, LaMemo (Ji et al., NAACL 2022), after thu-coai/LaMemo `pytorch/mem_transformer.py`
(`LaMemoRelPartialLearnableMultiHeadAttn` with attn_type 3, the paper's default configuration).

The memory positions go through every block again together with the segment, so that their states are refreshed
with the new context (the official layer runs `pos_ff` on cat(memory, segment) and passes the refreshed memory to
the next layer; after the last layer's attention only the segment's rows go on, as nothing reads the memory's).
Per layer:

  * segment tokens attend causally over [memory; segment] with Transformer-XL's relative attention (xl.py);
  * memory position r looks ahead: it attends to the keys on its right that it has not seen yet, the window of
    the last min(M, T) positions ending at the segment's first token (paper, "Look-Ahead Attention": the keys
    X~_{tau-1} = [x_{tau-N+2} .. x_{tau+1}]; the code's `w_head_k[beg : -qlen + 1]`). Looking no further than
    the first token keeps the model autoregressive: every segment token reads the refreshed memory. Positions up
    to the previous segment's first token were covered by earlier look-aheads or by the position's own causal
    attention, so the windows tile without overlap;
  * memory interpolation (paper, "Memory Interpolation"; the code's `alpha`): with d_old the log-normaliser of
    everything the position attended to before and d_new that of the look-ahead,

        C = a * C_old + (1 - a) * C_new,   a = e^d_old / (e^d_old + e^d_new) = sigmoid(d_old - d_new),

    which is exactly one softmax over [old keys; new keys]; the state keeps logaddexp(d_old, d_new), in float32.

Both attentions run by the blockwise kernel (memscale/kernels/relative_attention.py, `model.attention=fused`) or
FlexAttention (`flex`, the GPU path), which also return the log-normalisers, or by the official formula with
materialised scores and a hand softmax (`reference`); see `LookAheadLayer.attend_fused` for how the look-ahead becomes a causal attention.

Disentangled relative positions (paper eq. 12, attn_type 3): future distances use the same sinusoid of |i - j|
and the same per-layer `r_net` as past ones, and only the position bias tells the direction apart: v (`r_r_bias`)
for the past, v_future (`r_r_bias_future`) for the future; the content bias u (`r_w_bias`) serves both. u, v and
v_future are shared by all layers, as in the official code.

State, fixed shapes and batch first (the official list `[emb, recur_1, denom_1, ...]` at a fixed size M):
    emb       [B, M, D]  layer-0 input (embeddings after dropout) of the memory positions, FIFO as in XL; the
                         first stage's
    attn.l    [B, M, D]  layer l's per-head attention vectors (before the output projection) of the memory
                         positions (H x K, so a split of the heads splits it)
    lognorm.l [B, M, H]  float32 log-normaliser of each of layer l's heads, d_old above
    valid     [B, M]     which slots hold a position of the current document; invalid slots are masked as keys,
                         get no interpolation (a = 0) and are stored as zeros; every stage holds its own copy

Where the parameters live: each layer's `r_net` in its block (`LookAheadLayer`); u, v and v_future, shared by all
layers as in the official code, in the kind, handed to the layers as explicit tensors (see xl.py for why one
parameter rather than per-layer copies).
Everything is detached (`.detach()` on `new_recur_mems`, `new_denom` and in `_update_mems`). With M = T (the
official scripts: tgt_len = mem_len = 150) the interpolated rows are used within the step and then replaced by
the segment's own causal rows; with M > T a position is refreshed by several look-aheads and the normaliser
accumulates.

Differences from the official code, both from the shared Block (as in xl.py): the block is pre-norm (official
default post-norm) and its projections have biases (official bias-free); memory tokens take the same path.

Legend: B batch, T segment tokens, M memory positions, S = M + T positions in the blocks, W = min(M, T) look-ahead
keys, D width, H heads, K head width, L layers.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memscale.models.memory.base import LayerMemory, MemoryKind, MemoryState, layer_state_name
from memscale.models.memory.xl import (
    causal_mask,
    clamp_distances,
    rel_shift,
    relative_kernel,
    relative_positions,
    slide,
    use_fused,
)


def rel_shift_future(bd_BHMM: Tensor) -> Tensor:
    """Column d of the input scores future distance d+1; after the shift, entry (r, c) with c >= r scores distance
    c + 1 - r, the key at block position c + 1 (`_rel_shift_future`: append a zero column, re-read rows of M).

    Entries with c < r hold other rows' values and must be masked.
    """
    B, H, M, _ = bd_BHMM.shape
    padded = F.pad(bd_BHMM, (0, 1))  # B x H x M x (M+1)
    return padded.view(B, H, M + 1, M)[:, :, :-1]


def look_ahead_mask(valid_BM: Tensor, T: int, *, dtype: torch.dtype) -> Tensor:
    """Additive B x 1 x M x W mask: memory query r sees window key j (block positions M-W+1 .. M) iff j > r."""
    B, M = valid_BM.shape
    W = min(M, T)
    device = valid_BM.device
    key_W = torch.arange(M - W + 1, M + 1, device=device)
    ok_MW = key_W[None, :] > torch.arange(M, device=device)[:, None]
    key_valid_BW = torch.cat([valid_BM, valid_BM.new_ones(B, 1)], dim=1)[:, M - W + 1 :]
    ok_BMW = ok_MW[None] & key_valid_BW[:, None, :]
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(ok_BMW, zero, torch.tensor(float("-inf"), dtype=dtype, device=device))[:, None]


def softmax_attend(logits_BHQX: Tensor, v_BHXK: Tensor, *, dropout: float) -> tuple[Tensor, Tensor]:
    """softmax(logits) v over the X keys, and the float32 log-normaliser logsumexp(logits) the interpolation needs.

    A manual softmax rather than SDPA, which does not return its normaliser.
    """
    lse_BHQ = torch.logsumexp(logits_BHQX.float(), dim=-1)
    probs_BHQX = torch.exp(logits_BHQX.float() - lse_BHQ[..., None]).to(v_BHXK.dtype)
    if dropout:
        probs_BHQX = F.dropout(probs_BHQX, dropout)  # `dropatt`
    return probs_BHQX @ v_BHXK, lse_BHQ


class LookAheadLayer(LayerMemory):
    """A layer of LaMemo: causal relative attention of the segment, look-ahead and interpolation of the memory."""

    context_names = ("mask", "ahead_mask", "pos", "u", "v", "v_future", "valid", "valid_next")
    state_names = ("attn", "lognorm")
    head_sharded_state = ("attn", "lognorm")

    def __init__(
        self,
        d_model: int,
        *,
        fused: bool = True,
        flex: bool = False,
        same_length: bool = False,
        last: bool = False,
    ):
        super().__init__()
        self.r_net = nn.Linear(d_model, d_model, bias=False)
        self.last = last
        """The model's last layer: its output is the segment rows alone. The memory positions' rows would go
        through the output projection and the MLP only to be dropped by `exit` (their state, `attn.l`, is taken
        before the projection), so they stop here: 16 of lamemo's 441 executed MFLOP per token at the default
        shape (M = T, 8 layers), forward and backward."""
        self.fused = fused
        """`model.attention` is fused or flex: a fused kernel, not the reference formula."""
        self.flex = flex
        """`model.attention == "flex"`: FlexAttention, else the blockwise kernel (as in xl.py)."""
        self.same_length = same_length

    def attend_fused(self, q_BHSK, k_BHSK, v_BHSK, r_past_SHK, r_future_MHK, ctx, M):
        """Both attentions of the layer by the blockwise kernel: (o, lse) of the segment and of the look-ahead.

        Segment: as Transformer-XL (xl.py), shift M. Look-ahead: in the reference, memory row r and window key w
        (block position M-W+1+w) score future distance M-W+1+w-r with table row M-W+w-r and are visible iff that
        is >= 0. With both orders reversed (r' = M-1-r, w' = W-1-w) the row is r' - w': a causal relative
        attention with shift 0 over the table in descending order, which is r_future reversed.
        """
        B = q_BHSK.shape[0]
        T = q_BHSK.shape[2] - M
        W = min(M, T)
        u_HK, v_HK, v_future_HK = ctx["u"][:, None], ctx["v"][:, None], ctx["v_future"][:, None]
        valid_BM = ctx["valid"]
        q_BHTK = q_BHSK[:, :, M:]
        kernel = relative_kernel(self.flex)
        o_BHTK, lse_BHT = kernel(
            q_BHTK + u_HK,
            q_BHTK + v_HK,
            k_BHSK,
            v_BHSK,
            r_past_SHK,
            shift=M,
            window=M if self.same_length else 0,
            key_valid_BN=torch.cat([valid_BM, valid_BM.new_ones(B, T)], dim=1),
        )
        q_rev_BHMK = q_BHSK[:, :, :M].flip(2)
        window = slice(M - W + 1, M + 1)
        key_valid_BW = torch.cat([valid_BM, valid_BM.new_ones(B, 1)], dim=1)[:, window]
        ahead_rev_BHMK, lse_rev_BHM = kernel(
            q_rev_BHMK + u_HK,
            q_rev_BHMK + v_future_HK,
            k_BHSK[:, :, window].flip(2),
            v_BHSK[:, :, window].flip(2),
            r_future_MHK.flip(0),
            shift=0,
            key_valid_BN=key_valid_BW.flip(1),
        )
        return o_BHTK, lse_BHT, ahead_rev_BHMK.flip(2), lse_rev_BHM.flip(2)

    def attention(self, attn, h_BSD, ctx, state):
        M, K = state["attn"].shape[1], attn.head_dim
        T = h_BSD.shape[1] - M
        p_drop = attn.dropout if self.training else 0.0
        q_BHSK, k_BHSK, v_BHSK = attn.project(h_BSD)
        pos_CD = ctx["pos"]
        r_CHK = self.r_net(pos_CD).view(pos_CD.shape[0], -1, K)
        r_past_SHK, r_future_MHK = r_CHK[: M + T], r_CHK[M + T :]

        if use_fused(self, attn):
            o_BHTK, lse_BHT, ahead_BHMK, lse_new_BHM = self.attend_fused(
                q_BHSK, k_BHSK, v_BHSK, r_past_SHK, r_future_MHK, ctx, M
            )
        else:
            o_BHTK, lse_BHT, ahead_BHMK, lse_new_BHM = self.attend_reference(
                q_BHSK, k_BHSK, v_BHSK, r_past_SHK, r_future_MHK, ctx, M, attn.dropout_rng, p_drop
            )
        return self.interpolate(attn, o_BHTK, lse_BHT, ahead_BHMK, lse_new_BHM, ctx, state)

    def attend_reference(self, q_BHSK, k_BHSK, v_BHSK, r_past_SHK, r_future_MHK, ctx, M, dropout_rng, p_drop):
        """Both attentions of the layer as the official code computes them (materialised scores, `rel_shift`)."""
        T = q_BHSK.shape[2] - M
        W = min(M, T)
        scale = q_BHSK.shape[-1] ** -0.5
        u_HK, v_HK, v_future_HK = ctx["u"], ctx["v"], ctx["v_future"]
        # Segment tokens: causal relative attention over [memory; segment], as in Transformer-XL.
        q_BHTK = q_BHSK[:, :, M:]
        ac_BHTS = torch.einsum("bhtk,bhsk->bhts", q_BHTK + u_HK[:, None], k_BHSK)
        bd_BHTS = rel_shift(torch.einsum("bhtk,shk->bhts", q_BHTK + v_HK[:, None], r_past_SHK))
        logits_BHTS = (ac_BHTS + bd_BHTS) * scale + ctx["mask"]
        # Dropout of the attention's own heads: a tensor-parallel region (the RNG tracker's stream) when split.
        with dropout_rng() if p_drop else contextlib.nullcontext():
            o_BHTK, lse_BHT = softmax_attend(logits_BHTS, v_BHSK, dropout=p_drop)

        # Memory: look ahead to the window of keys at block positions M-W+1 .. M.
        q_BHMK = q_BHSK[:, :, :M]
        k_BHWK, v_BHWK = k_BHSK[:, :, M - W + 1 : M + 1], v_BHSK[:, :, M - W + 1 : M + 1]
        ac_BHMW = torch.einsum("bhmk,bhwk->bhmw", q_BHMK + u_HK[:, None], k_BHWK)
        bd_BHMM = rel_shift_future(
            torch.einsum("bhmk,dhk->bhmd", q_BHMK + v_future_HK[:, None], r_future_MHK)
        )
        logits_BHMW = (ac_BHMW + bd_BHMM[..., M - W :]) * scale + ctx["ahead_mask"]
        with dropout_rng() if p_drop else contextlib.nullcontext():
            ahead_BHMK, lse_new_BHM = softmax_attend(logits_BHMW, v_BHWK, dropout=p_drop)
        return o_BHTK, lse_BHT, ahead_BHMK, lse_new_BHM

    def interpolate(self, attn, o_BHTK, lse_BHT, ahead_BHMK, lse_new_BHM, ctx, state):
        """The memory's interpolation with its old attention, the layer's output and its next state."""
        M = state["attn"].shape[1]

        # Interpolation with the old memory by the softmax normalisers, in float32 (the official code mixes with a
        # float32 alpha too). sigmoid(d_old - d_new) is e^d_old / (e^d_old + e^d_new) without the official
        # max-subtraction and eps = 1e-6, which only guarded both normalisers being zero: the first segment
        # token is always a visible key, so d_new is finite, and invalid slots get a = 0 by the mask instead.
        lse_old_BHM = state["lognorm"].transpose(1, 2)
        valid_B1M = ctx["valid"][:, None]
        a_BHM1 = torch.where(valid_B1M, torch.sigmoid(lse_old_BHM - lse_new_BHM), 0.0)[..., None]
        old_BHMK = attn.split_heads(state["attn"]).float()
        mem_BHMK = (a_BHM1 * old_BHMK + (1 - a_BHM1) * ahead_BHMK.float()).to(o_BHTK.dtype)

        o_BHSK = torch.cat([mem_BHMK, o_BHTK], dim=2)
        # This layer's next state: the last M positions of [memory; segment] (`new_recur_mems`, `new_denom`).
        # Slots still empty after this segment keep the initial zeros, so a row's state depends only on its
        # document (a reset row matches a fresh one, and checkpoints hold no stale values).
        lse_BHS = torch.cat([torch.logaddexp(lse_old_BHM, lse_new_BHM), lse_BHT], dim=2)
        keep_BM1 = ctx["valid_next"][..., None]
        attn_BMD = o_BHSK[:, :, -M:].transpose(1, 2).flatten(2).detach()
        lognorm_BMH = lse_BHS[:, :, -M:].transpose(1, 2).detach()
        new = (
            torch.where(keep_BM1, attn_BMD, 0.0).to(state["attn"].dtype),
            torch.where(keep_BM1, lognorm_BMH, 0.0),
        )
        return attn.merge(o_BHTK if self.last else o_BHSK), new


class LookAheadMemory(MemoryKind):
    kind = "lamemo"
    topology = "per_layer"
    carries_grad = False
    absolute_positions = False

    def __init__(self, **kw):
        super().__init__(**kw)
        D, H = self.d_model, self.num_heads
        self.mem_len = self.cfg.mem_len or self.segment_len
        fused, flex, same = self.attention != "reference", self.attention == "flex", self.cfg.same_length
        self._layer_parts = [
            LookAheadLayer(D, fused=fused, flex=flex, same_length=same, last=layer == self.num_layers - 1)
            for layer in self.layers
        ]
        self.u_HK = nn.Parameter(torch.empty(H, D // H))  # r_w_bias: content bias, past and future
        self.v_HK = nn.Parameter(torch.empty(H, D // H))  # r_r_bias: position bias towards the past
        # r_r_bias_future: position bias towards the future (the "disentangled" direction term, eq. 12)
        self.v_future_HK = nn.Parameter(torch.empty(H, D // H))
        self.reset_parameters(self._layer_parts)

    def reset_parameters(self, parts) -> None:
        # train_ddp.py `weights_init` redraws Linear weights, r_w_bias and r_r_bias from N(0, 0.02); it does not
        # touch r_r_bias_future, which keeps the Xavier-uniform draw of `MemTransformerLM._create_params`.
        for p in (*(part.r_net.weight for part in parts), self.u_HK, self.v_HK):
            nn.init.normal_(p, std=0.02)
        nn.init.xavier_uniform_(self.v_future_HK)

    # -- state ------------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device, dtype) -> MemoryState:
        # The per-head state has the heads this model holds, read off its per-head bias (all of them, or a
        # tensor-parallel rank's share): attn.l is H x K wide, lognorm.l H.
        B, M, D = batch_size, self.mem_len, self.d_model
        H, HK = self.u_HK.shape[0], self.u_HK.numel()
        tensors = {}
        if self.first:
            tensors["emb"] = torch.zeros(B, M, D, device=device, dtype=dtype)
        for layer in self.layers:
            tensors[layer_state_name("attn", layer)] = torch.zeros(B, M, HK, device=device, dtype=dtype)
        for layer in self.layers:
            tensors[layer_state_name("lognorm", layer)] = torch.zeros(
                B, M, H, device=device, dtype=torch.float32
            )
        tensors["valid"] = torch.zeros(B, M, dtype=torch.bool, device=device)
        return MemoryState(tensors)

    # -- hooks --------------------------------------------------------------------------------------------------
    def enter(self, x_BTD: Tensor, state: MemoryState) -> tuple[Tensor, dict[str, Tensor]]:
        emb_BMD = state["emb"].to(x_BTD.dtype)
        return torch.cat([emb_BMD, x_BTD], dim=1), {"emb": slide(emb_BMD, x_BTD.detach(), dim=1)}

    def begin(self, state, *, num_tokens, device, dtype):
        T, M = num_tokens, self.mem_len
        valid_BM = state["valid"]
        B = valid_BM.shape[0]
        # Past distances S-1 .. 0 then future distances 1 .. M, one sinusoid table (`cat([pos_seq, pos_seq_fut])`).
        dist_past = torch.arange(M + T - 1, -1, -1, device=device)
        dist_future = torch.arange(1, M + 1, device=device)
        dist = clamp_distances(torch.cat([dist_past, dist_future]), self.cfg.clamp_len)
        valid_next_BM = slide(valid_BM, valid_BM.new_ones(B, T), dim=1)
        ctx = {
            "mask": causal_mask(valid_BM, T, same_length=self.cfg.same_length, dtype=dtype),
            "ahead_mask": look_ahead_mask(valid_BM, T, dtype=dtype),
            "pos": relative_positions(
                dist, self.d_model, dropout=self.dropout, training=self.training, dtype=dtype
            ),
            "u": self.u_HK,
            "v": self.v_HK,
            "v_future": self.v_future_HK,
            "valid": valid_BM,
            "valid_next": valid_next_BM,
        }
        return ctx, {"valid": valid_next_BM}

    def exit(self, h_BSD: Tensor, state: MemoryState, *, num_tokens: int) -> tuple[Tensor, dict[str, Tensor]]:
        return h_BSD[:, h_BSD.shape[1] - num_tokens :], {}

    def mean_attended_len(self, segment_len: int) -> float:
        # Segment tokens attend to M memory positions plus their causal past. The memory's own look-ahead and its
        # pass through the MLPs are overhead linear in M, not counted as useful model FLOPs (as rmt's write block).
        if self.cfg.same_length:
            return float(self.mem_len)
        return self.mem_len + (segment_len + 1) / 2
