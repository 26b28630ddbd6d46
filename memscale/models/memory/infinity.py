"""∞-former (Martins et al., 2022, "∞-former: Infinite Memory Transformer"; code: deep-spin/infinite-former).

Each layer keeps a continuous long-term memory: the signal x(t) = B^T psi(t) on t in [0, 1], where psi are N
Gaussian radial basis functions and B (N x D) are coefficients fitted by ridge regression to the vectors the
layer has seen (paper, "Long-term memory"):

    B = (F F^T + lambda I)^-1 F X,    F = [psi(t_1), ..., psi(t_P)]  (N x P),  X = [x_1; ...; x_P]  (P x D)

Read (continuous attention): per head h and query q, keys K_h = B W_K^h and values V_h = B W_V^h;
mu = sigmoid(w_mu^T K_h q / sqrt(K)), sigma^2 = softplus(w_sigma^T K_h q / sqrt(K)), and the context is
V_h^T E_{N(t; mu, sigma^2)}[psi(t)], where the expectation of each Gaussian basis function under the Gaussian
density is a product of Gaussians integrated in closed form: N(mu; mu_n, sigma^2 + sigma_n^2). The heads go
through an output projection and the result is added to the layer's causal self-attention output.

Update ("Unbounded memory"), after each segment and without gradient: the old signal is sampled at R points
and placed, in order, on (0, tau]; the layer's T new input vectors go on (tau, 1]; B is refitted on these
R + T points. With sticky memories the R sample locations are drawn from the histogram (128 bins) of the mass
that this segment's read densities put on the old signal, so the regions read most keep the most resolution.
A row whose memory is empty (start of a document) reads nothing and fits its first segment alone on [0, 1].

Which official file each choice follows. memscale's decoder is a pre-norm GPT-2 with absolute positions, so
the wiring is that of the GPT-2 code (finetune_gpt2/src/transformers/models/gpt2/long_term_attention.py and
modeling_gpt2.py):
  - the queries are the self-attention's own queries; K, V and output projections have no bias; w_mu and
    w_sigma are N -> 1 maps shared by the heads of a layer; sigma^2 is clamped at 1e-4;
  - N / 2 centres on linspace(0, 1), each with both widths (0.01, 0.05): the widths of the Transformer-XL code
    that trains from scratch (sorting/long_term_attention.py). The GPT-2 code's widths (0.005, 0.01) go with
    its N = 512; at memscale's default N = 128 the centres are 1/63 apart and those widths leave gaps;
  - the fit zero-pads the signal with half its number of points on each side, 1/P apart (`padding=True`; the
    official update fit shifts these pads by 1/(2T + R) instead of 1/(2P), a typo-sized difference). The
    padding pins down the basis functions centred at the ends, half of whose support lies outside [0, 1], at
    the price of pulling the last hundredths at each end towards 0 (measured in the tests);
  - new vectors at cell centres (j - 1/2) / T in a first fit, at tau + (1 - tau) j / T (j = 1..T) in an
    update; uniform old samples at k / R (k = 1..R); sticky samples at the left edge of their bin (the
    official in-bin offset is drawn from a one-category distribution, so it is always 0);
  - tau, lambda and R are `model.memory.tau`, `ridge_lambda` and `num_samples`.
Left out: the CNN gate on the memorised vectors and the KL regulariser towards N(mu_0, 0.05^2) of the
official training configs. The gate would learn only if the fit ran inside the next segment's graph, and the
KL term needs an auxiliary loss, which the memory protocol does not carry.

The vectors memorised are the layer's normed inputs LN_1(x), the tensor the attention hook receives. The GPT-2
code memorises the raw residual stream x; the post-norm Transformer-XL code memorises normed vectors, as here.

Legend: B batch, L layers, T segment tokens, N basis functions, D width, H heads, K head width, R resampled
points of the old signal, P fit points (R + T, or T), A fit points with padding, Z sticky-memory bins,
Q = H * T read densities of a row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memscale.kernels.gaussian_read import gaussian_read
from memscale.models.memory.base import LayerMemory, MemoryKind, MemoryState, layer_state_name

BASIS_WIDTHS = (0.01, 0.05)
"""Standard deviations of the basis functions, all used at every centre (sorting/long_term_attention.py)."""
SIGMA_SQ_MIN = 1e-4
"""Floor on the read density's variance (finetune_gpt2/.../long_term_attention.py)."""
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


