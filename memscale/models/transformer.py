"""The segment-recurrent decoder: `step(tokens, state) -> SegmentOutput`.

One model class serves every memory kind; the kind (memscale/models/memory/) decides what the state is and how
the blocks read and write it. Parallelism is applied to this model from outside (memscale/parallel/), never from
inside it.

Cut for pipeline stages (DESIGN.md §2): `MemoryTransformer(cfg, segment_len=..., layers=range(a, b))` holds the
contiguous slice of blocks a..b-1 and only the parts of a stage that owns them: the embedding (and position
table) when a == 0, the final norm and the head when b == num_layers; the others are None. Blocks sit in a dict
keyed by their global layer index, so parameter names (`blocks.3.attn.qkv.weight`) do not depend on the cut.
A stage runs

    x_BSD, new = model.embed_segment(tokens_BT, state)          # first stage
    x_BSD, new = model.run_blocks(x_BSD, state, num_tokens=T)   # every stage, its own layers
    h_BTD, new = model.finish(x_BSD, state, num_tokens=T)       # last stage; then memscale.train.loss.token_loss

and `step` chains the three on a whole model. The loss lives outside the model (memscale/train/loss.py).

Legend: B batch (streams), T segment tokens, S tokens inside the blocks, D width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from memscale.config import ModelConfig
from memscale.data.batch import IGNORE_INDEX
from memscale.models.layers import Block, init_weights, recomputed
from memscale.models.memory import build_memory
from memscale.models.memory.base import MemoryState, layer_state_name
from memscale.train.loss import token_loss

__all__ = ["IGNORE_INDEX", "MemoryTransformer", "SegmentOutput"]


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
    aux_sum: Tensor | None = None
    """Sum of the layers' auxiliary losses (`LayerMemory.aux_loss`, ∞-former's KL regulariser) in the units of
    `loss_sum`: the training objective of the segment is `loss_sum + aux_sum`; None when no layer has one."""


class MemoryTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, segment_len: int, layers: range | None = None):
        super().__init__()
        self.cfg = cfg
        self.segment_len = segment_len
        d, L, H = cfg.d_model, cfg.num_layers, cfg.num_heads
        layers = range(L) if layers is None else layers
        if layers.step != 1 or not 0 <= layers.start < layers.stop <= L:
            raise ValueError(f"layers={layers} must be a non-empty contiguous slice of range({L})")
        self.layers = layers
        self.first = layers.start == 0
        self.last = layers.stop == L
        d_ff = cfg.d_ff or 4 * d
        # Built in this order, which is also the order of the random draws of their default initialisation.
        self.embed = nn.Embedding(cfg.vocab_size, d) if self.first else None
        self.memory = build_memory(cfg, segment_len=segment_len, layers=layers)
        self.pos = (
            nn.Embedding(cfg.max_segment_len or segment_len, d)
            if self.first and self.memory.absolute_positions
            else None
        )
        self.drop = nn.Dropout(cfg.dropout)
        parts = self.memory.take_layer_parts()
        self.blocks = nn.ModuleDict(
            {
                str(i): Block(d, H, d_ff, dropout=cfg.dropout, layer=i, memory=part)
                for i, part in zip(layers, parts, strict=True)
            }
        )
        self.norm = nn.LayerNorm(d) if self.last else None
        self.head = nn.Linear(d, cfg.vocab_size, bias=False) if self.last else None
        if self.head is not None and cfg.tie_embeddings:
            self.head.param_role = "embedding"  # the token embedding, also on a last stage that holds a copy
        init_weights(self._init_order(), num_layers=L)
        if cfg.tie_embeddings and self.first and self.last:
            # Split into stages, the last one holds its own copy of the embedding as its head (drawn here like the
            # head of a whole model): the parallel runtime keeps the two equal.
            self.head.weight = self.embed.weight
        self.memory.reset_parameters(parts)  # kinds with a paper-specified initialisation of their own

    def _init_order(self):
        """(module, parameter name) in the order of the initial draws: that of the model before the stage cut
        (embedding, the kind's own tensors, its per-layer parts, its own modules, positions, blocks, final norm,
        head), so that a seed builds the same model as before the memory's per-layer parts moved into the blocks.
        """

        def own(module):
            if module is not None:
                for m in module.modules():
                    for name, _ in m.named_parameters(recurse=False):
                        yield m, name

        yield from own(self.embed)
        for name, _ in self.memory.named_parameters(recurse=False):
            yield self.memory, name
        for block in self.blocks.values():
            yield from own(block.memory)
        for child in self.memory.children():
            yield from own(child)
        yield from own(self.pos)
        for block in self.blocks.values():
            for child_name, child in block.named_children():
                if child_name != "memory":
                    yield from own(child)
        yield from own(self.norm)
        yield from own(self.head)

    # ----------------------------------------------------------------------------------------------------------
    def set_activation_checkpointing(self, mode: str) -> None:
        """`train.activation_checkpointing` on every block of this model: "none", "full" or "selective"."""
        if mode not in ("none", "full", "selective"):
            raise ValueError(f"activation checkpointing {mode!r} is not one of none, full, selective")
        for block in self.blocks.values():
            block.recompute = mode

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None) -> MemoryState:
        ref = next(self.parameters())
        device = device if device is not None else ref.device
        return self.memory.init_state(batch_size, device=device, dtype=ref.dtype)

    # -- stage functions --------------------------------------------------------------------------------------
    def embed_segment(self, tokens_BT: Tensor, state: MemoryState) -> tuple[Tensor, dict[str, Tensor]]:
        """First stage: token (+ position) embeddings, dropout, and the kind's input transform."""
        T = tokens_BT.shape[1]
        x = self.embed(tokens_BT)
        if self.pos is not None:
            if T > self.pos.num_embeddings:
                raise ValueError(
                    f"segment of {T} tokens exceeds the position table ({self.pos.num_embeddings})"
                )
            x = x + self.pos.weight[:T]
        return self.memory.enter(self.drop(x), state)

    def run_blocks(
        self, x_BSD: Tensor, state: MemoryState, *, num_tokens: int, aux: list[Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """This model's blocks on hidden states `x_BSD` of a segment of `num_tokens` tokens: the hidden states
        out, and the new state of its layers (plus the shared bookkeeping the kind updates on every stage).

        `aux`: a list that receives each layer's auxiliary loss (`LayerMemory.aux_loss`), with its graph; a
        caller that only runs forward (evaluation) may leave it out and the terms are dropped."""
        ctx, new = self.memory.begin(state, num_tokens=num_tokens, device=x_BSD.device, dtype=x_BSD.dtype)
        detach = not self.memory.carries_grad
        for block in self.blocks.values():
            names = [layer_state_name(n, block.layer) for n in block.state_names]
            inputs = (x_BSD, *(ctx[n] for n in block.context_names), *(state[n] for n in names))
            if block.recompute == "full":
                x_BSD, *layer_new = recomputed(block, *inputs)
            else:
                x_BSD, *layer_new = block(*inputs)
            if len(layer_new) > len(names):  # the layer's auxiliary loss comes after its state
                (layer_aux,) = layer_new[len(names) :]
                layer_new = layer_new[: len(names)]
                if aux is not None:
                    aux.append(layer_aux)
            # A detached kind's layer state is already detached; under a checkpoint wrapper it would come back
            # attached to the recomputation, so detach again (a view, no copy).
            new.update(zip(names, (t.detach() for t in layer_new) if detach else layer_new, strict=True))
        return x_BSD, new

    def finish(
        self, x_BSD: Tensor, state: MemoryState, *, num_tokens: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Last stage: final norm and the kind's output transform -> hidden states of the segment's tokens, and
        the new state written there."""
        return self.memory.exit(self.norm(x_BSD), state, num_tokens=num_tokens)

    # -- the single-process convenience -----------------------------------------------------------------------
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
        if reset_B is not None and len(state):
            state = self.memory.reset(state, reset_B)
        T = tokens_BT.shape[1]
        x, new_first = self.embed_segment(tokens_BT, state)
        aux: list[Tensor] = []
        x, new_layers = self.run_blocks(x, state, num_tokens=T, aux=aux)
        h_BTD, new_last = self.finish(x, state, num_tokens=T)
        new = {**new_first, **new_layers, **new_last}
        assert new.keys() == set(state), f"new state {sorted(new)} vs {sorted(state)}"
        # Each state in the dtype it came in with (float32 under bf16 autocast: memscale/train/precision.py).
        out = SegmentOutput(
            state=MemoryState({n: new[n].to(state[n].dtype) for n in state}), hidden_BTD=h_BTD
        )
        if aux:
            out.aux_sum = torch.stack(aux).sum()
        loss = token_loss(
            h_BTD, self.head, targets_BT, fused=self.cfg.fused_loss, return_logits=return_logits
        )
        out.loss_sum, out.num_targets, out.logits_BTV = loss.loss_sum, loss.num_targets, loss.logits_BTV
        return out

    forward = step

    # ----------------------------------------------------------------------------------------------------------
    def num_params(self, *, non_embedding: bool = False) -> int:
        """All parameters, or without token/position embeddings and output projection (tied or not)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            for table in (self.embed, self.pos):
                n -= table.weight.numel() if table is not None else 0
            if self.head is not None and not (self.cfg.tie_embeddings and self.first):
                n -= self.head.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Model FLOPs per trained token (forward + backward) of the layers held, PaLM-style:

        6 x (non-embedding parameters + output projection) + 12 x L x D x (mean attended key length).
        The output projection V x D is counted once whether or not it is tied to the embedding.
        """
        n = self.num_params(non_embedding=True) + (self.head.weight.numel() if self.head is not None else 0)
        attended = self.memory.mean_attended_len(self.segment_len)
        return 6.0 * n + 12.0 * len(self.blocks) * self.cfg.d_model * attended
