"""∞-former's KL regulariser and the auxiliary-loss channel that carries it into training.

The KL term (sorting/long_term_attention.py `kl_reg`): KL(N(mu, sigma^2) || N(mu, sigma_0^2)) per head and query of
each long-term read, weighted by `model.memory.kl_lambda`; a layer returns it as its auxiliary loss
(`LayerMemory.aux_loss`), `SegmentOutput.aux_sum` sums the layers, and memscale/train/bptt.py adds it to each
segment's loss before that segment's backward in every `train.memory_grad` mode.

Tiny model (d_model 32, 2 layers, 2 heads, vocab 50, segments of 8, mem_len 8): the long-term memory takes in its
first block at the third segment, so the windows below start from a state after three segments, where every
segment reads a non-empty long-term memory.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from memscale.config import config_from_dict
from memscale.models.memory.infinity import gaussian_kl
from memscale.models.transformer import MemoryTransformer
from memscale.train.bptt import run_window
from tests.helpers import random_batches

VOCAB, SEG = 50, 8
TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", f"model.vocab_size={VOCAB}",
        f"data.segment_len={SEG}", "model.memory.num_basis=16", "model.memory.num_samples=32"]  # fmt: skip


def build(*extra: str, seed: int = 0) -> MemoryTransformer:
    cfg = config_from_dict({}, ["model.memory.kind=infinity", *TINY, *extra])
    torch.manual_seed(seed)
    return MemoryTransformer(cfg.model, segment_len=SEG)


def warm_state(model: MemoryTransformer, batch: int = 2):
    """The state after three segments: the long-term memory holds the first."""
    state = model.init_state(batch)
    with torch.no_grad():
        for b in random_batches(3, B=batch, T=SEG, vocab=VOCAB, seed=7):
            state = model.step(b.tokens_BT, state).state
    assert not state["empty"].any()
    return state


def test_kl_equals_the_closed_form_of_torch_distributions():
    sigma_sq = torch.tensor([1e-6, 1e-4, 0.0025, 0.01, 0.3, 0.69, 2.0], dtype=torch.float64)
    mu = torch.linspace(0.05, 0.95, len(sigma_sq), dtype=torch.float64)
    # The paper's term: the reference density has the read's own mean.
    want = kl_divergence(Normal(mu, sigma_sq.sqrt()), Normal(mu, torch.full_like(mu, 0.05)))
    torch.testing.assert_close(gaussian_kl(sigma_sq, 0.05), want, rtol=1e-12, atol=0)
    assert gaussian_kl(torch.tensor(0.0025, dtype=torch.float64), 0.05) == 0  # sigma = sigma_0: no penalty
    # With a fixed reference mean mu_0 (the official code's `mu_0` branch).
    want_mu0 = kl_divergence(
        Normal(mu, sigma_sq.sqrt()), Normal(torch.full_like(mu, 0.3), torch.full_like(mu, 0.05))
    )
    torch.testing.assert_close(gaussian_kl(sigma_sq, 0.05, mu=mu, mu_0=0.3), want_mu0, rtol=1e-12, atol=0)


def test_layer_aux_is_the_weighted_kl_of_its_reads():
    """aux_sum = kl_lambda x sum over layers, rows that read and positions of the mean over heads of the KL of the
    reads' densities (captured from the layers), so that divided by the B x T targets it is the official
    `kl_m * kl_reg.mean()`; a row whose long-term memory is empty adds nothing."""
    lam = 0.01
    model = build(f"model.memory.kl_lambda={lam}", "model.memory.sticky=false").eval()
    state = model.memory.reset(warm_state(model, batch=3), torch.tensor([False, True, False]))
    reads = {}
    for i, block in model.blocks.items():
        block.memory.register_forward_hook(lambda _m, _i, o, layer=i: reads.__setitem__(layer, o[2]))
    x = random_batches(1, B=3, T=SEG, vocab=VOCAB, seed=3)[0]
    out = model.step(x.tokens_BT, state, targets_BT=x.targets_BT)
    want = 0.0
    for sigma_sq_BHT in reads.values():
        kl_BT = gaussian_kl(sigma_sq_BHT.double(), 0.05).mean(dim=1)
        want += lam * (kl_BT[0].sum() + kl_BT[2].sum())  # row 1 was reset: nothing to read yet
    torch.testing.assert_close(out.aux_sum.double(), want, rtol=1e-6, atol=0)
    assert out.aux_sum > 0


def grads_of(model: MemoryTransformer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def window_grads(model, batches, state, mode: str, *, seed: int = 5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # sticky sampling (and dropout) draw from the default generator
    result = run_window(model, batches, state, memory_grad=mode)
    return result, grads_of(model)


@pytest.mark.parametrize("mode", ["detached", "truncated", "replay"])
def test_aux_loss_reaches_the_gradient(mode):
    """The window's gradient is that of (sum of cross-entropies + sum of the KL terms) / targets: its difference
    with kl_lambda = 0 equals the autograd gradient of the KL terms alone, run segment by segment on the same
    (detached) states, in every memory_grad mode. kl_lambda = 0.1 (1e5 x the default) so that the term's share of
    every gradient checked is well above float32 noise."""
    lam = 0.1
    base = build()
    batches = random_batches(3, B=2, T=SEG, vocab=VOCAB, seed=1)
    state = warm_state(base)
    total = sum(b.num_targets for b in batches)
    with_kl, without = build(f"model.memory.kl_lambda={lam}"), build("model.memory.kl_lambda=0")
    r_kl, g_kl = window_grads(with_kl, batches, state, mode)
    r_0, g_0 = window_grads(without, batches, state, mode)
    assert r_kl.loss_sum == pytest.approx(r_0.loss_sum, rel=1e-6) and r_0.aux_sum == 0 and r_kl.aux_sum > 0

    # The reference: the KL terms alone, differentiated by autograd over the same segments and sticky draws.
    ref = build(f"model.memory.kl_lambda={lam}")
    torch.manual_seed(5)
    s, aux = state, []
    for b in batches:
        out = ref.step(b.tokens_BT, s, targets_BT=b.targets_BT, reset_B=b.reset_B, return_logits=False)
        aux.append(out.aux_sum)
        s = out.state
    (torch.stack(aux).sum() / total).backward()
    g_ref = grads_of(ref)
    assert sum(a.item() for a in aux) == pytest.approx(r_kl.aux_sum, rel=1e-6)

    for name in ("blocks.1.memory.sigma.weight", "blocks.1.memory.key.weight", "blocks.0.memory.gate.weight",
                 "blocks.0.attn.qkv.weight"):  # fmt: skip
        diff = g_kl[name] - g_0[name]
        # The term moves the gradient (measured: by >= 3% of the cross-entropy gradient's largest entry).
        assert diff.abs().max() > 1e-2 * g_0[name].abs().max(), name
        # The gradient is linear in the objective. float32: the difference of two window gradients leaves the
        # rounding of the (larger) cross-entropy part: measured 8e-6 of the KL gradient's largest entry.
        torch.testing.assert_close(diff, g_ref[name], atol=1e-4 * g_ref[name].abs().max().item(), rtol=0)


def test_aux_gradient_equals_finite_differences():
    """One segment that reads the long-term memory, in float64: the part of run_window's gradient of w_sigma that
    the KL term adds (the gradient with kl_lambda minus the gradient without) equals central finite differences
    of the reported aux_sum / targets along it. (The token loss itself is computed in float32, too coarse for
    finite differences, and cancels in the difference.)"""
    model = build(
        "model.memory.kl_lambda=0.01", "model.memory.sticky=false", "model.fused_loss=false"
    ).double()
    state = warm_state(model)  # the coefficients stay float32 (init_state); the read runs in float64
    b = random_batches(1, B=2, T=SEG, vocab=VOCAB, seed=2)[0]
    w = model.blocks["1"].memory.sigma.weight
    result = run_window(model, [b], state, memory_grad="detached")
    g_kl = w.grad.clone()
    layers = [block.memory for block in model.blocks.values()]
    for layer in layers:
        layer.kl_lambda, layer.aux_loss = 0.0, False
    model.zero_grad(set_to_none=True)
    run_window(model, [b], state, memory_grad="detached")
    diff = g_kl - w.grad
    assert diff.norm() > 0.1 * g_kl.norm()  # the KL term is a real share of this gradient
    for layer in layers:
        layer.kl_lambda, layer.aux_loss = 0.01, True
    d = diff / diff.norm()

    def aux_per_target(shift: float) -> float:
        with torch.no_grad():
            w.add_(shift * d)
            out = model.step(b.tokens_BT, state, targets_BT=b.targets_BT, return_logits=False)
            w.sub_(shift * d)
        return out.aux_sum.item() / b.num_targets

    assert aux_per_target(0.0) == pytest.approx(result.aux_sum / result.num_targets, rel=1e-12)
    eps = 1e-4
    fd = (aux_per_target(eps) - aux_per_target(-eps)) / (2 * eps)
    assert fd == pytest.approx(diff.norm().item(), rel=1e-6)  # float64, O(eps^2) error: measured 7.5e-9


def test_replay_equals_truncated_with_the_aux_loss():
    """With dropout and sticky sampling (both drawn from the generator), replay recomputes each segment under its
    saved RNG state, KL term included: the same loss, aux and gradients as truncated BPTT."""
    model = build("model.memory.kl_lambda=0.01", "model.dropout=0.1")
    batches = random_batches(3, B=2, T=SEG, vocab=VOCAB, seed=1, reset_at={1: [0]})
    state = warm_state(model)
    r_t, g_t = window_grads(model, batches, state, "truncated")
    r_r, g_r = window_grads(model, batches, state, "replay")
    assert r_r.loss_sum == pytest.approx(r_t.loss_sum, rel=1e-6)
    assert r_r.aux_sum == pytest.approx(r_t.aux_sum, rel=1e-6) and r_t.aux_sum > 0
    assert g_r.keys() == g_t.keys()
    for n in g_t:  # the same computation, segment by segment instead of one backward: measured 1.0e-7
        torch.testing.assert_close(g_r[n], g_t[n], atol=1e-6 * g_t[n].abs().max().item(), rtol=1e-5, msg=n)
    for n in r_t.state:
        torch.testing.assert_close(r_r.state[n], r_t.state[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("checkpointing", ["full", "selective"])
def test_activation_checkpointing_keeps_the_aux_loss(checkpointing):
    """A recomputed block (or attention sub-layer) returns its KL term with its graph: the same gradients as
    without checkpointing (sticky draws and dropout restored by the recomputation)."""
    model = build("model.memory.kl_lambda=0.01", "model.dropout=0.1")
    batches = random_batches(2, B=2, T=SEG, vocab=VOCAB, seed=1)
    state = warm_state(model)
    r_plain, g_plain = window_grads(model, batches, state, "detached")
    recomputing = copy.deepcopy(model)
    recomputing.set_activation_checkpointing(checkpointing)
    r_ck, g_ck = window_grads(recomputing, batches, state, "detached")
    assert r_ck.aux_sum == pytest.approx(r_plain.aux_sum, rel=1e-6) and r_plain.aux_sum > 0
    assert g_ck.keys() == g_plain.keys()
    for n in g_plain:  # the same ops under the same RNG states: measured bitwise equal
        torch.testing.assert_close(
            g_ck[n], g_plain[n], atol=1e-6 * g_plain[n].abs().max().item(), rtol=1e-5, msg=n
        )


def test_no_aux_term_without_kl_or_for_other_kinds():
    model = build("model.memory.kl_lambda=0")
    out = model.step(torch.zeros(2, SEG, dtype=torch.long), warm_state(model))
    assert out.aux_sum is None
    cfg = config_from_dict({}, ["model.memory.kind=xl", *TINY])
    xl = MemoryTransformer(cfg.model, segment_len=SEG)
    assert xl.step(torch.zeros(2, SEG, dtype=torch.long), xl.init_state(2)).aux_sum is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.memory.kl_lambda=-1", "model.memory.kl_lambda=-1.0 must be >= 0"),
        ("model.memory.sigma_0=0", "model.memory.sigma_0=0.0 must be > 0"),
        ("model.memory.mem_len=12", "model.memory.mem_len=12 must be a multiple of data.segment_len=8"),
    ],
)
def test_config_rejects_bad_values(override, message):
    from memscale.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        config_from_dict({}, ["model.memory.kind=infinity", *TINY, override])


def test_trainer_logs_the_aux_loss_apart_from_the_loss(data_dir, tmp_path):
    """`train/aux_loss` is the window's KL terms per target; `train/loss` stays the cross-entropy (the same as
    with kl_lambda = 0 at the first logged step, before the two runs' updates differ)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from memscale.train.trainer import Trainer
    from tests.conftest import VOCAB as CORPUS_VOCAB

    def train(out, *extra):
        cfg = config_from_dict(
            {},
            ["model.memory.kind=infinity", "model.d_model=32", "model.num_layers=2", "model.num_heads=2",
             f"model.vocab_size={CORPUS_VOCAB}", "model.memory.num_basis=16", "model.memory.num_samples=32",
             f"data.dir={data_dir}", "data.segment_len=16", "data.num_streams=2", "train.max_steps=4",
             "train.bptt_segments=2", "train.eval_every=0", "train.log_every=2", f"train.out_dir={out}", *extra],
        )  # fmt: skip
        Trainer(cfg, log=lambda _line: None).train()
        acc = EventAccumulator(str(out / "tb"))
        acc.Reload()
        return acc

    acc = train(tmp_path / "kl", "model.memory.kl_lambda=0.01")
    aux = acc.Scalars("train/aux_loss")
    assert [e.step for e in aux] == [2, 4] and all(e.value > 0 for e in aux)
    plain = train(tmp_path / "plain", "model.memory.kl_lambda=0")
    assert "train/aux_loss" not in plain.Tags()["scalars"]
    # Step 1 reads nothing yet (the long-term memory takes in its first block at segment 3, in step 2), so the
    # two runs take the same first update and log the same cross-entropy over steps 1-2.
    assert acc.Scalars("train/loss")[0].value == pytest.approx(plain.Scalars("train/loss")[0].value, rel=1e-6)