def sticky_positions(mu_BQ: Tensor, sigma_BQ: Tensor, *, num_samples: int, num_bins: int) -> Tensor:
    """R sample locations per row, in increasing order, drawn from the histogram of its read densities.

    Each bin's probability is the total mass that the Q densities N(mu, sigma^2) of a row put in it
    (official `update_inf` with sticky_memories); the draw uses torch's global generator, so a replay that
    restores the RNG state draws the same locations.
    """
    edges_Z1 = torch.linspace(0.0, 1.0, num_bins + 1, dtype=mu_BQ.dtype, device=mu_BQ.device)
    # The outer edges move out by 1e-6 as in the official code, so that mass exactly at 0 or 1 is counted.
    cdf_edges = torch.cat([edges_Z1[:1] - 1e-6, edges_Z1[1:-1], edges_Z1[-1:] + 1e-6])
    cdf_BQZ1 = torch.special.ndtr((cdf_edges - mu_BQ.unsqueeze(-1)) / sigma_BQ.unsqueeze(-1))
    mass_BZ = cdf_BQZ1.diff(dim=-1).sum(dim=1)
    bins_BR = torch.multinomial(mass_BZ, num_samples, replacement=True)
    return edges_Z1[bins_BR].sort(dim=-1).values


# ------------------------------------------------------------------------------------------------------------


def split_heads(x_BSD: Tensor, head_dim: int) -> Tensor:
    B, S, _ = x_BSD.shape
    return x_BSD.view(B, S, -1, head_dim).transpose(1, 2)


class LongTermAttention(LayerMemory):
    """One layer's continuous attention over its long-term memory, and the memory's update after the segment.

    The layer's state `coef` [B, N, D] (float32) holds the basis coefficients; keys and values are its
    projections, split by heads of the attention's head width. Under tensor parallelism `coef` is replicated and
    each rank reads with its own heads; sticky sampling draws from the densities of all heads of a row, so a
    split layer (`tp_group` set by memscale.parallel.tensor.parallelize) all-gathers mu and sigma^2 over the ranks
    before `refit`, and every rank draws alike from the default generator: the copies of `coef` stay equal.
    """

    context_names = ("empty", "basis_mu", "basis_sigma", "fit_first", "fit_update", "psi_uniform")
    state_names = ("coef",)

    def __init__(self, d_model: int, num_heads: int, num_basis: int, *, sticky: bool, num_samples: int):
        super().__init__()
        self.sticky = sticky
        self.num_samples = num_samples
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.mu = nn.Linear(num_basis, 1, bias=False)
        self.sigma = nn.Linear(num_basis, 1, bias=False)
        self.tp_group = None
        """The tensor-parallel group when the heads are split over ranks (set by parallelize)."""

    def attention(self, attn, h_BTD, ctx, state):
        q_BHTK, k_BHTK, v_BHTK = attn.project(h_BTD)
        out_BTD = attn.merge(attn.attend(q_BHTK, k_BHTK, v_BHTK, is_causal=True))
        coef_BND = state["coef"]
        # An empty memory has zero coefficients and the value and output maps have no bias, so it reads as
        # exactly zero: the official "no long-term attention until there is a memory", without a branch.
        long_BTD, mu_BHT, sigma_sq_BHT = self(
            q_BHTK, coef_BND.to(h_BTD.dtype), ctx["basis_mu"], ctx["basis_sigma"]
        )
        if self.sticky and self.tp_group is not None:
            # Every rank refits the same replicated coefficients: the sampling sees the densities of all heads.
            mu_BHT, sigma_sq_BHT = (gather_heads(t.detach(), self.tp_group) for t in (mu_BHT, sigma_sq_BHT))
        new_coef_BND = refit(
            coef_BND,
            h_BTD,
            mu_BHT,
            sigma_sq_BHT,
            ctx["empty"],
            fits=(ctx["fit_first"], ctx["fit_update"], ctx["psi_uniform"]),
            basis=(ctx["basis_mu"], ctx["basis_sigma"]),
            sticky=self.sticky,
            num_samples=self.num_samples,
        )
        return out_BTD + long_BTD, (new_coef_BND,)

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


