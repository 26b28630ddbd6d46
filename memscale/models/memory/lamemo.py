"""Look-Ahead Memory, LaMemo (Ji et al., NAACL 2022), after thu-coai/LaMemo `pytorch/mem_transformer.py`
(`LaMemoRelPartialLearnableMultiHeadAttn` with attn_type 3, the paper's default configuration).

The memory positions go through every block again together with the segment, so that their states are refreshed
with the new context (the official layer runs `pos_ff` on cat(memory, segment) and passes the refreshed memory to
the next layer). Per layer:

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

Disentangled relative positions (paper eq. 12, attn_type 3): future distances use the same sinusoid of |i - j|
and the same per-layer `r_net` as past ones, and only the position bias tells the direction apart: v (`r_r_bias`)
for the past, v_future (`r_r_bias_future`) for the future; the content bias u (`r_w_bias`) serves both. u, v and
v_future are shared by all layers, as in the official code.

State, fixed shapes and batch first (the official list `[emb, recur_1, denom_1, ...]` at a fixed size M):
    emb     [B, M, D]     layer-0 input (embeddings after dropout) of the memory positions, FIFO as in XL
    attn    [B, L, M, D]  per-head attention vectors (before the output projection) of the memory positions
    lognorm [B, L, M, H]  float32 log-normaliser of each head's attention, d_old above
    valid   [B, M]        which slots hold a position of the current document; invalid slots are masked as keys,
                          get no interpolation (a = 0) and are stored as zeros
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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memscale.models.memory.base import MemoryKind, MemoryState, StepContext
from memscale.models.memory.xl import causal_mask, clamp_distances, positions, rel_shift, sinusoid, slide


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


class LookAheadMemory(MemoryKind):
    kind = "lamemo"
    topology = "per_layer"
    carries_grad = False
    absolute_positions = False

    def __init__(self, **kw):
        super().__init__(**kw)
        D, H = self.d_model, self.num_heads
        self.mem_len = self.cfg.mem_len or self.segment_len
        self.r_nets = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(self.num_layers))
        self.u_HK = nn.Parameter(torch.empty(H, D // H))  # r_w_bias: content bias, past and future
        self.v_HK = nn.Parameter(torch.empty(H, D // H))  # r_r_bias: position bias towards the past
        # r_r_bias_future: position bias towards the future (the "disentangled" direction term, eq. 12)
        self.v_future_HK = nn.Parameter(torch.empty(H, D // H))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # train_ddp.py `weights_init` redraws Linear weights, r_w_bias and r_r_bias from N(0, 0.02); it does not
        # touch r_r_bias_future, which keeps the Xavier-uniform draw of `MemTransformerLM._create_params`.
        for p in (*(r.weight for r in self.r_nets), self.u_HK, self.v_HK):
            nn.init.normal_(p, std=0.02)
        nn.init.xavier_uniform_(self.v_future_HK)

    # -- state ------------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device, dtype) -> MemoryState:
        B, L, M, D, H = batch_size, self.num_layers, self.mem_len, self.d_model, self.num_heads
        return MemoryState(
            {
                "emb": torch.zeros(B, M, D, device=device, dtype=dtype),
                "attn": torch.zeros(B, L, M, D, device=device, dtype=dtype),
                "lognorm": torch.zeros(B, L, M, H, device=device, dtype=torch.float32),
                "valid": torch.zeros(B, M, dtype=torch.bool, device=device),
            }
        )

    def reset(self, state: MemoryState, reset_B: Tensor) -> MemoryState:
        # Built explicitly: the base class would take one dtype for all tensors, and lognorm stays float32.
        emb = state["emb"]
        return state.where(reset_B, self.init_state(reset_B.shape[0], device=emb.device, dtype=emb.dtype))

    # -- hooks --------------------------------------------------------------------------------------------------
    def begin(self, x_BTD: Tensor, state: MemoryState) -> tuple[Tensor, StepContext]:
        B, T, _ = x_BTD.shape
        M, device = self.mem_len, x_BTD.device
        emb_BMD = state["emb"].to(x_BTD.dtype)
        valid_BM = state["valid"]
        # Past distances S-1 .. 0 then future distances 1 .. M, one sinusoid table (`cat([pos_seq, pos_seq_fut])`).
        dist_past = torch.arange(M + T - 1, -1, -1, device=device)
        dist_future = torch.arange(1, M + 1, device=device)
        dist = clamp_distances(torch.cat([dist_past, dist_future]), self.cfg.clamp_len)
        extra = {
            "T": T,
            "mask": causal_mask(valid_BM, T, same_length=self.cfg.same_length, dtype=x_BTD.dtype),
            "ahead_mask": look_ahead_mask(valid_BM, T, dtype=x_BTD.dtype),
            "pos_CD": sinusoid(dist, self.d_model).to(x_BTD.dtype),
            "emb": slide(emb_BMD, x_BTD.detach(), dim=1),
            "valid": slide(valid_BM, valid_BM.new_ones(B, T), dim=1),
        }
        return torch.cat([emb_BMD, x_BTD], dim=1), StepContext(state=state, extra=extra)

    def attention(self, layer: int, attn: nn.Module, h_BSD: Tensor, ctx: StepContext) -> Tensor:
        M, T, H = self.mem_len, ctx.extra["T"], self.num_heads
        K, W = self.d_model // H, min(self.mem_len, ctx.extra["T"])
        scale = K**-0.5
        p_drop = attn.dropout if self.training else 0.0
        q_BHSK, k_BHSK, v_BHSK = attn.project(h_BSD)
        r_CHK = self.r_nets[layer](positions(ctx, attn, self.training)).view(-1, H, K)
        r_past_SHK, r_future_MHK = r_CHK[: M + T], r_CHK[M + T :]

        # Segment tokens: causal relative attention over [memory; segment], as in Transformer-XL.
        q_BHTK = q_BHSK[:, :, M:]
        ac_BHTS = torch.einsum("bhtk,bhsk->bhts", q_BHTK + self.u_HK[:, None], k_BHSK)
        bd_BHTS = rel_shift(torch.einsum("bhtk,shk->bhts", q_BHTK + self.v_HK[:, None], r_past_SHK))
        logits_BHTS = (ac_BHTS + bd_BHTS) * scale + ctx.extra["mask"]
        o_BHTK, lse_BHT = softmax_attend(logits_BHTS, v_BHSK, dropout=p_drop)

        # Memory: look ahead to the window of keys at block positions M-W+1 .. M.
        q_BHMK = q_BHSK[:, :, :M]
        k_BHWK, v_BHWK = k_BHSK[:, :, M - W + 1 : M + 1], v_BHSK[:, :, M - W + 1 : M + 1]
        ac_BHMW = torch.einsum("bhmk,bhwk->bhmw", q_BHMK + self.u_HK[:, None], k_BHWK)
        bd_BHMM = rel_shift_future(
            torch.einsum("bhmk,dhk->bhmd", q_BHMK + self.v_future_HK[:, None], r_future_MHK)
        )
        logits_BHMW = (ac_BHMW + bd_BHMM[..., M - W :]) * scale + ctx.extra["ahead_mask"]
        ahead_BHMK, lse_new_BHM = softmax_attend(logits_BHMW, v_BHWK, dropout=p_drop)

        # Interpolation with the old memory by the softmax normalisers, in float32 (the official code mixes with a
        # float32 alpha too). sigmoid(d_old - d_new) is e^d_old / (e^d_old + e^d_new) without the official
        # max-subtraction and eps = 1e-6, which only guarded both normalisers being zero: the first segment
        # token is always a visible key, so d_new is finite, and invalid slots get a = 0 by the mask instead.
        lse_old_BHM = ctx.state["lognorm"][:, layer].transpose(1, 2)
        valid_B1M = ctx.state["valid"][:, None]
        a_BHM1 = torch.where(valid_B1M, torch.sigmoid(lse_old_BHM - lse_new_BHM), 0.0)[..., None]
        old_BHMK = attn.split_heads(ctx.state["attn"][:, layer]).float()
        mem_BHMK = (a_BHM1 * old_BHMK + (1 - a_BHM1) * ahead_BHMK.float()).to(o_BHTK.dtype)

        o_BHSK = torch.cat([mem_BHMK, o_BHTK], dim=2)
        # This layer's next state: the last M positions of [memory; segment] (`new_recur_mems`, `new_denom`).
        lse_BHS = torch.cat([torch.logaddexp(lse_old_BHM, lse_new_BHM), lse_BHT], dim=2)
        ctx.new[f"attn{layer}"] = o_BHSK[:, :, -M:].transpose(1, 2).flatten(2).detach()
        ctx.new[f"lognorm{layer}"] = lse_BHS[:, :, -M:].transpose(1, 2).detach()
        return attn.merge(o_BHSK)

    def end(self, h_BSD: Tensor, ctx: StepContext) -> tuple[Tensor, MemoryState]:
        L, M = self.num_layers, self.mem_len
        valid_BM = ctx.extra["valid"]
        attn_BLMD = torch.stack([ctx.new[f"attn{layer}"] for layer in range(L)], dim=1)
        lognorm_BLMH = torch.stack([ctx.new[f"lognorm{layer}"] for layer in range(L)], dim=1)
        # Slots still empty after this segment keep the initial zeros, so a row's state depends only on its
        # document (a reset row matches a fresh one, and checkpoints hold no stale values).
        keep_B1M1 = valid_BM[:, None, :, None]
        new = {
            "emb": ctx.extra["emb"],
            "attn": torch.where(keep_B1M1, attn_BLMD, 0.0).to(ctx.state["attn"].dtype),
            "lognorm": torch.where(keep_B1M1, lognorm_BLMH, 0.0),
            "valid": valid_BM,
        }
        return h_BSD[:, M:], MemoryState(new)

    def mean_attended_len(self, segment_len: int) -> float:
        # Segment tokens attend to M memory positions plus their causal past. The memory's own look-ahead and its
        # pass through the MLPs are overhead linear in M, not counted as useful model FLOPs (as rmt's write block).
        if self.cfg.same_length:
            return float(self.mem_len)
        return self.mem_len + (segment_len + 1) / 2
