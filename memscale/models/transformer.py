"""The segment-recurrent decoder: `step(tokens, state) -> SegmentOutput`.

One model class serves every memory kind; the kind (memscale/models/memory/) decides what the state is and how
the blocks read and write it. Parallelism is applied to this model from outside (memscale/parallel/), never from
inside it.

Legend: B batch (streams), T segment tokens, S tokens inside the blocks, D width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memscale.config import ModelConfig
from memscale.data.batch import IGNORE_INDEX
from memscale.kernels.cross_entropy import fused_linear_cross_entropy
from memscale.models.layers import Block, init_weights
from memscale.models.memory import build_memory
from memscale.models.memory.base import MemoryState


@dataclass
class SegmentOutput:
    state: MemoryState
    """The memory after this segment, to be passed to the next one."""
    hidden_BTD: Tensor
    """Final (normed) hidden states of the segment's tokens."""
    logits_BTV: Tensor | None = None
    loss_sum: Tensor | None = None
    """Sum of the token cross-entropies over targets != IGNORE_INDEX (divide by `num_targets`)."""
    num_targets: int = 0


class MemoryTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, segment_len: int):
        super().__init__()
        self.cfg = cfg
        self.segment_len = segment_len
        d, L, H = cfg.d_model, cfg.num_layers, cfg.num_heads
        d_ff = cfg.d_ff or 4 * d
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.memory = build_memory(cfg, segment_len=segment_len)
        self.pos = (
            nn.Embedding(cfg.max_segment_len or segment_len, d) if self.memory.absolute_positions else None
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(d, H, d_ff, dropout=cfg.dropout, layer=i) for i in range(L))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        init_weights(self, num_layers=L)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        if hasattr(self.memory, "reset_parameters"):
            self.memory.reset_parameters()  # kinds with a paper-specified initialisation of their own

    # ----------------------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device: torch.device | str | None = None) -> MemoryState:
        device = device if device is not None else self.embed.weight.device
        return self.memory.init_state(batch_size, device=device, dtype=self.embed.weight.dtype)

    def step(
        self,
        tokens_BT: Tensor,
        state: MemoryState,
        *,
        targets_BT: Tensor | None = None,
        reset_B: Tensor | None = None,
        return_logits: bool = True,
    ) -> SegmentOutput:
        """Run one segment. `reset_B` marks rows that start a new document: their memory is reset first."""
        B, T = tokens_BT.shape
        if reset_B is not None and len(state):
            state = self.memory.reset(state, reset_B)
        x = self.embed(tokens_BT)
        if self.pos is not None:
            if T > self.pos.num_embeddings:
                raise ValueError(
                    f"segment of {T} tokens exceeds the position table ({self.pos.num_embeddings})"
                )
            x = x + self.pos.weight[:T]
        x = self.drop(x)
        x, ctx = self.memory.begin(x, state)
        for block in self.blocks:
            x = block(x, self.memory, ctx)
        h_BTD, new_state = self.memory.end(self.norm(x), ctx)
        out = SegmentOutput(state=new_state, hidden_BTD=h_BTD)
        if targets_BT is not None and not return_logits and self.cfg.fused_loss and torch.is_grad_enabled():
            h_ND, y_N = h_BTD.flatten(0, 1), targets_BT.flatten()
            scored_N = y_N != IGNORE_INDEX
            out.num_targets = int(scored_N.sum())
            if out.num_targets < len(y_N):  # project only the scored rows (sparse targets: tasks, probes)
                idx = scored_N.nonzero().squeeze(1)
                h_ND, y_N = h_ND[idx], y_N[idx]
            out.loss_sum = fused_linear_cross_entropy(h_ND, self.head.weight, y_N)
        elif targets_BT is not None:
            logits = self.head(h_BTD)
            out.loss_sum = F.cross_entropy(
                logits.flatten(0, 1).float(), targets_BT.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            out.num_targets = int((targets_BT != IGNORE_INDEX).sum())
            if return_logits:
                out.logits_BTV = logits
        elif return_logits:
            out.logits_BTV = self.head(h_BTD)
        return out

    forward = step

    # ----------------------------------------------------------------------------------------------------------
    def num_params(self, *, non_embedding: bool = False) -> int:
        """All parameters, or without token/position embeddings and output projection (tied or not)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
            if self.pos is not None:
                n -= self.pos.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.head.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Model FLOPs per trained token (forward + backward), PaLM-style:

        6 x (non-embedding parameters + output projection) + 12 x L x D x (mean attended key length).
        The output projection V x D is counted once whether or not it is tied to the embedding.
        """
        cfg = self.cfg
        n = self.num_params(non_embedding=True) + self.head.weight.numel()
        attended = self.memory.mean_attended_len(self.segment_len)
        return 6.0 * n + 12.0 * cfg.num_layers * cfg.d_model * attended
