"""Associative Recurrent Memory Transformer (Rodkin et al., 2024, arXiv 2407.04841; code:
RodkinIvan/associative-recurrent-memory-transformer, modeling_amt/language_modeling.py).

K learned memory tokens are appended to every segment, `[x; mem]`, under the plain causal mask, so they see the
whole segment and the segment does not see them. Every layer l keeps an associative memory A_l (F x D) and a
normaliser z_l (F), F = 2 nu d_mem, which its memory tokens write and every token reads:

    phi(u)  = normalize(DPFP_nu(u))          DPFP_nu(u) = [r(u) r(u)_{-1}, ..., r(u) r(u)_{-nu}],
                                             r(u) = [relu(u), relu(-u)], r_{-j} = r rolled by j, nu = 3
    read    q = W_Q x,  o = A^T phi(q) / (z . phi(q) + eps),  x <- x + o               (every token)
    write   k_i = W_K m_i,  v_i = W_V m_i,  beta_i = sigmoid(W_b m_i)                  (memory tokens m_i)
            vbar_i  = A^T phi(k_i) / (z . phi(k_i) + eps)     the value stored for that key so far
            gamma_i = clip(1 - (z . phi(k_i) + eps) / ||phi(k_i)||^2, 0, 1), detached
            A <- A + sum_i beta_i phi(k_i) (v_i - vbar_i)^T,   z <- z + sum_i gamma_i phi(k_i)

The delta rule (v - vbar) makes a second write of the same key replace the stored value instead of adding to it,
and gamma leaves z alone for a key already counted; eps = 1e-5. A row whose memory is empty (z = 0, start of a
document) reads exactly zero and writes with gamma = 1, as the official first segment does.

Three switches, each a deviation from the official code, measured in README "Recall probe". All three are on by
default (`write_order: normalized`, `write_norm: true`, `write_penalty: 3e-4`); `write_order: joint`,
`write_norm: false`, `write_penalty: 0` is the official write.

`model.memory.write_order`: the official update (`joint`) writes all K memory tokens against the one A the
segment read; `sequential` writes them one after another, each against the A (and z) the previous one left (the
delta rule per token, as DeltaNet applies it). Written together, K similar keys each subtract the same stored
value: the update of the value stored under a key is v - (sum_i beta_i phi_i . phi) vbar, which overshoots by up
to a factor K - 1 and grows geometrically from segment to segment. Measured on the quick start
(the bundled corpus, documents of hundreds of segments, lr 2e-3): the gradient norm reached 9e5 by step 40 and
inf by step 55, and validation perplexity ended at 1618, worse than the unigram model (546); written one by one,
the same run trained smoothly (gradient norm < 1.1 throughout, perplexity 288). `normalized` keeps the joint
write and divides each key's share by its overlap with the segment's keys (`delta_write`): a damped Jacobi step
that cannot overshoot; the same quick start trains smoothly with it (gradient norm < 1.5). For keys whose
features are orthogonal all three give the same memory (tests/test_memory_armt.py).

`model.memory.write_norm`: the official write projects the memory tokens' raw residual stream, which carries the
memory's own read (x + o): a memory that grows reads larger values, writes larger values and grows further.
Measured on the recall probe's models streaming validation text: the layer-1 memory of the sequential model
grew from norm 21 to 1.8e3 at 176 segments and 3.7e8 at 256 (the write's denominator z . phi stayed near 1 and
beta / (z . phi) <= 1.15: no single write overshot); the joint model's reached 1.6e6 by 2,048 segments, where its
recall had fallen to 0.23. With `write_norm` the keys, values and gates read the memory tokens layer-normalised,
as every other projection of a pre-norm transformer reads its input, and the feedback is cut: the same models
trained with it kept their memories at norm 46-71 over 4,096 segments, the sequential one recalled 0.59 at 262K
tokens (0.03 at 65K without), and the quick start's perplexity did not change (287.3 against 288.4). It is the
default; `write_norm: false` is the official write.

`model.memory.write_penalty`: write_penalty x T x (the mean gate beta of the segment's memory tokens) per row and
layer, the layer's auxiliary loss (`LayerMemory.aux_loss`): divided by the B x T targets of a language-model
segment it is write_penalty x the mean gate. A fact survives a long text only if the text's writes leave its key
alone, and every two keys overlap (the features are non-negative): training documents of a few segments barely
penalise a write that erodes a fact over hundreds of segments. The penalty makes every write pay. Measured on the
recall probe (normalized write, write_norm): without it the fact faded, 0.91 at 16K tokens to 0.14 at 262K; with
3e-4 the curve went flat, 0.84 at 16K, 65K and 262K, 0.86 at 524K and 0.81 at 1M, and the quick start's
perplexity was 280.8 (284.8 without).

What follows the official code, where it differs from a plain "RMT plus associative memory" reading:
  - the memory tokens are the same learned K x D parameter on every segment (`AssociativeMemoryCell.set_memory`);
    their outputs are not carried to the next segment: everything a segment passes on is in the A_l and z_l;
  - one associative head (`n_heads=1`, the default of every official script), d_mem = the attention head width
    (D / H: 64 for the GPT-2 runs of the paper, `D_MEM=64`), nu = 3 (fixed in the code); phi is normalised
    after the feature map; W_Q, W_K, W_V have no bias, W_b has one; W_V starts at zero (so A starts empty and
    learns to write through gradient from later segments); the other projections take the model's GPT-2
    initialisation (the official ones keep torch's default on top of a pretrained GPT-2).

Where the block protocol places the read and the write. The official wrapper reads before the whole layer (on
the raw residual stream) and writes from the memory tokens after the whole layer (after its MLP). A memscale
layer part sees its layer only through the attention sub-layer, given h = LN1(x), so here
  - the read queries h, the attention runs on h + o and the sub-layer returns o + attn(h + o): the residual
    stream gets x + o + attn(.), as in the official x' = x + o, x' + attn(LN(x'));
  - the write takes the memory tokens after the attention sub-layer, (h + o + attn(h + o))[-K:]: they have seen
    the whole segment (the official write sees the layer's MLP output too).

Gradient. A_l and z_l are differentiable functions of the previous segment (only gamma is detached), so gradient
flows from segment t into the writes of segment t - 1 and earlier; the training loop cuts it where BPTT stops
(`train.memory_grad`): armt is a gradient-carrying kind. With `memory_grad=detached` W_V gets no gradient at all
(its only path is a later segment's read) and stays at zero: train armt with truncated or replay, as the paper
does (full BPTT over the curriculum's segments).

Topology: per layer. The state is A_l and z_l, owned by layer l's block; the memory tokens are a parameter of the
first stage (like the embedding), not carried state. So a pipeline stage keeps its own layers' memory and sends
none, and under BPTT each stage passes the gradient of its own A_l, z_l back to its previous segment.

Tensor parallelism: W_Q, W_K, W_V, W_b and the state are replicated on every TP rank (they read and write the
full hidden states that the row-parallel attention output and the norm give every rank).

Legend: B batch, T segment tokens, K memory tokens, S = T + K, D width, E = d_mem (key width), F = 2 nu E
(feature width).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memscale.models.memory.base import LayerMemory, MemoryKind, MemoryState, layer_state_name

DPFP_NU = 3
"""nu of the DPFP feature map (fixed to 3 in the official AssociativeLayerWrapper)."""
EPS = 1e-5
"""Added to the normaliser z . phi in the read and in the delta rule (official value)."""


def dpfp(u: Tensor, nu: int = DPFP_NU) -> Tensor:
    """Deterministic parameter-free projection (Schlag et al., 2021): ... x E -> ... x 2 nu E, non-negative."""
    r = torch.cat([F.relu(u), F.relu(-u)], dim=-1)
    rolled = torch.cat([r.roll(shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)
    return r.repeat(*([1] * (u.dim() - 1)), nu) * rolled


def feature_map(u: Tensor) -> Tensor:
    """phi(u): DPFP, then L2-normalised over the feature dimension (official order), in float32."""
    return F.normalize(dpfp(u.float()), dim=-1, p=2.0)


def associative_read(A_BFD: Tensor, z_BF: Tensor, phi_BSF: Tensor) -> Tensor:
    """A^T phi / (z . phi + eps) for every row of phi: B x S x D (zero where the memory is empty)."""
    num_BSD = phi_BSF @ A_BFD
    den_BS1 = (phi_BSF @ z_BF.unsqueeze(-1)) + EPS
    return num_BSD / den_BS1


def delta_write(
    A_BFD: Tensor,
    z_BF: Tensor,
    phi_BKF: Tensor,
    v_BKD: Tensor,
    beta_BK1: Tensor,
    *,
    normalized: bool = False,
) -> tuple[Tensor, Tensor]:
    """The delta-rule update of (A, z) by K keys phi (already feature-mapped), values v and gates beta, all
    against the incoming A: A + sum_i beta_i phi_i (v_i - vbar_i)^T, z + sum_i gamma_i phi_i (module doc).

    `normalized`: each key's term is divided by its overlap with the segment's keys, s_i = sum_j phi_i . phi_j
    (>= 1: phi is non-negative and unit-norm), in A and in z. K copies of one key then write once, with the mean
    of their updates, and K orthogonal keys write exactly as the plain update does. Why it cannot overshoot: the
    stored values move by G S^-1 B (v - vbar), G the keys' Gram matrix and S = diag(s); G S^-1 is similar to
    S^-1/2 G S^-1/2, whose eigenvalues lie in [0, 1] (G is positive semi-definite with non-negative entries), so a
    repeated write moves a stored value at most all the way to its target. The plain joint update's G B has
    eigenvalues up to K: a Jacobi step where this is a damped one."""
    if normalized:
        s_BK1 = (phi_BKF @ phi_BKF.transpose(1, 2)).sum(-1, keepdim=True).clamp_min(1.0)
        beta_BK1 = beta_BK1 / s_BK1
    dot_BK1 = (phi_BKF @ z_BF.unsqueeze(-1)) + EPS
    vbar_BKD = (phi_BKF @ A_BFD) / dot_BK1
    gamma_BK1 = (1 - dot_BK1 / phi_BKF.pow(2).sum(-1, keepdim=True).clamp_min(EPS)).clamp(0, 1).detach()
    # An empty memory writes with gamma = 1 (the official first segment), not 1 - eps / ||phi||^2.
    empty_B11 = (z_BF == 0).all(-1).view(-1, 1, 1)
    gamma_BK1 = torch.where(empty_B11, torch.ones_like(gamma_BK1), gamma_BK1)
    if normalized:
        gamma_BK1 = gamma_BK1 / s_BK1
    A_new = A_BFD + (beta_BK1 * phi_BKF).transpose(1, 2) @ (v_BKD - vbar_BKD)
    z_new = z_BF + (gamma_BK1 * phi_BKF).sum(1)
    return A_new, z_new


class AssociativeLayer(LayerMemory):
    """A layer of armt: the read before the causal self-attention, the delta-rule write of its memory tokens."""

    state_names = ("A", "z")

    def __init__(
        self,
        d_model: int,
        d_mem: int,
        num_tokens: int,
        *,
        order: str = "sequential",
        write_norm: bool = False,
        write_penalty: float = 0.0,
    ):
        super().__init__()
        self.num_tokens = num_tokens
        self.order = order
        self.write_norm = write_norm
        self.write_penalty = write_penalty
        self.aux_loss = write_penalty > 0
        self.query = nn.Linear(d_model, d_mem, bias=False)
        self.key = nn.Linear(d_model, d_mem, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.beta = nn.Linear(d_model, 1)

    def read(self, h_BSD: Tensor, A_BFD: Tensor, z_BF: Tensor) -> Tensor:
        return associative_read(A_BFD, z_BF, feature_map(self.query(h_BSD))).to(h_BSD.dtype)

    def write(self, m_BKD: Tensor, A_BFD: Tensor, z_BF: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The memory tokens' delta-rule writes: one token after another (`sequential`), or all against the
        incoming A (`joint`, the official update, and `normalized`, the same divided by the keys' overlap; module
        doc). `write_norm`: the keys, values and gates read the memory tokens layer-normalised (module doc).
        Returns the new A and z and the gates beta (B x K x 1)."""
        if self.write_norm:
            m_BKD = F.layer_norm(m_BKD, m_BKD.shape[-1:])
        phi_BKF = feature_map(self.key(m_BKD))
        v_BKD = self.value(m_BKD).float()
        beta_BK1 = torch.sigmoid(self.beta(m_BKD).float())
        if self.order != "sequential":
            normalized = self.order == "normalized"
            return (*delta_write(A_BFD, z_BF, phi_BKF, v_BKD, beta_BK1, normalized=normalized), beta_BK1)
        for i in range(phi_BKF.shape[1]):
            one = slice(i, i + 1)
            A_BFD, z_BF = delta_write(A_BFD, z_BF, phi_BKF[:, one], v_BKD[:, one], beta_BK1[:, one])
        return A_BFD, z_BF, beta_BK1

    def attention(self, attn, h_BSD, ctx, state):
        A_BFD, z_BF = state["A"], state["z"]
        o_BSD = self.read(h_BSD, A_BFD, z_BF)
        x_BSD = h_BSD + o_BSD
        a_BSD = attn(x_BSD, is_causal=True)
        m_BKD = (x_BSD + a_BSD)[:, -self.num_tokens :]
        A_new, z_new, beta_BK1 = self.write(m_BKD, A_BFD, z_BF)
        if not self.aux_loss:
            return o_BSD + a_BSD, (A_new, z_new)
        # write_penalty x the mean gate, per token of the segment, in the units of the token-loss sum (module doc).
        T = h_BSD.shape[1] - self.num_tokens
        aux = self.write_penalty * T * beta_BK1.mean(dim=(1, 2)).sum()
        return o_BSD + a_BSD, (A_new, z_new, aux)


