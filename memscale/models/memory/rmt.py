"""Recurrent Memory Transformer (Bulatov et al., 2022; decoder variant of booydar/LM-RMT).

K memory tokens are placed twice around the segment: `[mem_read; x; mem_write]`. The attention mask lets
  - read tokens see the read block only (they hold the previous segment's memory),
  - segment tokens see the read block and the causal past of the segment,
  - write tokens see everything (read block, whole segment, write block),
and the next memory is the final hidden states at the write positions. The initial memory is a learned K x D
parameter, so reset rows restart from it and gradient reaches it. On CUDA the mask is not handed to attention as
a tensor: `read_write_attention` runs it as three attentions the flash kernels take whole (`model.attention`).

Its initialisation follows the authors' later RMT (Hugging Face wrapper): independent normal entries at the scale
of the token embeddings, N(0, 0.02), the scale of everything else the first layer reads. LM-RMT's
`init_mem_tokens` instead repeats one N(0, 1) draw K times, at the scale of the memory the model writes (the final
LayerNorm's output, rms ~1). Measured on the copy task of tests/test_synthetic.py (two symbols across a segment
boundary, 300 steps, same seed): validation accuracy 1.00 with N(0, 0.02) per slot, 0.33 with LM-RMT's repeated
N(0, 1), 0.32 with independent N(0, 1), 0.13 (chance) with a repeated N(0, 0.02): identical slots start
symmetric, and a unit-scale memory swamps the 0.02-scale tokens and position vectors of the first segment. As in
LM-RMT, dropout (`model.dropout`) applies to the memory going in (its input dropout covers the memory tokens) and
to the memory written (its output dropout covers the write positions).

Gradient through memory is decided by the training loop (`train.memory_grad`): the state returned here is a
differentiable function of the incoming one, and the loop detaches it where BPTT is cut (memscale/train/bptt.py).

Legend: B batch, T segment tokens, K memory tokens, S = K + T + K, D width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right

from memscale.models.layers import reference_attention_active
from memscale.models.memory.base import LayerMemory, MemoryKind, MemoryState

SPLIT_ON_CPU = False
"""Run the read/write mask as three unmasked or causal attentions on CPU too (always on CUDA). Off: SDPA's CPU
kernel takes the mask at no loss, and measured fwd+bwd at the default shape (B 4, H 8, T 512, K 16, two threads,
alternating, three rounds) the one masked call took 34-38 ms, the split 40-43 ms (`bench kernels`: 0.90x).
Tests switch it on to check the split on CPU."""


def read_write_attention(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, num_tokens: int) -> Tensor:
    """Attention under rmt's read/write mask (`RecurrentMemory.mask`) as three attentions that need no mask
    tensor: the read block over itself, the segment over [read; segment] with the causal triangle aligned to the
    last key (query t sees keys 0 .. K + t), the write block over everything. Each row's softmax runs over the same
    keys as under the mask, so the result is the same up to rounding; on CUDA each piece is one flash (or
    memory-efficient) kernel that skips the hidden tiles, where an explicit mask would send the whole S x S score
    matrix through the memory-efficient kernel, mask read and all. q, k, v, result: B x H x S x K."""
    K = num_tokens
    T = q.shape[2] - 2 * K
    read = attn.attend(q[:, :, :K], k[:, :, :K], v[:, :, :K])
    segment = attn.attend(
        q[:, :, K : K + T], k[:, :, : K + T], v[:, :, : K + T], attn_mask=causal_lower_right(T, K + T)
    )
    write = attn.attend(q[:, :, K + T :], k, v)
    return torch.cat([read, segment, write], dim=2)


class MaskedLayer(LayerMemory):
    """A layer of rmt: self-attention over [read; segment; write] under the read/write mask."""

    context_names = ("mask",)

    def __init__(self, num_tokens: int, *, split: bool = True):
        super().__init__()
        self.num_tokens = num_tokens
        self.split = split
        """`model.attention` is not reference: `read_write_attention` on CUDA (and on CPU with SPLIT_ON_CPU)."""

    def attention(self, attn, h_BSD, ctx, state):
        if self.split and (h_BSD.is_cuda or SPLIT_ON_CPU) and not reference_attention_active():
            q, k, v = attn.project(h_BSD)
            return attn.merge(read_write_attention(attn, q, k, v, self.num_tokens)), ()
        return attn(h_BSD, attn_mask=ctx["mask"]), ()


class RecurrentMemory(MemoryKind):
    """The memory tokens enter at the first layer and leave at the last: the initial memory and the read/write
    positions are used by `enter`, so they live with the first stage; `exit` (last stage) only cuts the write
    positions out. Both stages hold the state `mem`, sent from the last stage to the first between segments."""

    kind = "rmt"
    topology = "global"
    carries_grad = True

    def __init__(self, **kw):
        super().__init__(**kw)
        K, D = self.cfg.num_tokens, self.d_model
        self.num_tokens = K
        if self.first:
            self.mem_init_KD = nn.Parameter(torch.empty(K, D))
            # Read and write copies sit at different places in the sequence; with absolute positions they need
            # their own position embeddings to be told apart (LM-RMT gets this from relative positions).
            self.read_pos_KD = nn.Parameter(torch.empty(K, D))
            self.write_pos_KD = nn.Parameter(torch.empty(K, D))
        self._masks: dict[tuple[int, torch.device], Tensor] = {}
        self._layer_parts = [MaskedLayer(K, split=self.attention != "reference") for _ in self.layers]
        self.reset_parameters(self._layer_parts)

    def reset_parameters(self, parts) -> None:
        if self.first:
            for p in (self.mem_init_KD, self.read_pos_KD, self.write_pos_KD):
                nn.init.normal_(p, std=0.02)

    def init_state(self, batch_size: int, *, device, dtype) -> MemoryState:
        if not self.first:
            return MemoryState()  # the initial memory is the first stage's
        mem = self.mem_init_KD.to(device=device, dtype=dtype).unsqueeze(0).expand(batch_size, -1, -1)
        return MemoryState({"mem": mem})

    def mask(self, T: int, device: torch.device) -> Tensor:
        """S x S boolean mask (True = may attend), built once per segment length and device."""
        key = (T, device)
        if key not in self._masks:
            K = self.num_tokens
            S = K + T + K
            m = torch.zeros(S, S, dtype=torch.bool, device=device)
            m[:K, :K] = True  # read block sees itself
            m[K : K + T, :K] = True  # segment sees the read block ...
            m[K : K + T, K : K + T] = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # ... causally
            m[K + T :, :] = True  # write block sees everything
            self._masks[key] = m
        return self._masks[key]

    def enter(self, x_BTD: Tensor, state: MemoryState) -> tuple[Tensor, dict[str, Tensor]]:
        mem_BKD = F.dropout(state["mem"].to(x_BTD.dtype), self.dropout, self.training)
        read = mem_BKD + self.read_pos_KD
        write = mem_BKD + self.write_pos_KD
        return torch.cat([read, x_BTD, write], dim=1), {}

    def begin(self, state, *, num_tokens, device, dtype):
        return {"mask": self.mask(num_tokens, device)}, {}

    def exit(self, h_BSD: Tensor, state: MemoryState, *, num_tokens: int) -> tuple[Tensor, dict[str, Tensor]]:
        K, T = self.num_tokens, num_tokens
        return h_BSD[:, K : K + T], {"mem": F.dropout(h_BSD[:, K + T :], self.dropout, self.training)}

    def mean_attended_len(self, segment_len: int) -> float:
        # Segment tokens attend to the K read tokens plus their causal past; the write block is memory overhead
        # and is deliberately not counted as useful model FLOPs.
        return self.num_tokens + (segment_len + 1) / 2
