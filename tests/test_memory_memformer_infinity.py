"""Memformer and ∞-former: properties that only a faithful implementation has.

Tiny model everywhere (d_model 32, 2 layers, 2 heads, vocab 50, segments of 8 tokens). The numerical checks of
the ∞-former's continuous memory run in float64 where they are about the mathematics, and on the kind's own
float32 matrices where they are about what the model stores.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memscale.config import MemoryConfig, config_from_dict
from memscale.models.memory.base import MemoryState
from memscale.models.memory.infinity import (
    InfinityMemory,
    basis_parameters,
    evaluate_basis,
    gaussian_expectation,
    padded_positions,
    ridge_fit_matrix,
    sticky_mass,
    sticky_positions,
)
from memscale.models.memory.memformer import MemformerMemory
from memscale.models.transformer import MemoryTransformer

VOCAB, SEG = 50, 8
TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", f"model.vocab_size={VOCAB}",
        f"data.segment_len={SEG}"]  # fmt: skip


def build(kind: str, *extra: str, seed: int = 0) -> MemoryTransformer:
    cfg = config_from_dict({}, [f"model.memory.kind={kind}", *TINY, *extra])
    torch.manual_seed(seed)
    return MemoryTransformer(cfg.model, segment_len=cfg.data.segment_len)


def build_memformer(seed: int = 0) -> MemoryTransformer:
    return build("memformer", "model.memory.num_tokens=4", seed=seed)


def build_infinity(*extra: str, seed: int = 0) -> MemoryTransformer:
    return build("infinity", "model.memory.num_basis=16", "model.memory.num_samples=32", *extra, seed=seed)


def tokens(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEG), generator=torch.Generator().manual_seed(seed))


# ============================================================================================================
# Memformer


@pytest.mark.parametrize("own_value", ["raw", "projected"])
def test_memformer_write_is_slot_attention_over_own_slot_and_tokens(own_value):
    torch.manual_seed(0)
    kind = MemformerMemory(
        d_model=32,
        num_layers=2,
        num_heads=2,
        segment_len=SEG,
        cfg=MemoryConfig(kind="memformer", num_tokens=4, write_own_value=own_value),
    )
    mem_BMD, h_BTD = torch.randn(2, 4, 32), torch.randn(2, SEG, 32)
    written = kind.write(mem_BMD, h_BTD)

    # Reference, slot by slot: query from m_i, keys/values from [m_i; h] by the same maps, tau sharpening.
    w = kind.write
    tau, H, K = w.temperature, 2, 16
    for i in range(4):
        q = w.q(mem_BMD[:, i : i + 1]).view(2, 1, H, K).transpose(1, 2)
        # The key/value rows are laid out per head: [H, 2, K].
        k, v = w.kv(torch.cat([mem_BMD[:, i : i + 1], h_BTD], dim=1)).view(2, SEG + 1, H, 2, K).unbind(3)
        k, v = (t.transpose(1, 2) for t in (k, v))
        if own_value == "raw":  # the paper's [m_i; V_x]: the slot's own value is the slot itself
            v = torch.cat([mem_BMD[:, i : i + 1].view(2, 1, H, K).transpose(1, 2), v[:, :, 1:]], dim=2)
        p = torch.softmax(q @ k.transpose(-1, -2) / (math.sqrt(K) * tau), dim=-1)
        ref = (p @ v).transpose(1, 2).reshape(2, 32)
        torch.testing.assert_close(written[:, i], ref, rtol=1e-5, atol=1e-6)

    # Slots do not see each other: perturbing slot 2 changes slot 2 only, before and after normalisation.
    bumped = mem_BMD.clone()
    bumped[:, 2] += torch.randn(2, 32)
    written_bumped = kind.write(bumped, h_BTD)
    others = [0, 1, 3]
    torch.testing.assert_close(written_bumped[:, others], written[:, others], rtol=0, atol=1e-6)
    assert not torch.allclose(written_bumped[:, 2], written[:, 2])
    assert kind.write.temperature < 1  # the default sharpens, as the paper asks


def test_memformer_raw_own_value_keeps_the_slot_where_projected_maps_it():
    """Zero key/value maps make every slot attend uniformly to itself and the T tokens, whose values are then 0:
    the raw writer keeps m_i / (T + 1), the projected one writes m_i W_V = 0."""
    mem_BMD, h_BTD = torch.randn(2, 4, 32), torch.randn(2, SEG, 32)
    written = {}
    for own_value in ("raw", "projected"):
        cfg = MemoryConfig(kind="memformer", num_tokens=4, write_own_value=own_value)
        kind = MemformerMemory(d_model=32, num_layers=2, num_heads=2, segment_len=SEG, cfg=cfg)
        with torch.no_grad():
            kind.write.kv.weight.zero_()
            kind.write.kv.bias.zero_()
        written[own_value] = kind.write(mem_BMD, h_BTD)
    torch.testing.assert_close(written["raw"], mem_BMD / (SEG + 1), rtol=1e-6, atol=1e-7)
    assert written["projected"].abs().max() == 0


def test_memformer_biased_memory_normalisation():
    model = build_memformer()
    bias_MD = model.memory.bias_MD
    scale = math.sqrt(bias_MD.shape[-1])  # slots live at the LayerNorm scale: norm sqrt(D)
    state0 = model.init_state(3)
    torch.testing.assert_close(state0["mem"], scale * F.normalize(bias_MD, dim=-1).expand(3, -1, -1))

    out = model.step(tokens(3, 1), state0)
    norms = out.state["mem"].norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, scale))
    # The new memory is sqrt(D) (write + b) / ||write + b||, with the write on the final normed hidden states.
    written = model.memory.write(state0["mem"], out.hidden_BTD)
    torch.testing.assert_close(out.state["mem"], scale * F.normalize(written + bias_MD, dim=-1))
    # With nothing written, BMN holds the initial memory fixed: it is the terminal state of forgetting.
    torch.testing.assert_close(model.memory.forget(torch.zeros(3, 4, 32)), state0["mem"])


def test_memformer_memory_is_read_and_carries_gradient():
    model = build_memformer()
    seg1a, seg1b, seg2 = tokens(2, 1), tokens(2, 2), tokens(2, 3)
    state_a = model.step(seg1a, model.init_state(2)).state
    state_b = model.step(seg1b, model.init_state(2)).state
    logits_a = model.step(seg2, state_a).logits_BTV
    logits_b = model.step(seg2, state_b).logits_BTV
    assert (logits_a - logits_b).abs().max() > 1e-4  # the next segment reads what the first one wrote

    # The writer's parameters only shape the next segment's memory: gradient of segment 2's loss reaches them
    # through the state written by segment 1, and only when the state is not detached.
    write_q = model.memory.write.q.weight
    for detach, expect in ((False, True), (True, False)):
        model.zero_grad(set_to_none=True)
        state = model.step(seg1a, model.init_state(2)).state
        state = state.detach() if detach else state
        model.step(seg2, state, targets_BT=seg2).loss_sum.backward()
        reached = write_q.grad is not None and write_q.grad.abs().sum() > 0
        assert reached == expect


def test_memformer_reset_isolates_rows():
    model = build_memformer()
    state = model.step(tokens(2, 1), model.init_state(2)).state
    reset = model.memory.reset(state, torch.tensor([True, False]))
    torch.testing.assert_close(reset["mem"][0], model.init_state(1)["mem"][0])
    torch.testing.assert_close(reset["mem"][1], state["mem"][1])
    # Row 1's next segment is the same whether or not row 0 was reset.
    seg2 = tokens(2, 3)
    kept = model.step(seg2, state).logits_BTV
    after = model.step(seg2, state, reset_B=torch.tensor([True, False])).logits_BTV
    torch.testing.assert_close(after[1], kept[1])
    assert (after[0] - kept[0]).abs().max() > 1e-4


# ============================================================================================================
# ∞-former: the continuous memory


def test_infinity_ridge_fit_equals_least_squares():
    # B = (F F^T + lambda I)^-1 F X  ==  argmin ||F^T B - X||^2 + lambda ||B||^2, zero-padded as officially.
    N, D, lam = 16, 3, 0.5
    mu_N, sigma_N = basis_parameters(N)
    t_P = torch.cat([torch.arange(1, 25) * 0.75 / 24, 0.75 + 0.25 * torch.arange(1, 9) / 8]).double()
    x_PD = torch.randn(len(t_P), D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    coef = (ridge_fit_matrix(t_P, mu_N, sigma_N, ridge_lambda=lam) @ x_PD).numpy()

    t_A = padded_positions(t_P)
    pad = len(t_P) // 2
    x_AD = np.zeros((len(t_A), D))
    x_AD[pad : pad + len(t_P)] = x_PD.numpy()
    design = np.vstack([evaluate_basis(t_A, mu_N, sigma_N).numpy(), math.sqrt(lam) * np.eye(N)])
    target = np.vstack([x_AD, np.zeros((N, D))])
    ref = np.linalg.lstsq(design, target, rcond=None)[0]
    np.testing.assert_allclose(coef, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def smooth_signal(t: torch.Tensor) -> torch.Tensor:
    """Four channels of sines, 0.5 to 3 periods over [0, 1]."""
    freq = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=t.dtype)
    phase = torch.tensor([0.3, 1.0, 2.0, 0.5], dtype=t.dtype)
    return torch.sin(2 * math.pi * freq * t[:, None] + phase)


def test_infinity_reconstructs_a_smooth_signal():
    # 512 vectors at cell centres, N = 64 coefficients, the kind's own float32 first-fit matrix.
    kind = InfinityMemory(
        d_model=4, num_layers=1, num_heads=1, segment_len=512, cfg=MemoryConfig(kind="infinity", num_basis=64)
    )
    G_first_NT = kind.fit_matrices(512, torch.device("cpu"))[0]
    t = (torch.arange(512, dtype=torch.float64) + 0.5) / 512
    x = smooth_signal(t)
    rec = (evaluate_basis(t.float(), kind.basis_mu_N, kind.basis_sigma_N) @ (G_first_NT @ x.float())).double()
    err = (rec - x).abs().amax(dim=-1)
    interior = (t > 0.1) & (t < 0.9)
    # Measured: 0.035 on [0.1, 0.9]. The zero padding of the fit pulls the ends towards 0: 0.44 at t = 1/1024.
    assert err[interior].max() < 0.05
    assert err.max() < 0.5


def test_infinity_closed_form_read_equals_quadrature():
    N = 16
    mu_N, sigma_N = basis_parameters(N)
    t = torch.linspace(-1.5, 2.5, 20001, dtype=torch.float64)
    values_ND = torch.randn(N, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for mu, sigma_sq in ((0.5, 0.69), (0.02, 1e-4), (0.97, 0.003), (0.3, 0.05)):
        mu_, sigma_sq_ = torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma_sq, dtype=torch.float64)
        r_N = gaussian_expectation(mu_, sigma_sq_, mu_N, sigma_N)
        density = torch.exp(-0.5 * (t - mu) ** 2 / sigma_sq) / math.sqrt(2 * math.pi * sigma_sq)
        psi_tN = evaluate_basis(t, mu_N, sigma_N)
        quad_N = torch.trapezoid(density[:, None] * psi_tN, t, dim=0)
        torch.testing.assert_close(r_N, quad_N, rtol=1e-4, atol=1e-4)
        # The context vector: the expectation of the value signal V^T psi(t) under the density.
        quad_D = torch.trapezoid(density[:, None] * (psi_tN @ values_ND), t, dim=0)
        torch.testing.assert_close(r_N @ values_ND, quad_D, rtol=1e-4, atol=1e-4)


def test_infinity_update_compresses_old_signal_into_tau():
    # Non-sticky update: the old signal, sampled uniformly, goes to (0, tau]; the T new vectors to (tau, 1].
    T, N, tau = 64, 128, 0.75
    cfg = MemoryConfig(kind="infinity", num_basis=N, num_samples=256, tau=tau, sticky=False)
    kind = InfinityMemory(d_model=4, num_layers=1, num_heads=1, segment_len=T, cfg=cfg)
    mu_N, sigma_N = kind.basis_mu_N, kind.basis_sigma_N
    G_first = kind.fit_matrices(T, torch.device("cpu"))[0]
    t_cells = (torch.arange(T, dtype=torch.float64) + 0.5) / T
    old = G_first @ smooth_signal(t_cells).float()  # a memory holding one segment of the smooth signal
    new_x = torch.cos(2 * math.pi * t_cells[:, None] * torch.tensor([1.0, 1.5, 0.5, 2.0])).float()
    coef = kind.fit(old[None], new_x[None], torch.tensor([False]))[0]

    u = torch.linspace(0.1, 0.9, 81)
    recalled = evaluate_basis(tau * u, mu_N, sigma_N) @ coef
    was = evaluate_basis(u, mu_N, sigma_N) @ old
    assert (recalled - was).abs().max() < 0.1  # measured 0.047
    t_new = tau + (1 - tau) * torch.arange(1, T + 1) / T
    inner = slice(8, T - 8)  # away from the seam at tau and the padded end at 1
    err_new = ((evaluate_basis(t_new, mu_N, sigma_N) @ coef)[inner] - new_x[inner]).abs().max()
    assert err_new < 0.1  # measured 0.065

    # An empty row ignores the old coefficients and fits its first segment alone on [0, 1].
    first = kind.fit(old[None], new_x[None], torch.tensor([True]))[0]
    torch.testing.assert_close(first, G_first @ new_x)


def run_segments(model: MemoryTransformer, num: int, *, seed: int = 1, batch: int = 2) -> MemoryState:
    """The state after `num` segments of random tokens from the initial memory."""
    state = model.init_state(batch)
    for s in range(num):
        state = model.step(tokens(batch, seed + s), state).state
    return state


def test_infinity_sticky_sampling_follows_attention_and_replays():
    # All densities around 0.3: every sample lands in the bins under them, in increasing order.
    mu = torch.full((2, 6), 0.3)
    sigma = torch.full((2, 6), 0.01)
    t = sticky_positions(mu, sigma, num_samples=64, num_bins=128)
    assert t.shape == (2, 64) and (t >= 0.25).all() and (t <= 0.35).all()
    assert (t.diff(dim=-1) >= 0).all()

    # A whole step is a deterministic function of the RNG state (what a replay restores). With mem_len = T, the
    # long-term memory takes in its first block at segment 3 and samples its old signal from segment 4 on.
    model = build_infinity()
    state = run_segments(model, 3)
    assert not state["empty"].any()
    reads: dict[int, tuple] = {}
    hooks = [
        block.memory.register_forward_hook(lambda _m, _i, o, layer=int(i): reads.__setitem__(layer, o[1:]))
        for i, block in model.blocks.items()
    ]
    rng = torch.get_rng_state()
    a = model.step(tokens(2, 9), state).state
    for h in hooks:
        h.remove()
    torch.set_rng_state(rng)
    b = model.step(tokens(2, 9), state).state
    c = model.step(tokens(2, 9), state).state
    for coef in ("coef.0", "coef.1"):
        torch.testing.assert_close(a[coef], b[coef], rtol=0, atol=0)
        assert not torch.equal(a[coef], c[coef])  # the sticky draw is random
    # The histogram the next update samples from is that of this segment's reads (all heads and queries).
    for layer, (mu_BHT, sigma_sq_BHT) in reads.items():
        want = sticky_mass(mu_BHT.flatten(1), sigma_sq_BHT.sqrt().flatten(1), num_bins=128)
        torch.testing.assert_close(a[f"mass.{layer}"], want, rtol=0, atol=0)
        assert not torch.equal(a[f"mass.{layer}"], state[f"mass.{layer}"])


def test_infinity_state_shapes():
    model = build_infinity("model.memory.mem_len=16")
    state = model.init_state(3)
    for layer in range(2):
        assert state[f"mem.{layer}"].shape == (3, 16 + SEG, 32)  # short-term M = 16 plus the leaving block
        assert state[f"coef.{layer}"].shape == (3, 16, 32) and state[f"coef.{layer}"].dtype == torch.float32
        assert state[f"mass.{layer}"].shape == (3, 128)
    assert state["valid"].shape == (3, 16 + SEG) and state["empty"].shape == (3,)
    with pytest.raises(ValueError, match="mem_len=12 must be a multiple of data.segment_len=8"):
        build_infinity("model.memory.mem_len=12")


def test_infinity_short_term_memory_is_one_long_forward():
    """With its short-term memory, segment 2 attends over segment 1's cached states with Transformer-XL's relative
    positions: its logits equal those of the last T positions of one forward over both segments at once (the
    long-term memory is still empty in both runs, so it reads zero)."""
    seg_model = build_infinity().eval()
    cfg = config_from_dict(
        {},
        ["model.memory.kind=infinity", *TINY[:-1], f"data.segment_len={2 * SEG}", "model.memory.num_basis=16",
         "model.memory.num_samples=32"],
    )  # fmt: skip
    long_model = MemoryTransformer(cfg.model, segment_len=2 * SEG).eval()
    long_model.load_state_dict(seg_model.state_dict())
    x = torch.randint(0, VOCAB, (2, 2 * SEG), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out1 = seg_model.step(x[:, :SEG], seg_model.init_state(2))
        out2 = seg_model.step(x[:, SEG:], out1.state)
        whole = long_model.step(x, long_model.init_state(2))
    # The same ops on the same values: measured bitwise equal; the tolerance allows another summation order.
    torch.testing.assert_close(out2.logits_BTV, whole.logits_BTV[:, SEG:], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out1.logits_BTV, whole.logits_BTV[:, :SEG], atol=2e-5, rtol=1e-5)
    # And the first token of segment 2 depends on the first token of segment 1 through it.
    y = x.clone()
    y[:, 0] = (y[:, 0] + 1) % VOCAB
    with torch.no_grad():
        other = seg_model.step(y[:, SEG:], seg_model.step(y[:, :SEG], seg_model.init_state(2)).state)
    assert (other.logits_BTV[:, 0] - out2.logits_BTV[:, 0]).abs().max() > 1e-4


def test_infinity_long_term_memory_takes_the_gated_block_leaving_short_term():
    """At segment 3 (mem_len = T) segment 1's cached states leave the short-term memory and are fitted, through
    the CNN gate, alone on [0, 1]; rows before that read an empty long-term memory."""
    model = build_infinity("model.memory.sticky=false").eval()
    s1 = run_segments(model, 1)
    s2 = model.step(tokens(2, 2), s1).state
    assert s2["empty"].all() and all((s2[f"coef.{layer}"] == 0).all() for layer in range(2))
    s3 = model.step(tokens(2, 3), s2).state
    assert not s3["empty"].any()
    G_first = model.memory.fit_matrices(SEG, torch.device("cpu"))[0]
    for layer in range(2):
        h1 = s1[f"mem.{layer}"][:, SEG:]  # segment 1's normed inputs of this layer
        assert torch.equal(s3[f"mem.{layer}"][:, :SEG], s2[f"mem.{layer}"][:, SEG:])
        gate = model.blocks[str(layer)].memory.gate
        with torch.no_grad():
            gated = h1 * torch.sigmoid(
                F.conv1d(h1.transpose(1, 2), gate.weight, gate.bias, padding=1)
            ).transpose(1, 2)
        torch.testing.assert_close(s3[f"coef.{layer}"], G_first @ gated, atol=1e-5, rtol=1e-5)


def test_infinity_memory_is_read_detached_and_the_gate_learns():
    model = build_infinity()
    state = run_segments(model, 2)
    assert state["empty"].all()
    reads = [block.memory for block in model.blocks.values()]
    # An empty memory reads as zero: the loss of a segment before any block left the short-term memory does not
    # depend on the long-term attention (nor on the gate), and the KL term is zero.
    seg = tokens(2, 5)
    out = model.step(seg, run_segments(model, 1), targets_BT=seg)
    assert out.aux_sum.item() == 0.0
    (out.loss_sum + out.aux_sum).backward()
    assert all(p.grad is None or (p.grad == 0).all() for read in reads for n, p in read.named_parameters()
               if not n.startswith("r_net"))  # fmt: skip
    model.zero_grad(set_to_none=True)
    # Segment 3 reads: its logits depend on segment 1, the read and the gate learn, and the state is detached.
    seg3 = tokens(2, 3)
    out3 = model.step(seg3, state, targets_BT=seg3)
    assert all(not t.requires_grad and t.grad_fn is None for _, t in out3.state.items())
    other = run_segments(model, 2, seed=11)
    assert (out3.logits_BTV - model.step(seg3, other).logits_BTV).abs().max() > 1e-4
    out3.loss_sum.backward()
    for read in reads:
        assert read.key.weight.grad.abs().sum() > 0 and read.gate.weight.grad.abs().sum() > 0


def test_infinity_reset_isolates_rows():
    model = build_infinity("model.memory.sticky=false")
    state = run_segments(model, 3)
    reset = model.memory.reset(state, torch.tensor([True, False]))
    assert reset["empty"].tolist() == [True, False]
    assert reset["valid"][0].sum() == 0 and reset["valid"][1].all()
    for name in ("coef.0", "coef.1", "mem.0", "mem.1"):
        assert (reset[name][0] == 0).all()
        torch.testing.assert_close(reset[name][1], state[name][1])
    seg2 = tokens(2, 3)
    kept = model.step(seg2, state)
    after = model.step(seg2, state, reset_B=torch.tensor([True, False]))
    torch.testing.assert_close(after.logits_BTV[1], kept.logits_BTV[1])
    for coef in ("coef.0", "coef.1"):
        torch.testing.assert_close(after.state[coef][1], kept.state[coef][1])
    assert (after.logits_BTV[0] - kept.logits_BTV[0]).abs().max() > 1e-4
    # The reset row reads like a first segment: the same logits as from the initial memory.
    fresh = model.step(seg2[:1], model.init_state(1))
    torch.testing.assert_close(after.logits_BTV[0], fresh.logits_BTV[0], atol=1e-5, rtol=1e-5)


def test_infinity_rejects_an_odd_number_of_basis_functions():
    with pytest.raises(ValueError, match="num_basis=15"):
        build_infinity("model.memory.num_basis=15")


# ============================================================================================================
# Both kinds: built from a config, trained end to end


@pytest.mark.parametrize("kind", ["memformer", "infinity"])
def test_trains_from_config(kind):
    model = build_memformer() if kind == "memformer" else build_infinity()
    assert type(model.memory).kind == kind
    # A toy stream: each row repeats its own pattern of 5 tokens across both segments.
    pattern = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    stream = pattern.repeat(1, 4)[:, : 2 * SEG + 1]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        state, total, count = model.init_state(2), 0.0, 0
        for s in range(2):
            seg = stream[:, s * SEG : (s + 1) * SEG]
            out = model.step(
                seg, state, targets_BT=stream[:, s * SEG + 1 : (s + 1) * SEG + 1], return_logits=False
            )
            total, count, state = total + out.loss_sum, count + out.num_targets, out.state
        loss = total / count
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])


@pytest.mark.parametrize("kind", ["memformer", "infinity"])
def test_state_round_trips_through_state_dict(kind):
    model = build_memformer() if kind == "memformer" else build_infinity()
    state = run_segments(model, 3)  # infinity: its long-term memory holds a block from segment 3 on
    back = MemoryState.from_state_dict(state.state_dict())
    torch.manual_seed(5)
    a = model.step(tokens(2, 2), state).logits_BTV
    torch.manual_seed(5)
    b = model.step(tokens(2, 2), back).logits_BTV
    torch.testing.assert_close(a, b)