@torch.no_grad()
def gather_heads(x_BHT: Tensor, group) -> Tensor:
    """All heads from the tensor-parallel ranks' shares (dim 1, in rank order: rank r holds heads r H/n ..)."""
    import torch.distributed as dist

    parts = [torch.empty_like(x_BHT) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x_BHT.contiguous(), group=group)
    return torch.cat(parts, dim=1)


@torch.no_grad()
def refit(
    coef_BND: Tensor,
    x_BTD: Tensor,
    mu_BHT: Tensor | None,
    sigma_sq_BHT: Tensor | None,
    empty_B: Tensor,
    *,
    fits: tuple[Tensor, Tensor, Tensor],
    basis: tuple[Tensor, Tensor],
    sticky: bool,
    num_samples: int,
) -> Tensor:
    """The memory after this segment: old signal resampled onto (0, tau], new vectors on (tau, 1].

    mu and sigma^2 are the segment's read densities over the old signal, used by sticky memories only;
    `fits` are the kind's `fit_matrices`, `basis` its centres and widths.
    """
    G_first_NT, G_update_NP, psi_uniform_RN = fits
    x_BTD = x_BTD.float()
    if sticky:
        t_BR = sticky_positions(
            mu_BHT.float().flatten(1),
            sigma_sq_BHT.float().sqrt().flatten(1),
            num_samples=num_samples,
            num_bins=NUM_STICKY_BINS,
        )
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

    def __init__(self, **kw):
        super().__init__(**kw)
        N = self.cfg.num_basis
        if N % len(BASIS_WIDTHS):
            raise ValueError(
                f"model.memory.num_basis={N} must be a multiple of {len(BASIS_WIDTHS)}: every centre carries "
                f"one basis function per width {BASIS_WIDTHS}; use e.g. {N + 1}"
            )
        self.num_basis = N
        self._layer_parts = [
            LongTermAttention(
                self.d_model, self.num_heads, N, sticky=self.cfg.sticky, num_samples=self.cfg.num_samples
            )
            for _ in self.layers
        ]
        mu_N, sigma_N = basis_parameters(N)
        # Buffers, so that they follow the module across devices; the fits rebuild them in float64.
        self.basis_mu_N: Tensor
        self.basis_sigma_N: Tensor
        self.register_buffer("basis_mu_N", mu_N.float(), persistent=False)
        self.register_buffer("basis_sigma_N", sigma_N.float(), persistent=False)
        self._fits: dict[tuple[int, torch.device], tuple[Tensor, Tensor, Tensor]] = {}

    # -- state -----------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device, dtype) -> MemoryState:
        # Coefficients stay float32 whatever the model dtype: each update refits the previous fit, and bf16
        # rounding would compound over a long document.
        coefs = {
            layer_state_name("coef", layer): torch.zeros(
                batch_size, self.num_basis, self.d_model, device=device
            )
            for layer in self.layers
        }
        return MemoryState({**coefs, "empty": torch.ones(batch_size, dtype=torch.bool, device=device)})

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

    # -- hooks -----------------------------------------------------------------------------------------------
    def begin(self, state, *, num_tokens, device, dtype):
        G_first_NT, G_update_NP, psi_uniform_RN = self.fit_matrices(num_tokens, device)
        ctx = {
            "empty": state["empty"],
            "basis_mu": self.basis_mu_N,
            "basis_sigma": self.basis_sigma_N,
            "fit_first": G_first_NT,
            "fit_update": G_update_NP,
            "psi_uniform": psi_uniform_RN,
        }
        return ctx, {"empty": torch.zeros_like(state["empty"])}

    def refit(self, coef_BND, x_BTD, mu_BHT, sigma_sq_BHT, empty_B) -> Tensor:
        """One layer's memory update (`refit`) with this kind's basis, fit matrices and sampling settings."""
        return refit(
            coef_BND,
            x_BTD,
            mu_BHT,
            sigma_sq_BHT,
            empty_B,
            fits=self.fit_matrices(x_BTD.shape[1], x_BTD.device),
            basis=(self.basis_mu_N, self.basis_sigma_N),
            sticky=self.cfg.sticky,
            num_samples=self.cfg.num_samples,
        )

    def mean_attended_len(self, segment_len: int) -> float:
        # Each query also scores the N basis keys and mixes the N values of its layer's memory.
        return self.num_basis + (segment_len + 1) / 2