class AssociativeMemory(MemoryKind):
    """The memory tokens are the first stage's parameter, appended by `enter` and cut off by `exit`; each layer's
    associative memory lives with its block (state `A.<layer>`, `z.<layer>`)."""

    kind = "armt"
    topology = "per_layer"
    carries_grad = True

    def __init__(self, **kw):
        super().__init__(**kw)
        K, D = self.cfg.num_tokens, self.d_model
        self.num_tokens = K
        self.d_mem = D // self.num_heads
        self.num_features = 2 * DPFP_NU * self.d_mem
        if self.first:
            # Constant on every segment, so it also plays the part of the memory tokens' position embedding.
            self.mem_KD = nn.Parameter(torch.empty(K, D))
        cfg = self.cfg
        opts = {"order": cfg.write_order, "write_norm": cfg.write_norm, "write_penalty": cfg.write_penalty}
        self._layer_parts = [AssociativeLayer(D, self.d_mem, K, **opts) for _ in self.layers]
        self.reset_parameters(self._layer_parts)

    def reset_parameters(self, parts) -> None:
        if self.first:
            nn.init.normal_(self.mem_KD, std=0.02)
        for part in parts:
            if part is not None:
                nn.init.zeros_(part.value.weight)  # official: W_mv starts at zero

    def init_state(self, batch_size: int, *, device, dtype) -> MemoryState:
        # float32 whatever the model dtype: A and z are running sums over a whole document, and bf16 rounding
        # would compound over its segments (as infinity keeps its coefficients).
        F_, D = self.num_features, self.d_model
        out = {}
        for layer in self.layers:
            out[layer_state_name("A", layer)] = torch.zeros(batch_size, F_, D, device=device)
            out[layer_state_name("z", layer)] = torch.zeros(batch_size, F_, device=device)
        return MemoryState(out)

    def enter(self, x_BTD: Tensor, state: MemoryState) -> tuple[Tensor, dict[str, Tensor]]:
        mem_BKD = self.mem_KD.to(x_BTD.dtype).unsqueeze(0).expand(x_BTD.shape[0], -1, -1)
        return torch.cat([x_BTD, mem_BKD], dim=1), {}

    def exit(self, h_BSD: Tensor, state: MemoryState, *, num_tokens: int) -> tuple[Tensor, dict[str, Tensor]]:
        return h_BSD[:, :num_tokens], {}
