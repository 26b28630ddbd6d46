"""Memformer (Wu et al., 2020, "Memformer: A Memory-Augmented Transformer for Sequence Modeling").

M memory slots carried from segment to segment, in the decoder-only layout of DESIGN.md §2:
  - memory reading: every layer gets an extra pre-norm cross-attention sub-layer after its self-attention,
    with queries from the segment and keys/values from the slots (own projections per layer, residual);
  - memory writing, once after the last layer, on the final normed hidden states: slot attention, where
    slot i attends to [m_i; h_1..h_T] only (slots never see each other), softmax(q k^T / (sqrt(K) tau)) with
    tau < 1 to sharpen it. Slots and tokens share the writer's key and value maps (K_m = m W_K, K_x = H W_K);
  - forgetting by biased memory normalisation (BMN): m <- m + b; m <- sqrt(D) m / ||m|| per slot, with a
    learned bias b per slot. The paper normalises to unit length; the sqrt(D) factor puts the slots at the scale
    of the LayerNorm outputs they are attended with (elements ~1 rather than ~1/sqrt(D)). Measured on 2-segment
    copy (d 128): unit-norm slots stay at chance after 1,066 steps, sqrt(D)-norm slots reach 0.97 by step 200. With nothing written, repeated BMN drives every slot to b / ||b||, the terminal state of
    forgetting; the initial memory of a document is that state, so reset rows restart from it and gradient
    reaches b.

No public code implements this version (qywu/memformers is the later MemBART, with a gated update;
lucidrains/memformer updates the slots with a GRU). The paper gives no number for tau, no initialisation for b
and no head layout of the writer; memscale uses `write_temperature` (default 0.5), b ~ N(0, 0.02) like the
other learned embeddings, and the model's head count for both read and write. The paper's writer equation has
no output projection, so none is used (BMN right after it would only rescale one).

The writer's own-slot value is the raw slot, as the paper writes it: m_i' = softmax(A_i / tau) [m_i; V_x], with
V_x = H W_V for the tokens but m_i itself, not m_i W_V, for the slot (`model.memory.write_own_value=raw`, the
default). Through W_V, what a slot keeps of itself would pass through a random matrix every segment until W_V
learned to be near the identity. Measured on the memory tasks (`memscale bench tasks --kinds memformer --tasks
copy,assoc --segments 4`, d 128, same seed, one thread): raw reaches copy 1.000 after 700 steps and assoc 0.225
after 1200, `projected` copy 0.979 and assoc 0.139 after 1200 (chance 0.125); after 600 steps 0.991 / 0.262
against 0.872 / 0.145.

The new memory is a differentiable function of the incoming memory, the segment and the parameters, and of
nothing else (no dropout, no hidden buffers), so the training loop can detach it for truncated BPTT or
recompute a segment from its saved incoming memory for memory-replay back-propagation (MRBP, the paper's
Algorithm 1).

Legend: B batch, T segment tokens, M memory slots, S = M + T keys of the writer, D width, H heads,
K head width (D / H).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memscale.kernels.slot_attention import slot_attention
from memscale.models.layers import sdpa
from memscale.models.memory.base import LayerMemory, MemoryKind, MemoryState


def split_heads(x_BSD: Tensor, head_dim: int) -> Tensor:
    B, S, _ = x_BSD.shape
    return x_BSD.view(B, S, -1, head_dim).transpose(1, 2)


def merge_heads(x_BHSK: Tensor) -> Tensor:
    B, H, S, K = x_BHSK.shape
    return x_BHSK.transpose(1, 2).reshape(B, S, H * K)


def per_head_kv(kv: nn.Linear, x_BSD: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    """k, v (B x H x S x K each) from a fused key/value projection laid out per head, rows [H, 2, K]."""
    B, S, _ = x_BSD.shape
    k_BSHK, v_BSHK = kv(x_BSD).view(B, S, -1, 2, head_dim).unbind(3)
    return k_BSHK.transpose(1, 2), v_BSHK.transpose(1, 2)


def kv_projection(d_model: int, head_dim: int) -> nn.Linear:
    kv = nn.Linear(d_model, 2 * d_model)
    kv.head_layout = (2, head_dim)  # rows [H, 2, K]: a column-parallel split gives whole heads
    return kv


class MemoryRead(LayerMemory):
    """One layer's read sub-layer: x + W_O MHA(q = LN(x) W_Q, k|v = mem W_K|W_V)."""

    context_names = ("mem",)

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.head_dim = d_model // num_heads
        self.norm = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model)
        self.kv = kv_projection(d_model, self.head_dim)
        self.out = nn.Linear(d_model, d_model)

    def after_attention(self, x_BTD: Tensor, ctx: dict[str, Tensor]) -> Tensor:
        return self(x_BTD, ctx["mem"])

    def forward(self, x_BTD: Tensor, mem_BMD: Tensor) -> Tensor:
        q_BHTK = split_heads(self.q(self.norm(x_BTD)), self.head_dim)
        k_BHMK, v_BHMK = per_head_kv(self.kv, mem_BMD.to(x_BTD.dtype), self.head_dim)
        # The slots summarise the past only, so every token may see all of them: no mask.
        o_BHTK = sdpa(q_BHTK, k_BHMK, v_BHMK)
        return x_BTD + self.out(merge_heads(o_BHTK))


