"""∞-former (Martins et al., 2022, "∞-former: Infinite Memory Transformer"; code: deep-spin/infinite-former).

The paper's language model is Transformer-XL with, in every layer, a continuous long-term memory next to its
short-term memory (the official code that trains from scratch: sorting/mem_transformer.py
`RelPartialLearnableMultiHeadAttn` with `long_term_attention`, and sorting/long_term_attention.py
`LongTermAttention`). Per layer and segment:

  - short-term memory: the layer's normed inputs of the last M positions (`model.memory.mem_len`, 0: the segment
    length), attended together with the segment by Transformer-XL's relative attention, exactly as in
    memscale/models/memory/xl.py (`xl_attention`: u, v shared by all layers, `r_net` per layer,
    `clamp_len`, `same_length`); the official layer caches `mem_len + augment_len` positions (`_update_mems`
    with `augment`) and attends over the last `mem_len` of them;
  - long-term memory: the signal x(t) = B^T psi(t) on t in [0, 1], psi N Gaussian radial basis functions and B
    (N x D) coefficients fitted by ridge regression (paper, "Long-term memory"):

        B = (F F^T + lambda I)^-1 F X,    F = [psi(t_1), ..., psi(t_P)]  (N x P),  X = [x_1; ...; x_P]  (P x D)

    The vectors it takes in are the T positions that just left the short-term memory (`k = mems[:-mem_len]`,
    the `augment_len = T` oldest cached rows), so the two memories never overlap. They enter through the CNN gate
    (`mask_type='cnn'`: `reg_mask = sigmoid(Conv1d(D, D, 3, padding=1)(k)); k = k * reg_mask`, over the T
    positions), and the memory is updated *at read time*, before the read (`update_inf` inside `forward`): the
    old signal is sampled at R points placed, in order, on (0, tau], the gated vectors on (tau, 1], and B is
    refitted on these R + T points (a first block is fitted alone on [0, 1]). The read uses the refitted B inside
    the segment's graph, which is how the gate learns; what is carried to the next segment is B detached
    (`self.B_past = B.detach()`).
  - read (continuous attention): the short-term attention's own queries q (`q = w_head_q`, without u); per head
    keys K_h = B W_K^h and values V_h = B W_V^h (no bias); mu = sigmoid(w_mu^T K_h q / sqrt(K)),
    sigma^2 = softplus(w_sigma^T K_h q / sqrt(K)) (w_mu, w_sigma N -> 1 maps shared by the heads, sigma^2 floored
    at 1e-6), and the context V_h^T E_{N(t; mu, sigma^2)}[psi(t)], with each basis function's expectation in
    closed form N(mu; mu_n, sigma^2 + sigma_n^2). Heads go through `attn_out` (no bias) and the result is *added
    to the short-term attention output* (`attn_out += a_long_term`) before the residual.
  - KL regulariser (`kl_regularizer`, on in every official config): KL(N(mu, sigma^2) || N(mu, sigma_0^2)) =
    1/2 (sigma^2 / sigma_0^2 - log(sigma^2 / sigma_0^2) - 1) per head and query, summed over the layers and
    averaged over rows, heads and queries, times `kl_m` (sorting/run_sort_inftyformer.sh: 1e-6, sigma_0 0.05),
    added to the loss: `loss + kl_m * kl_reg.mean()`. Here it is the layer's auxiliary loss
    (`LayerMemory.aux_loss`): kl_lambda x sum over the segment's positions of the mean over heads, in the units
    of the token-loss sum, so that divided by the targets (B x T of them) it is the official term. Rows whose
    long-term memory is still empty read nothing and add no KL (the official layer skips the long-term
    attention while `len(k) == 0`).
  - sticky memories (GPT-2 code, `sticky_memories`): the R old-signal sample locations are drawn from the
    histogram (128 bins) of the mass that the *previous* read's densities put on the old signal (`attn_past`,
    saved by the read and used by the next `update_inf`). The histogram is carried in the state; without
    sticky memories the locations are k / R (k = 1..R).

A row whose document ends is reset to empty memories; its short-term memory is masked out until it refills,
and its long-term memory reads as exactly zero until a first block has left the short-term memory.

Numbers: N / 2 centres on linspace(0, 1), each with both widths (0.01, 0.05) (sorting/long_term_attention.py);
the fit zero-pads the signal with half its number of points on each side, 1/P apart (`padding=True`; the
official update fit shifts these pads by 1/(2T + R) instead of 1/(2P), a typo-sized difference); new vectors at
cell centres (j - 1/2) / T in a first fit, at tau + (1 - tau) j / T (j = 1..T) in an update; uniform old samples
at k / R; sticky samples at the left edge of their bin. tau, lambda, R, N, M, the gate and the KL term are
`model.memory.tau`, `ridge_lambda`, `num_samples`, `num_basis`, `mem_len`, `gate`, `kl_lambda` / `sigma_0`.

What still differs from the official language model:
  - the shared Block: pre-norm (official post-norm), q/k/v and output projections with biases, GPT-2 MLP; the
    short-term memory caches the normed layer input, as memscale's xl does (see xl.py);
  - defaults: N = 128 basis functions (official 512), ridge lambda 0.5 (the GPT-2 code's; the Transformer-XL
    code's is 1), tau 0.75 (Transformer-XL code; GPT-2 code 0.5), and sticky memories on, which only the GPT-2
    code has;
  - the GPT-2 code's KL has its mean term reversed (`if self.mu_0 > 0:` drops the mean term, so its configs'
    mu_0 = -1 adds (mu + 1)^2 / sigma_0^2); memscale follows the Transformer-XL code and the paper (no mean term);
  - mem_len must be a multiple of the segment length, so that the block leaving the short-term memory is one
    whole segment (the official code uses mem_len = augment_len = tgt_len), and every segment has that length.

Legend: B batch, L layers, T segment tokens, M short-term positions, A = M + T cached positions, C = M + T keys,
N basis functions, D width, H heads, K head width, R resampled points of the old signal, P fit points (R + T, or
T), Z sticky-memory bins, Q = H * T read densities of a row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memscale.kernels.gaussian_read import gaussian_read
from memscale.models.memory.base import LayerMemory, MemoryKind, MemoryState, layer_state_name
from memscale.models.memory.xl import (
    causal_mask,
    clamp_distances,
    relative_positions,
    slide,
    use_fused,
    xl_attention,
)

BASIS_WIDTHS = (0.01, 0.05)
"""Standard deviations of the basis functions, all used at every centre (sorting/long_term_attention.py)."""
SIGMA_SQ_MIN = 1e-6
"""Floor on the read density's variance (sorting/long_term_attention.py `torch.clamp(sigma_sq, min=1e-6)`; the
GPT-2 code's floor is 1e-4)."""
NUM_STICKY_BINS = 128
"""Histogram bins of the sticky-memory sampling (official: `torch.linspace(0, 1, 129)` edges)."""


