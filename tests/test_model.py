"""The segment step and the memory contract of the control (`none`) and `rmt`."""

import pytest
import torch

from memscale.models.memory.base import MemoryState
from tests.helpers import tiny_model

ALL_KINDS = ["none", "rmt", "xl", "memformer", "lamemo", "infinity"]


def _tokens(seed, B=2, T=8):
    return torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_memory_changes_next_logits_only_with_memory(kind):
    model = tiny_model(kind).eval()
    x1, x1b, x2 = _tokens(1), _tokens(2), _tokens(3)
    with torch.no_grad():
        s_a = model.step(x1, model.init_state(2)).state
        s_b = model.step(x1b, model.init_state(2)).state
        la = model.step(x2, s_a).logits_BTV
        lb = model.step(x2, s_b).logits_BTV
    diff = (la - lb).abs().max().item()
    if kind == "none":
        assert diff == 0.0
    else:
        assert diff > 1e-4


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_document_reset_isolates_rows(kind):
    """Row 0 streams doc A then doc B (reset at B); row 1 streams doc C throughout.

    Doc B's logits must equal those of a fresh stream that starts with B, and row 1 must not notice row 0's reset.
    """
    model = tiny_model(kind).eval()
    a, b, c = _tokens(10, B=1), _tokens(11, B=1), _tokens(12, B=1)
    c2 = _tokens(13, B=1)
    with torch.no_grad():
        s = model.init_state(2)
        s = model.step(torch.cat([a, c]), s).state
        out = model.step(torch.cat([b, c2]), s, reset_B=torch.tensor([True, False]))
        fresh_b = model.step(b, model.init_state(1)).logits_BTV
        s1 = model.step(c, model.init_state(1)).state
        only_c = model.step(c2, s1).logits_BTV
    torch.testing.assert_close(out.logits_BTV[:1], fresh_b, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits_BTV[1:], only_c, atol=1e-5, rtol=0)


def test_rmt_mask_read_write_structure():
    model = tiny_model("rmt")
    K, T = 4, 8
    m = model.memory.mask(T, torch.device("cpu"))
    assert m.shape == (2 * K + T, 2 * K + T)
    assert m[:K, :K].all() and not m[:K, K:].any()  # read block sees only itself
    assert m[K : K + T, :K].all() and not m[K : K + T, K + T :].any()  # segment: read block, causal, no write
    assert torch.equal(m[K : K + T, K : K + T], torch.ones(T, T, dtype=torch.bool).tril())
    assert m[K + T :].all()  # write block sees everything


def test_rmt_next_memory_is_write_positions():
    model = tiny_model("rmt").eval()
    x = _tokens(4)
    captured = {}
    handle = model.norm.register_forward_hook(lambda _m, _i, out: captured.setdefault("h", out))
    with torch.no_grad():
        out = model.step(x, model.init_state(2))
    handle.remove()
    K, T = 4, 8
    torch.testing.assert_close(out.state["mem"], captured["h"][:, K + T :])
    torch.testing.assert_close(out.hidden_BTD, captured["h"][:, K : K + T])


def test_state_container_roundtrip_and_where():
    s = MemoryState({"mem": torch.arange(12.0).view(3, 2, 2)})
    other = MemoryState({"mem": torch.zeros(3, 2, 2)})
    r = s.where(torch.tensor([False, True, False]), other)
    assert r["mem"][1].abs().sum() == 0 and torch.equal(r["mem"][0], s["mem"][0])
    back = MemoryState.from_state_dict(s.state_dict())
    assert torch.equal(back["mem"], s["mem"])


def test_flops_formula_counts_output_projection_once():
    model = tiny_model("none")
    d, L, V, T = 32, 2, 50, 8
    blocks = sum(p.numel() for p in model.blocks.parameters()) + sum(
        p.numel() for p in model.norm.parameters()
    )
    expected = 6 * (blocks + V * d) + 12 * L * d * (T + 1) / 2
    assert model.flops_per_token() == pytest.approx(expected)