class MemoryWrite(nn.Module):
    """Slot attention of the writer: m_i' = softmax(q_i [k_i; K_x]^T / (sqrt(K) tau)) [v_i; V_x]."""

    def __init__(self, d_model: int, num_heads: int, *, temperature: float, own_value: str = "projected"):
        super().__init__()
        self.head_dim = d_model // num_heads
        self.temperature = temperature
        self.own_value = own_value
        self.q = nn.Linear(d_model, d_model)
        self.kv = kv_projection(d_model, self.head_dim)
        self._masks: dict[tuple[int, int, torch.device], Tensor] = {}
        self.tp_group = None
        """The tensor-parallel group when the heads are split over ranks (set by parallelize)."""

    def mask(self, M: int, T: int, device: torch.device) -> Tensor:
        """M x (M + T), True = may attend: slot i sees slot i (identity block) and every token."""
        key = (M, T, device)
        if key not in self._masks:
            eye_MM = torch.eye(M, dtype=torch.bool, device=device)
            self._masks[key] = torch.cat([eye_MM, torch.ones(M, T, dtype=torch.bool, device=device)], dim=1)
        return self._masks[key]

    def forward(self, mem_BMD: Tensor, h_BTD: Tensor) -> Tensor:
        """The written memory before forgetting (B x M x D)."""
        M, T, K = mem_BMD.shape[1], h_BTD.shape[1], self.head_dim
        q_BHMK = split_heads(self.q(mem_BMD), K)
        # One projection of [slots; tokens]: the paper applies the same W_K, W_V to both.
        k_BHSK, v_BHSK = per_head_kv(self.kv, torch.cat([mem_BMD, h_BTD], dim=1), K)
        if self.own_value == "raw":
            # The paper's [m_i; V_x]: slot i's own value is the slot itself, cut into the local heads.
            v_BHSK = torch.cat([split_heads(self._local_heads(mem_BMD), K), v_BHSK[:, :, M:]], dim=2)
        scale = 1.0 / (math.sqrt(K) * self.temperature)
        o_BHMK = slot_attention(q_BHMK, k_BHSK, v_BHSK, mask_MS=self.mask(M, T, mem_BMD.device), scale=scale)
        if self.tp_group is not None:
            # Split by heads (memscale/parallel/tensor.py): the slots are width-D vectors, so every rank gathers
            # all heads (no output projection to reduce over).
            from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

            return gather_from_tensor_model_parallel_region(merge_heads(o_BHMK), group=self.tp_group)
        return merge_heads(o_BHMK)

    def _local_heads(self, mem_BMD: Tensor) -> Tensor:
        """The columns of the slots that belong to this rank's heads (all of them without tensor parallelism)."""
        if self.tp_group is None:
            return mem_BMD
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        # Each rank reads its own heads' columns of the replicated slots; the copy region sums the ranks'
        # gradients in backward, as a column-parallel projection of the slots does.
        width = self.q.output_size_per_partition
        rank = torch.distributed.get_rank(self.tp_group)
        return copy_to_tensor_model_parallel_region(mem_BMD, group=self.tp_group)[
            ..., rank * width : (rank + 1) * width
        ]


class MemformerMemory(MemoryKind):
    """Every layer reads the slots (its `MemoryRead` lives in its block); the writer and the forgetting bias b
    are used once, after the last layer, so they live with the last stage, which also builds the initial memory
    (a function of b). Every stage holds the state `mem`: the last stage writes it and sends it to all."""

    kind = "memformer"
    topology = "global"
    carries_grad = True

    def __init__(self, **kw):
        super().__init__(**kw)
        D, H = self.d_model, self.num_heads
        self.num_slots = self.cfg.num_tokens
        self._layer_parts = [MemoryRead(D, H) for _ in self.layers]
        if self.last:
            self.write = MemoryWrite(
                D, H, temperature=self.cfg.write_temperature, own_value=self.cfg.write_own_value
            )
            self.bias_MD = nn.Parameter(torch.empty(self.num_slots, D))
        self.reset_parameters(self._layer_parts)

    def reset_parameters(self, parts) -> None:
        if self.last:
            nn.init.normal_(self.bias_MD, std=0.02)
        # The read is one more residual branch per layer: give its output projection the block's residual
        # initialisation (GPT-2: 0.02 / sqrt(2 L), memscale.models.layers.init_weights).
        for read in parts:
            nn.init.normal_(read.out.weight, std=0.02 / math.sqrt(2 * self.num_layers))
            nn.init.zeros_(read.out.bias)

    def forget(self, written_BMD: Tensor) -> Tensor:
        """Biased memory normalisation: m <- sqrt(D) (m + b) / ||m + b||, per slot."""
        return F.normalize(written_BMD + self.bias_MD.to(written_BMD.dtype), dim=-1) * math.sqrt(self.d_model)

    def init_state(self, batch_size: int, *, device, dtype) -> MemoryState:
        if not self.last:
            return MemoryState()  # the initial memory is the last stage's
        # The terminal state of forgetting: BMN of an empty write.
        mem_MD = (F.normalize(self.bias_MD, dim=-1) * math.sqrt(self.d_model)).to(device=device, dtype=dtype)
        return MemoryState({"mem": mem_MD.unsqueeze(0).expand(batch_size, -1, -1)})

    def begin(self, state, *, num_tokens, device, dtype):
        return {"mem": state["mem"].to(dtype)}, {}

    def exit(self, h_BTD: Tensor, state: MemoryState, *, num_tokens: int) -> tuple[Tensor, dict[str, Tensor]]:
        return h_BTD, {"mem": self.forget(self.write(state["mem"].to(h_BTD.dtype), h_BTD))}

    def mean_attended_len(self, segment_len: int) -> float:
        # Each token also attends to the M slots in every layer; the write is memory overhead, not counted.
        return self.num_slots + (segment_len + 1) / 2
