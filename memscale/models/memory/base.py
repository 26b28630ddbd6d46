"""The memory-kind protocol and the memory state container.

Every memory-augmented model in memscale is `logits, new_state = model(segment_tokens, state)` (DESIGN.md §1). A
memory kind is one module that plugs into the generic decoder (`memscale.models.transformer`) at four points:

    x_BSD, ctx = kind.begin(x_BTD, state)          # before the blocks (rmt prepends/appends memory tokens)
    for each layer l:
        a_BSD = kind.attention(l, attn, h_BSD, ctx)   # the block's self-attention (xl: cached prefix + rel. pos.)
        x_BSD = kind.after_attention(l, x_BSD, ctx)   # extra read sub-layer (memformer cross-attention)
    h_BTD, new_state = kind.end(norm(x_BSD), ctx)   # after the final norm (rmt: write positions -> memory)

Legend for tensor names: B batch (streams), T segment tokens, S tokens inside the blocks (T plus memory tokens),
M memory positions or slots, D model width, H heads, K head width, L layers, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

Topology = Literal["none", "per_layer", "global"]


class MemoryState:
    """Named, batch-first tensors carried from one segment to the next.

    Every tensor has the batch (stream) dimension first, so that `where(reset_B, initial)` resets exactly the rows
    whose document ended, a pipeline stage can pick the names it owns, and a checkpoint saves it as a flat dict.
    """

    def __init__(self, tensors: dict[str, Tensor] | None = None):
        self.tensors: dict[str, Tensor] = dict(tensors or {})

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def items(self):
        return self.tensors.items()

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.tensors.items())
        return f"MemoryState({shapes})"

    def map(self, fn: Callable[[Tensor], Tensor]) -> MemoryState:
        return MemoryState({k: fn(v) for k, v in self.tensors.items()})

    def detach(self) -> MemoryState:
        return self.map(lambda t: t.detach())

    def where(self, mask_B: Tensor, other: MemoryState) -> MemoryState:
        """Rows where `mask_B` is True come from `other`, the rest from self (differentiable in both)."""
        if set(other.tensors) != set(self.tensors):
            raise AssertionError(f"state names differ: {sorted(self.tensors)} vs {sorted(other.tensors)}")
        out = {}
        for k, v in self.tensors.items():
            m = mask_B.to(device=v.device, dtype=torch.bool).view(-1, *([1] * (v.dim() - 1)))
            out[k] = torch.where(m, other.tensors[k].to(v.dtype), v)
        return MemoryState(out)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}

    @classmethod
    def from_state_dict(
        cls, sd: dict[str, Tensor], *, device: torch.device | str | None = None
    ) -> MemoryState:
        return cls({k: v.to(device) if device is not None else v for k, v in sd.items()})

    def norms(self) -> dict[str, float]:
        """Mean over rows of the L2 norm of each floating tensor (a TensorBoard health signal)."""
        out = {}
        for k, v in self.tensors.items():
            if v.is_floating_point() and v.numel():
                out[k] = v.detach().float().flatten(1).norm(dim=1).mean().item()
        return out

    def num_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.tensors.values())


@dataclass
class StepContext:
    """Scratch space of one segment step, shared by a kind's hooks across the layers."""

    state: MemoryState
    new: dict[str, Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class MemoryKind(nn.Module):
    """Base class: the control (no memory) behaviour; subclasses override what their mechanism changes."""

    kind: ClassVar[str] = "none"
    topology: ClassVar[Topology] = "none"
    carries_grad: ClassVar[bool] = False
    """True when gradient can flow from segment t+1 back into segment t through the state."""
    absolute_positions: ClassVar[bool] = True
    """False for kinds with relative positional attention (the model then adds no position embeddings)."""

    def __init__(self, *, d_model: int, num_layers: int, num_heads: int, segment_len: int, cfg: Any):
        super().__init__()
        self.d_model = d_model
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.segment_len = segment_len
        self.cfg = cfg

    # -- state ------------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device: torch.device | str, dtype: torch.dtype) -> MemoryState:
        return MemoryState()

    def reset(self, state: MemoryState, reset_B: Tensor) -> MemoryState:
        """Rows whose stream starts a new document get the initial state; the others keep theirs."""
        if not len(state):
            return state
        # The model's dtype is that of the floating tensors; kinds that keep some tensor in another dtype (a bool
        # mask, a float32 normaliser) create it so in init_state, and `where` keeps each tensor's own dtype.
        ref = next(
            (t for t in state.tensors.values() if t.is_floating_point()), next(iter(state.tensors.values()))
        )
        init = self.init_state(reset_B.shape[0], device=ref.device, dtype=ref.dtype)
        return state.where(reset_B, init)

    # -- the four hooks -----------------------------------------------------------------------------------------
    def begin(self, x_BTD: Tensor, state: MemoryState) -> tuple[Tensor, StepContext]:
        return x_BTD, StepContext(state=state)

    def attention(self, layer: int, attn: nn.Module, h_BSD: Tensor, ctx: StepContext) -> Tensor:
        return attn(h_BSD, is_causal=True)

    def after_attention(self, layer: int, x_BSD: Tensor, ctx: StepContext) -> Tensor:
        return x_BSD

    def end(self, h_BSD: Tensor, ctx: StepContext) -> tuple[Tensor, MemoryState]:
        return h_BSD, ctx.state

    # -- accounting -----------------------------------------------------------------------------------------------
    def mean_attended_len(self, segment_len: int) -> float:
        """Keys a segment token attends to, on average (for the model-FLOPs count): causal, (T + 1) / 2."""
        return (segment_len + 1) / 2