# ------------------------------------------------------------------------------------------------------------
# The continuous signal: basis, ridge fit, Gaussian expectation; pure functions, in any float dtype.


def basis_parameters(num_basis: int, *, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Centres mu_N and widths sigma_N: N / 2 centres on linspace(0, 1), each with every width of BASIS_WIDTHS.

    In the official meshgrid order: (c0, w0), (c0, w1), (c1, w0), ...
    """
    centres = torch.linspace(0.0, 1.0, num_basis // len(BASIS_WIDTHS), dtype=dtype)
    mu_N = centres.repeat_interleave(len(BASIS_WIDTHS))
    sigma_N = torch.tensor(BASIS_WIDTHS, dtype=dtype).repeat(len(centres))
    return mu_N, sigma_N


def evaluate_basis(t: Tensor, mu_N: Tensor, sigma_N: Tensor) -> Tensor:
    """psi(t): positions [..., P] -> [..., P, N], basis function n being the density N(t; mu_n, sigma_n^2)."""
    z = (t.unsqueeze(-1) - mu_N) / sigma_N
    return torch.exp(-0.5 * z * z) / (sigma_N * math.sqrt(2 * math.pi))


def padded_positions(t_P: Tensor) -> Tensor:
    """Fit positions with the official zero padding: floor(P / 2) points 1/P apart on each side of [0, 1]."""
    P = t_P.shape[0]
    pad = (torch.arange(P // 2, dtype=t_P.dtype, device=t_P.device) + 0.5) / P
    return torch.cat([-pad.flip(0), t_P, 1.0 + pad])


def ridge_fit_matrix(t_P: Tensor, mu_N: Tensor, sigma_N: Tensor, *, ridge_lambda: float) -> Tensor:
    """G (N x P) with B = G X: the ridge fit of values at t_P, zero-padded as in `padded_positions`.

    The padded values are zero, so only the columns of the data points of (F F^T + lambda I)^-1 F are needed.
    """
    P = t_P.shape[0]
    F_NA = evaluate_basis(padded_positions(t_P), mu_N, sigma_N).T
    gram_NN = F_NA @ F_NA.T + ridge_lambda * torch.eye(len(mu_N), dtype=F_NA.dtype, device=F_NA.device)
    return torch.linalg.solve(gram_NN, F_NA[:, P // 2 : P // 2 + P])


def gaussian_expectation(mu: Tensor, sigma_sq: Tensor, mu_N: Tensor, sigma_N: Tensor) -> Tensor:
    """E_{N(t; mu, sigma^2)}[psi_n(t)] = N(mu; mu_n, sigma^2 + sigma_n^2), in closed form: [...] -> [..., N].

    Integrated over the whole line, as in the official ContinuousSoftmax (basis_functions.py,
    `_integrate_product_of_gaussians`); autograd through this formula gives the gradient that its hand-written
    backward computes.
    """
    var = sigma_sq.unsqueeze(-1) + sigma_N * sigma_N
    diff = mu.unsqueeze(-1) - mu_N
    return torch.exp(-0.5 * diff * diff / var) / torch.sqrt(2 * math.pi * var)


def sticky_mass(mu_BQ: Tensor, sigma_BQ: Tensor, *, num_bins: int) -> Tensor:
    """The histogram (B x Z, unnormalised) of the mass that the Q densities N(mu, sigma^2) of a row put in each of
    Z equal bins of [0, 1] (official `update_inf` with sticky_memories: `n.cdf(bins[1:]) - n.cdf(bins[:-1])`
    summed over the row's queries and heads)."""
    edges_Z1 = torch.linspace(0.0, 1.0, num_bins + 1, dtype=mu_BQ.dtype, device=mu_BQ.device)
    # The outer edges move out by 1e-6 as in the official code, so that mass exactly at 0 or 1 is counted.
    cdf_edges = torch.cat([edges_Z1[:1] - 1e-6, edges_Z1[1:-1], edges_Z1[-1:] + 1e-6])
    cdf_BQZ1 = torch.special.ndtr((cdf_edges - mu_BQ.unsqueeze(-1)) / sigma_BQ.unsqueeze(-1))
    return cdf_BQZ1.diff(dim=-1).sum(dim=1)


def sample_bins(mass_BZ: Tensor, *, num_samples: int) -> Tensor:
    """R sample locations per row, in increasing order: bins drawn from the histogram `mass_BZ`, each at its
    left edge (the official in-bin offset is drawn from a one-category distribution, so it is always 0). The draw
    uses torch's global generator, so a replay that restores the RNG state draws the same locations."""
    num_bins = mass_BZ.shape[-1]
    edges_Z1 = torch.linspace(0.0, 1.0, num_bins + 1, dtype=mass_BZ.dtype, device=mass_BZ.device)
    bins_BR = torch.multinomial(mass_BZ, num_samples, replacement=True)
    return edges_Z1[bins_BR].sort(dim=-1).values


def sticky_positions(mu_BQ: Tensor, sigma_BQ: Tensor, *, num_samples: int, num_bins: int) -> Tensor:
    """R sample locations per row drawn from the histogram of its read densities (`sticky_mass`, `sample_bins`)."""
    return sample_bins(sticky_mass(mu_BQ, sigma_BQ, num_bins=num_bins), num_samples=num_samples)


def gaussian_kl(
    sigma_sq: Tensor, sigma_0: float, *, mu: Tensor | None = None, mu_0: float | None = None
) -> Tensor:
    """KL(N(mu, sigma^2) || N(mu_0, sigma_0^2)) elementwise; without mu_0, the reference has the density's own mean
    (the paper's regulariser, and the Transformer-XL code's `mu_0 = None` branch):

        KL = 1/2 (sigma^2 / sigma_0^2 - log(sigma^2 / sigma_0^2) - 1 [+ (mu - mu_0)^2 / sigma_0^2])

    (sorting/long_term_attention.py `kl_reg`).
    """
    ratio = sigma_sq / sigma_0**2
    kl = 0.5 * (ratio - torch.log(ratio) - 1)
    if mu_0 is not None:
        kl = kl + 0.5 * (mu - mu_0) ** 2 / sigma_0**2
    return kl


# ------------------------------------------------------------------------------------------------------------


def split_heads(x_BSD: Tensor, head_dim: int) -> Tensor:
    B, S, _ = x_BSD.shape
    return x_BSD.view(B, S, -1, head_dim).transpose(1, 2)


class LongTermAttention(LayerMemory):
    """One layer of the ∞-former: relative attention over [short-term memory; segment] plus the continuous
    attention over the long-term memory, which takes in (gated) the block that leaves the short-term memory.

    State: `mem` [B, M + T, D] the cached normed inputs (the oldest T rows are the block that enters the long-term
    memory at this segment, the last M the short-term memory); `coef` [B, N, D] float32 the basis coefficients;
    `mass` [B, Z] float32 the sticky-memory histogram of the last read. Under tensor parallelism all three are
    replicated: each rank reads with its own heads, the histogram is summed over the ranks' heads, and every rank
    draws alike from the default generator, so the copies stay equal; the KL term is summed over the ranks.
    """

    context_names = (
        "mask", "valid", "pos", "u", "v", "empty", "evict",
        "basis_mu", "basis_sigma", "fit_first", "fit_update", "psi_uniform",
    )  # fmt: skip
    state_names = ("mem", "coef", "mass")

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_basis: int,
        *,
        sticky: bool,
        num_samples: int,
        gate: bool = True,
        kl_lambda: float = 0.0,
        sigma_0: float = 0.05,
        fused: bool = True,
        flex: bool = False,
        same_length: bool = False,
    ):
        super().__init__()
        self.fused = fused
        """`model.attention` is fused or flex: the short-term attention by a fused kernel, as in xl."""
        self.flex = flex
        """`model.attention == "flex"`: FlexAttention, else the blockwise kernel (as in xl.py)."""
        self.same_length = same_length
        self.sticky = sticky
        self.num_samples = num_samples
        self.num_heads = num_heads
        """Heads of the whole layer: the KL term averages over them (a tensor-parallel rank holds a share)."""
        self.kl_lambda = kl_lambda
        self.sigma_0 = sigma_0
        self.aux_loss = kl_lambda > 0
        self.r_net = nn.Linear(d_model, d_model, bias=False)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.mu = nn.Linear(num_basis, 1, bias=False)
        self.sigma = nn.Linear(num_basis, 1, bias=False)
        self.gate = nn.Conv1d(d_model, d_model, 3, padding=1) if gate else None
        if self.gate is not None:
            self.gate.param_roles = {"weight": "matrix", "bias": "bias"}
        self.tp_group = None
        """The tensor-parallel group when the heads are split over ranks (set by parallelize)."""

    def attention(self, attn, h_BTD, ctx, state):
        T = h_BTD.shape[1]
        mem_BAD = state["mem"]
        out_BTD, q_BHTK = xl_attention(
            attn,
            self.r_net,
            h_BTD,
            mem_BAD[:, T:],
            ctx,
            fused=use_fused(self, attn),
            flex=self.flex,
            same_length=self.same_length,
        )
        # The block that leaves the short-term memory now enters the long-term one, through the gate.
        x_BTD = mem_BAD[:, :T].to(h_BTD.dtype)
        if self.gate is not None:
            x_BTD = x_BTD * torch.sigmoid(self.gate(x_BTD.transpose(1, 2))).transpose(1, 2)
        coef_old_BND, empty_B, evict_B = state["coef"], ctx["empty"], ctx["evict"]
        coef_BND = fit_memory(
            coef_old_BND,
            x_BTD,
            state["mass"] if self.sticky else None,
            empty_B,
            fits=(ctx["fit_first"], ctx["fit_update"], ctx["psi_uniform"]),
            basis=(ctx["basis_mu"], ctx["basis_sigma"]),
            num_samples=self.num_samples,
        )
        coef_BND = torch.where(evict_B.view(-1, 1, 1), coef_BND, coef_old_BND)
        # An empty memory has zero coefficients and the value and output maps have no bias, so it reads as
        # exactly zero: the official "no long-term attention until there is a memory", without a branch.
        long_BTD, mu_BHT, sigma_sq_BHT = self(
            q_BHTK, coef_BND.to(h_BTD.dtype), ctx["basis_mu"], ctx["basis_sigma"]
        )
        mass_BZ = state["mass"]
        if self.sticky:
            with torch.no_grad():
                mass_BZ = sticky_mass(
                    mu_BHT.float().flatten(1),
                    sigma_sq_BHT.float().sqrt().flatten(1),
                    num_bins=NUM_STICKY_BINS,
                )
                if self.tp_group is not None:  # the histogram of all heads, the same on every rank
                    import torch.distributed as dist

                    dist.all_reduce(mass_BZ, group=self.tp_group)
        new = (slide(mem_BAD, h_BTD.detach(), dim=1).detach(), coef_BND.detach(), mass_BZ)
        if not self.aux_loss:
            return out_BTD + long_BTD, new
        readable_B = ~empty_B | evict_B
        # In float32 at least: sigma^2 / sigma_0^2 spans orders of magnitude.
        sigma_sq_BHT = sigma_sq_BHT.to(torch.promote_types(sigma_sq_BHT.dtype, torch.float32))
        kl_BT = gaussian_kl(sigma_sq_BHT, self.sigma_0).sum(dim=1) / self.num_heads
        aux = self.kl_lambda * (kl_BT.sum(dim=1) * readable_B).sum()
        if self.tp_group is not None:
            # Each rank holds its heads' share: summed forward, identity backward (each rank's gradient is that
            # of its own heads, as for the token loss, which every rank also holds whole).
            from megatron.core import tensor_parallel as mtp

            aux = mtp.reduce_from_tensor_model_parallel_region(aux, group=self.tp_group)
        return out_BTD + long_BTD, (*new, aux)

    def forward(self, q_BHTK: Tensor, coef_BND: Tensor, mu_N: Tensor, sigma_N: Tensor):
        """-> output B x T x D, and the densities' mu and sigma^2 (B x H x T)."""
        K = q_BHTK.shape[-1]
        keys_BHNK = split_heads(self.key(coef_BND), K)
        values_BHNK = split_heads(self.value(coef_BND), K)
        scores_BHTN = q_BHTK @ keys_BHNK.transpose(-1, -2) / math.sqrt(K)
        mu_BHT = torch.sigmoid(self.mu(scores_BHTN)).squeeze(-1)
        sigma_sq_BHT = F.softplus(self.sigma(scores_BHTN)).squeeze(-1).clamp_min(SIGMA_SQ_MIN)
        context_BHTK = gaussian_read(
            mu_BHT, sigma_sq_BHT, mu_N.to(q_BHTK.dtype), sigma_N.to(q_BHTK.dtype), values_BHNK
        )
        B, H, T, K = context_BHTK.shape
        return self.out(context_BHTK.transpose(1, 2).reshape(B, T, H * K)), mu_BHT, sigma_sq_BHT


def fit_memory(
    coef_BND: Tensor,
    x_BTD: Tensor,
    mass_BZ: Tensor | None,
    empty_B: Tensor,
    *,
    fits: tuple[Tensor, Tensor, Tensor],
    basis: tuple[Tensor, Tensor],
    num_samples: int,
) -> Tensor:
    """The long-term memory after taking in `x_BTD` (`update_inf`): the old signal resampled onto (0, tau], the
    new vectors on (tau, 1]; rows marked `empty_B` fit `x_BTD` alone on [0, 1].

    Differentiable in `x_BTD` (the gate learns through the read of the refitted memory), not in the old
    coefficients, which are a detached state (`B_past`). `mass_BZ`: the sticky-memory histogram (None: uniform
    samples); `fits` are the kind's `fit_matrices`, `basis` its centres and widths. float32 throughout.
    """
    G_first_NT, G_update_NP, psi_uniform_RN = fits
    x_BTD = x_BTD.float()
    coef_BND = coef_BND.detach()
    with torch.no_grad():
        if mass_BZ is not None:
            t_BR = sample_bins(mass_BZ.float(), num_samples=num_samples)
            old_BRD = evaluate_basis(t_BR, basis[0].float(), basis[1].float()) @ coef_BND
        else:
            old_BRD = psi_uniform_RN @ coef_BND
    updated_BND = G_update_NP @ torch.cat([old_BRD, x_BTD], dim=1)
    first_BND = G_first_NT @ x_BTD
    return torch.where(empty_B.view(-1, 1, 1), first_BND, updated_BND)


class InfinityMemory(MemoryKind):
    kind = "infinity"
    topology = "per_layer"
    carries_grad = False
    absolute_positions = False

    def __init__(self, **kw):
        super().__init__(**kw)
        cfg = self.cfg
        N = cfg.num_basis
        if N % len(BASIS_WIDTHS):
            raise ValueError(
                f"model.memory.num_basis={N} must be a multiple of {len(BASIS_WIDTHS)}: every centre carries "
                f"one basis function per width {BASIS_WIDTHS}; use e.g. {N + 1}"
            )
        self.mem_len = cfg.mem_len or self.segment_len
        if self.mem_len % self.segment_len:
            raise ValueError(
                f"model.memory.mem_len={cfg.mem_len} must be a multiple of data.segment_len={self.segment_len} for "
                "infinity: the block that leaves the short-term memory is one segment; use e.g. "
                f"{self.segment_len * max(1, self.mem_len // self.segment_len)}"
            )
        self.num_basis = N
        D, H = self.d_model, self.num_heads
        self._layer_parts = [
            LongTermAttention(
                D,
                H,
                N,
                sticky=cfg.sticky,
                num_samples=cfg.num_samples,
                gate=cfg.gate,
                kl_lambda=cfg.kl_lambda,
                sigma_0=cfg.sigma_0,
                fused=self.attention != "reference",
                flex=self.attention == "flex",
                same_length=cfg.same_length,
            )
            for _ in self.layers
        ]
        self.u_HK = nn.Parameter(torch.empty(H, D // H))  # r_w_bias, shared by all layers (as in xl)
        self.v_HK = nn.Parameter(torch.empty(H, D // H))  # r_r_bias
        mu_N, sigma_N = basis_parameters(N)
        # Buffers, so that they follow the module across devices; the fits rebuild them in float64.
        self.basis_mu_N: Tensor
        self.basis_sigma_N: Tensor
        self.register_buffer("basis_mu_N", mu_N.float(), persistent=False)
        self.register_buffer("basis_sigma_N", sigma_N.float(), persistent=False)
        self._fits: dict[tuple[int, torch.device], tuple[Tensor, Tensor, Tensor]] = {}
        self.reset_parameters(self._layer_parts)

    def reset_parameters(self, parts) -> None:
        # sorting/train.py `weights_init`: Linear weights (r_net among them) and r_w_bias / r_r_bias ~ N(0, 0.02);
        # the gate's Conv1d is no Linear there and keeps PyTorch's default initialisation.
        for p in (*(part.r_net.weight for part in parts), self.u_HK, self.v_HK):
            nn.init.normal_(p, std=0.02)
        for part in parts:
            if part.gate is not None:
                part.gate.reset_parameters()

    # -- state -----------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device, dtype) -> MemoryState:
        A, D = self.mem_len + self.segment_len, self.d_model
        tensors: dict[str, Tensor] = {}
        for layer in self.layers:
            tensors[layer_state_name("mem", layer)] = torch.zeros(
                batch_size, A, D, device=device, dtype=dtype
            )
            # Coefficients stay float32 whatever the model dtype: each update refits the previous fit, and bf16
            # rounding would compound over a long document.
            tensors[layer_state_name("coef", layer)] = torch.zeros(
                batch_size, self.num_basis, D, device=device
            )
            # A flat histogram until a read has happened (only read by an update, which a read precedes).
            tensors[layer_state_name("mass", layer)] = torch.ones(batch_size, NUM_STICKY_BINS, device=device)
        tensors["valid"] = torch.zeros(batch_size, A, dtype=torch.bool, device=device)
        tensors["empty"] = torch.ones(batch_size, dtype=torch.bool, device=device)
        return MemoryState(tensors)

    def fit_matrices(self, T: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(G_first N x T, G_update N x (R + T), psi_uniform R x N), float32, built once per segment length.

        G_first fits a first segment alone on [0, 1]; G_update fits R old samples on (0, tau] and T new
        vectors on (tau, 1]; psi_uniform evaluates the old signal at the non-sticky sample locations k / R.
        """
        key = (T, device)
        if key not in self._fits:
            R, tau, lam = self.cfg.num_samples, self.cfg.tau, self.cfg.ridge_lambda
            mu_N, sigma_N = basis_parameters(self.num_basis)
            j = torch.arange(1, T + 1, dtype=torch.float64)
            k = torch.arange(1, R + 1, dtype=torch.float64)
            t_first_T = (j - 0.5) / T
            t_update_P = torch.cat([k * tau / R, tau + (1 - tau) * j / T])
            G_first_NT = ridge_fit_matrix(t_first_T, mu_N, sigma_N, ridge_lambda=lam)
            G_update_NP = ridge_fit_matrix(t_update_P, mu_N, sigma_N, ridge_lambda=lam)
            psi_uniform_RN = evaluate_basis(k / R, mu_N, sigma_N)
            self._fits[key] = tuple(
                m.to(device=device, dtype=torch.float32) for m in (G_first_NT, G_update_NP, psi_uniform_RN)
            )
        return self._fits[key]

    def fit(
        self, coef_BND: Tensor, x_BTD: Tensor, empty_B: Tensor, *, mass_BZ: Tensor | None = None
    ) -> Tensor:
        """A long-term memory after taking in `x_BTD` (`fit_memory`) with this kind's basis, fit matrices and number
        of samples; `mass_BZ` a sticky-memory histogram (None: uniform samples)."""
        return fit_memory(
            coef_BND,
            x_BTD,
            mass_BZ,
            empty_B,
            fits=self.fit_matrices(x_BTD.shape[1], x_BTD.device),
            basis=(self.basis_mu_N, self.basis_sigma_N),
            num_samples=self.cfg.num_samples,
        )

    # -- hooks -----------------------------------------------------------------------------------------------
    def begin(self, state, *, num_tokens, device, dtype):
        T, M = num_tokens, self.mem_len
        if T != self.segment_len:
            raise ValueError(
                f"infinity runs segments of data.segment_len={self.segment_len} tokens, got {T}: the block that "
                "leaves its short-term memory each segment is one segment long"
            )
        valid_BA = state["valid"]
        B = valid_BA.shape[0]
        G_first_NT, G_update_NP, psi_uniform_RN = self.fit_matrices(T, device)
        dist_C = clamp_distances(torch.arange(M + T - 1, -1, -1, device=device), self.cfg.clamp_len)
        # With mem_len a multiple of T, the oldest block is either wholly valid or wholly not: its first row says.
        evict_B = valid_BA[:, 0]
        ctx = {
            "mask": causal_mask(valid_BA[:, T:], T, same_length=self.cfg.same_length, dtype=dtype),
            "valid": valid_BA[:, T:],
            "pos": relative_positions(
                dist_C, self.d_model, dropout=self.dropout, training=self.training, dtype=dtype
            ),
            "u": self.u_HK,
            "v": self.v_HK,
            "empty": state["empty"],
            "evict": evict_B,
            "basis_mu": self.basis_mu_N,
            "basis_sigma": self.basis_sigma_N,
            "fit_first": G_first_NT,
            "fit_update": G_update_NP,
            "psi_uniform": psi_uniform_RN,
        }
        new = {"valid": slide(valid_BA, valid_BA.new_ones(B, T), dim=1), "empty": state["empty"] & ~evict_B}
        return ctx, new

    def mean_attended_len(self, segment_len: int) -> float:
        # M cached positions plus the causal past (exactly M with same_length), and the N basis keys and values.
        short = float(self.mem_len) if self.cfg.same_length else self.mem_len + (segment_len + 1) / 2
        return self.num_basis + short
