"""The memory-kind protocol and the memory state container.

Every memory-augmented model in memscale is `logits, new_state = model(segment_tokens, state)` (DESIGN.md §1). A
memory kind is one module in two parts, cut so that a pipeline stage owns exactly the parts of its own layers:

  - the kind itself (`MemoryKind`, `model.memory`): what all layers share (rmt's initial memory and read/write
    positions, memformer's writer and forgetting bias, xl/lamemo's content and position biases u, v), the
    state's construction and reset, and the hooks around the blocks;
  - one `LayerMemory` per layer (`block.memory`), built by the kind and owned by that layer's block: the layer's
    memory modules and parameters (memformer's reader, xl's `r_net`, infinity's long-term attention).

A segment step, on the layers of one stage:

    x_BSD, new = kind.enter(x_BTD, state)           # first stage, after the embedding (rmt adds memory tokens)
    ctx, new = kind.begin(state, num_tokens=T, ...)   # every stage: tensors that all its layers read (masks, ...)
    for each block:                                   # block(x, *ctx tensors, *its layer's state) -> x, *new state
        x_BSD, *layer_new = block(x_BSD, *[ctx[n] for n in block.context_names],
                                  *[state[f"{n}.{layer}"] for n in block.state_names])
    h_BTD, new = kind.exit(norm(x_BSD), state, num_tokens=T)  # last stage, after the final norm (rmt: write)

State enters a block as explicit tensors and leaves as explicit tensors (no mutable context crosses blocks), so
activation checkpointing (reentrant or not) and segment recompute replay one block by itself. Per-layer state is
named `<name>.<layer>` (`mem.3`, `coef.3`); state that all layers share keeps a plain name (`mem` of rmt and
memformer, the `valid` bookkeeping of xl and lamemo).

Head counts. Attention is laid out per head (memscale/models/layers.py) and every kind derives its head count
from the tensors and modules it holds (a view with -1 heads of a fixed head width), never from the config, so
that a tensor-parallel split of the projections by heads needs no change here.

Legend for tensor names: B batch (streams), T segment tokens, S tokens inside the blocks (T plus memory tokens),
M memory positions or slots, D model width, H heads, K head width, L layers, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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


def layer_state_name(name: str, layer: int) -> str:
    """The state name of `name` at layer `layer`: `mem.3`."""
    return f"{name}.{layer}"


class LayerMemory(nn.Module):
    """One layer's part of a memory kind, owned by that layer's block (`block.memory`).

    The block calls `attention` in place of its plain causal self-attention and `after_attention` between the
    attention and the MLP residual branches. `context_names` are the per-segment tensors the layer reads from the
    kind's `begin` (masks, positions, shared parameters such as xl's u and v); `state_names` are the layer's own
    carried tensors, stored as `<name>.<layer>`; both arrive as dicts of explicit tensors, and `attention` returns
    the layer's new state in the order of `state_names` (then its auxiliary loss, when `aux_loss`). Its output may
    keep only the last rows of h, when nothing after the layer reads the others (the block drops them too).
    """

    context_names: ClassVar[tuple[str, ...]] = ()
    state_names: ClassVar[tuple[str, ...]] = ()
    head_sharded_state: ClassVar[tuple[str, ...]] = ()
    """State names whose last dimension runs over heads (H, or H x K flattened): split with the heads under tensor
    parallelism. The others (cached layer inputs, basis coefficients, memory slots) are replicated."""
    aux_loss: bool = False
    """The layer adds a term of its own to the training objective (∞-former's KL regulariser): `attention`
    returns, after its new state, one more tensor, a scalar in the units of the token loss (a sum over the
    segment's positions, like `SegmentOutput.loss_sum`), with its graph. `MemoryTransformer.run_blocks` collects
    it apart from the state; the training loss adds it before backward, per segment, on the stage that holds the
    layer (memscale/train/bptt.py, memscale/parallel/pipeline/runtime.py)."""

    def attention(
        self, attn: nn.Module, h_BSD: Tensor, ctx: dict[str, Tensor], state: dict[str, Tensor]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        return attn(h_BSD, is_causal=True), ()

    def after_attention(self, x_BSD: Tensor, ctx: dict[str, Tensor]) -> Tensor:
        return x_BSD


class MemoryKind(nn.Module):
    """Base class: the control (no memory) behaviour; subclasses override what their mechanism changes."""

    kind: ClassVar[str] = "none"
    topology: ClassVar[Topology] = "none"
    carries_grad: ClassVar[bool] = False
    """True when gradient can flow from segment t+1 back into segment t through the state."""
    absolute_positions: ClassVar[bool] = True
    """False for kinds with relative positional attention (the model then adds no position embeddings)."""

    def __init__(
        self,
        *,
        d_model: int,
        num_layers: int,
        num_heads: int,
        segment_len: int,
        cfg: Any,
        layers: range | None = None,
        dropout: float = 0.0,
        attention: str = "fused",
    ):
        """`layers`: the contiguous slice of layers this model (a pipeline stage) holds; all of them by default.

        `num_heads` is the head count of the attention the kind is built for; the kind sizes its per-head
        parameters by it and, at run time, reads the head count off its tensors.
        """
        super().__init__()
        self.d_model = d_model
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.segment_len = segment_len
        self.cfg = cfg
        self.dropout = dropout
        """The model's dropout rate (`model.dropout`), for the kinds that drop something of their own."""
        self.attention = attention
        """`model.attention`: "fused", "flex" or "reference", for the kinds with an attention kernel of their own."""
        self.layers = range(num_layers) if layers is None else layers
        self.first = self.layers.start == 0
        """This model holds the first layer (and the embedding): it runs `enter`."""
        self.last = self.layers.stop == num_layers
        """This model holds the last layer (and the head): it runs `exit`."""
        # The per-layer parts, built in __init__ by the kinds that have them and handed over to the blocks by the
        # model (`take_layer_parts`); a plain list, so the kind never registers (or reaches into) them.
        self._layer_parts: list[LayerMemory | None] = [None] * len(self.layers)

    def take_layer_parts(self) -> list[LayerMemory | None]:
        """The per-layer parts, one per layer of `self.layers`, for the blocks to own; the kind keeps none."""
        parts, self._layer_parts = self._layer_parts, []
        return parts

    def reset_parameters(self, parts: list[LayerMemory | None]) -> None:
        """A paper-specified initialisation of the kind's own parameters and its layers' `parts`, applied after
        the model's generic one (memscale.models.layers.init_weights); none by default."""

    # -- state ------------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device: torch.device | str, dtype: torch.dtype) -> MemoryState:
        return MemoryState()

    def reset(self, state: MemoryState, reset_B: Tensor) -> MemoryState:
        """Rows whose stream starts a new document get the initial state; the others keep theirs.

        Names that this model does not create in `init_state` (global state owned by another stage) pass through.
        """
        if not len(state):
            return state
        # The model's dtype is that of the floating tensors; kinds that keep some tensor in another dtype (a bool
        # mask, a float32 normaliser) create it so in init_state, and `where` keeps each tensor's own dtype.
        ref = next(
            (t for t in state.tensors.values() if t.is_floating_point()), next(iter(state.tensors.values()))
        )
        init = self.init_state(reset_B.shape[0], device=ref.device, dtype=ref.dtype)
        own = MemoryState({n: t for n, t in state.items() if n in init})
        reset = own.where(reset_B, init)
        return MemoryState({n: reset[n] if n in reset else t for n, t in state.items()})

    # -- the hooks around the blocks --------------------------------------------------------------------------
    def enter(self, x_BTD: Tensor, state: MemoryState) -> tuple[Tensor, dict[str, Tensor]]:
        """First stage, after the embedding: the blocks' input and the new state this stage writes here."""
        return x_BTD, {}

    def begin(
        self, state: MemoryState, *, num_tokens: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Every stage, before its blocks: the tensors its layers read (`LayerMemory.context_names`) and the new
        shared bookkeeping state (which every stage that holds it updates alike)."""
        return {}, {}

    def exit(self, h_BSD: Tensor, state: MemoryState, *, num_tokens: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Last stage, after the final norm: the segment tokens' hidden states and the new state written here."""
        return h_BSD, {}

    # -- accounting -----------------------------------------------------------------------------------------------
    def mean_attended_len(self, segment_len: int) -> float:
        """Keys a segment token attends to, on average (for the model-FLOPs count): causal, (T + 1) / 2."""
        return (segment_len + 1) / 2
