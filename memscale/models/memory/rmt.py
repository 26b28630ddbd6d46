"""Recurrent Memory Transformer (Bulatov et al., 2022; decoder variant of booydar/LM-RMT).

K memory tokens are placed twice around the segment: `[mem_read; x; mem_write]`. The attention mask lets
  - read tokens see the read block only (they hold the previous segment's memory),
  - segment tokens see the read block and the causal past of the segment,
  - write tokens see everything (read block, whole segment, write block),
and the next memory is the final hidden states at the write positions. The initial memory is a learned K x D
parameter (N(0, 0.02), as in LM-RMT), so reset rows restart from it and gradient reaches it.

Gradient through memory is decided by the training loop (`train.memory_grad`): the state returned here is a
differentiable function of the incoming one, and the loop detaches it where BPTT is cut (memscale/train/bptt.py).

Legend: B batch, T segment tokens, K memory tokens, S = K + T + K, D width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from memscale.models.memory.base import MemoryKind, MemoryState, StepContext


class RecurrentMemory(MemoryKind):
    kind = "rmt"
    topology = "global"
    carries_grad = True

    def __init__(self, **kw):
        super().__init__(**kw)
        K, D = self.cfg.num_tokens, self.d_model
        self.num_tokens = K
        self.mem_init_KD = nn.Parameter(torch.empty(K, D))
        # Read and write copies sit at different places in the sequence; with absolute positions they need their
        # own position embeddings to be told apart (LM-RMT gets this from relative positions).
        self.read_pos_KD = nn.Parameter(torch.empty(K, D))
        self.write_pos_KD = nn.Parameter(torch.empty(K, D))
        self._masks: dict[tuple[int, torch.device], Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.mem_init_KD, self.read_pos_KD, self.write_pos_KD):
            nn.init.normal_(p, std=0.02)

    def init_state(self, batch_size: int, *, device, dtype) -> MemoryState:
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

    def begin(self, x_BTD: Tensor, state: MemoryState) -> tuple[Tensor, StepContext]:
        mem_BKD = state["mem"].to(x_BTD.dtype)
        read = mem_BKD + self.read_pos_KD
        write = mem_BKD + self.write_pos_KD
        ctx = StepContext(
            state=state, extra={"T": x_BTD.shape[1], "mask": self.mask(x_BTD.shape[1], x_BTD.device)}
        )
        return torch.cat([read, x_BTD, write], dim=1), ctx

    def attention(self, layer: int, attn: nn.Module, h_BSD: Tensor, ctx: StepContext) -> Tensor:
        return attn(h_BSD, attn_mask=ctx.extra["mask"])

    def end(self, h_BSD: Tensor, ctx: StepContext) -> tuple[Tensor, MemoryState]:
        K, T = self.num_tokens, ctx.extra["T"]
        return h_BSD[:, K : K + T], MemoryState({"mem": h_BSD[:, K + T :]})

    def mean_attended_len(self, segment_len: int) -> float:
        # Segment tokens attend to the K read tokens plus their causal past; the write block is memory overhead
        # and is deliberately not counted as useful model FLOPs.
        return self.num_tokens + (segment_len + 1) / 2
