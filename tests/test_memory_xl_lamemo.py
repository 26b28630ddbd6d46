"""Transformer-XL and LaMemo memories: properties that only a faithful implementation has.

Tiny models (d_model 32, 2 layers, 2 heads, vocab 50, segment 8). The references below are written from the
papers' formulas with explicit distance matrices, independently of the rel_shift tricks under test.

Legend: B batch, T segment tokens, N tokens of a whole stream, M memory positions, H heads, K head width.
"""

import pytest
import torch

from memscale.config import config_from_dict
from memscale.models import MemoryTransformer
from memscale.models.memory.lamemo import rel_shift_future
from memscale.models.memory.xl import causal_mask, rel_shift
from tests.helpers import TINY, tiny_model

T = 8  # data.segment_len of tests.helpers.TINY
KINDS = ["xl", "lamemo"]


def _tokens(seed: int, B: int = 2, N: int = T) -> torch.Tensor:
    return torch.randint(0, 50, (B, N), generator=torch.Generator().manual_seed(seed))


def _sinusoid(dist: torch.Tensor, D: int) -> torch.Tensor:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    angle = dist.float()[..., None] * inv_freq
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def _xl_reference_logits(model: MemoryTransformer, tokens_BN: torch.Tensor, clamp_len: int) -> torch.Tensor:
    """One forward over the stream: score(i, j) = ((q_i + u) k_j + (q_i + v) W_r R_{i-j}) / sqrt(K), j <= i."""
    mem, D, H = model.memory, model.cfg.d_model, model.cfg.num_heads
    K, N = D // H, tokens_BN.shape[1]
    dist_NN = torch.arange(N)[:, None] - torch.arange(N)[None, :]
    rel_NN = dist_NN.clamp(min=0, max=clamp_len if clamp_len > 0 else None)
    x = model.embed(tokens_BN)
    for block in model.blocks.values():
        q, k, v = block.attn.project(block.norm1(x))
        r_NNHK = block.memory.r_net(_sinusoid(rel_NN, D)).view(N, N, H, K)
        ac = torch.einsum("bhik,bhjk->bhij", q + mem.u_HK[:, None], k)
        bd = torch.einsum("bhik,ijhk->bhij", q + mem.v_HK[:, None], r_NNHK)
        scores = ((ac + bd) / K**0.5).masked_fill(dist_NN < 0, float("-inf"))
        x = x + block.attn.merge(scores.softmax(-1) @ v)
        x = x + block.mlp(block.norm2(x))
    return model.head(model.norm(x))


def _stream(model, tokens_BN, *, state=None):
    """Segment-by-segment logits of a stream (concatenated) and the final state."""
    state = state if state is not None else model.init_state(tokens_BN.shape[0])
    logits = []
    for seg in tokens_BN.split(T, dim=1):
        out = model.step(seg, state)
        logits.append(out.logits_BTV)
        state = out.state
    return torch.cat(logits, dim=1), state


# -- Transformer-XL ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clamp_len", [-1, 10])
def test_xl_segments_equal_one_long_forward(clamp_len):
    """With mem_len >= stream length nothing is dropped: 3 cached segments == one forward over 24 tokens."""
    model = tiny_model("xl", "model.memory.mem_len=24", f"model.memory.clamp_len={clamp_len}").eval()
    tokens = _tokens(0, N=3 * T)
    with torch.no_grad():
        by_segment, _ = _stream(model, tokens)
        long_step = model.step(
            tokens, model.init_state(2)
        ).logits_BTV  # the same code path, one 24-token segment
        reference = _xl_reference_logits(model, tokens, clamp_len)
    torch.testing.assert_close(by_segment, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(long_step, reference, atol=1e-5, rtol=0)


def test_xl_memory_keeps_exactly_the_last_mem_len_layer_inputs():
    M = 12
    model = tiny_model("xl", f"model.memory.mem_len={M}").eval()
    seen = {layer: [] for layer in range(2)}
    for layer, block in enumerate(
        model.blocks.values()
    ):  # the normed layer inputs the attention hook receives
        block.norm1.register_forward_hook(lambda mod, inp, out, layer=layer: seen[layer].append(out))
    state = model.init_state(2)
    with torch.no_grad():
        for t, seg in enumerate(_tokens(1, N=3 * T).split(T, dim=1)):
            state = model.step(seg, state).state
            n = min(M, (t + 1) * T)
            assert state["valid"].sum(1).tolist() == [n, n] and state["valid"][:, M - n :].all()
            for layer in range(2):
                expected = torch.cat(seen[layer], dim=1)[:, -n:]
                assert torch.equal(state[f"mem.{layer}"][:, M - n :], expected)
                assert not state[f"mem.{layer}"][:, : M - n].any()


def test_xl_rel_shift_matches_explicit_gather():
    B, H, Tq, M = 2, 3, 5, 7
    C = M + Tq
    x = torch.randn(B, H, Tq, C)
    # Column c of x scores distance C-1-c; entry (i, j) of the result must score distance M + i - j.
    i, j = torch.arange(Tq)[:, None], torch.arange(C)[None, :]
    col = C - 1 - (M + i - j)
    past = j <= M + i
    expected = torch.gather(x, 3, col.clamp(0, C - 1).expand(B, H, Tq, C))
    assert torch.equal(rel_shift(x)[..., past], expected[..., past])


def test_xl_same_length_sees_exactly_mem_len_keys():
    M = 6
    mask = causal_mask(torch.ones(1, M, dtype=torch.bool), T, same_length=True, dtype=torch.float32)
    assert ((mask == 0).sum(-1) == M).all()
    mask = causal_mask(torch.ones(1, M, dtype=torch.bool), T, same_length=False, dtype=torch.float32)
    assert (mask == 0).sum(-1).flatten().tolist() == [M + 1 + i for i in range(T)]


# -- LaMemo --------------------------------------------------------------------------------------------------
def test_lamemo_memory_is_one_softmax_over_every_key_it_has_seen():
    """Layer 0 reads the embeddings, which never change, so every key a memory position has attended to is
    recomputable: its causal past when it was a segment token, then each look-ahead window up to the newest
    segment's first token. The state (interpolated output and running log-normaliser) must equal one softmax
    over all of them. M = 3T keeps a position in memory through two look-aheads."""
    M, S, clamp = 3 * T, 5, 20
    model = tiny_model("lamemo", f"model.memory.mem_len={M}", f"model.memory.clamp_len={clamp}").eval()
    mem, attn = model.memory, model.blocks["0"].attn
    D, H = model.cfg.d_model, model.cfg.num_heads
    K = D // H
    tokens = _tokens(2, N=S * T)
    state = model.init_state(2)
    with torch.no_grad():
        q, k, v = attn.project(model.blocks["0"].norm1(model.embed(tokens)))  # B x H x N x K
        for s, seg in enumerate(tokens.split(T, dim=1)):
            state = model.step(seg, state).state
            first_slot_pos = (s + 1) * T - M
            for slot in range(max(0, -first_slot_pos), M):
                p = first_slot_pos + slot
                past = torch.arange(max(0, (p // T) * T - M), p + 1)
                future = torch.arange(p + 1, max(p + 1, s * T + 1))  # empty for the newest segment
                keys = torch.cat([past, future])
                dist = torch.cat([p - past, future - p]).clamp(max=clamp)
                r_nHK = model.blocks["0"].memory.r_net(_sinusoid(dist, D)).view(-1, H, K)
                pos_bias_nHK = torch.cat(
                    [mem.v_HK.expand(len(past), H, K), mem.v_future_HK.expand(len(future), H, K)]
                )
                q_p = q[:, :, p, None]  # B x H x 1 x K
                ac = ((q_p + mem.u_HK[:, None]) * k[:, :, keys]).sum(-1)
                bd = ((q_p + pos_bias_nHK.transpose(0, 1)) * r_nHK.transpose(0, 1)).sum(-1)
                logits = (ac + bd) / K**0.5  # B x H x n
                expected = (logits.softmax(-1)[..., None] * v[:, :, keys]).sum(2)
                got = state["attn.0"][:, slot].view(2, H, K)
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
                torch.testing.assert_close(
                    state["lognorm.0"][:, slot], logits.logsumexp(-1), atol=1e-5, rtol=0
                )


def test_lamemo_segment_attention_is_transformer_xl():
    """From an empty memory the segment tokens see only themselves, with XL's relative attention over the causal
    past: one 16-token step must equal the XL reference (LaMemo names its u, v and r_net as xl does)."""
    model = tiny_model("lamemo", "model.memory.clamp_len=10").eval()
    tokens = _tokens(3, N=2 * T)
    with torch.no_grad():
        logits = model.step(tokens, model.init_state(2)).logits_BTV
        reference = _xl_reference_logits(model, tokens, clamp_len=10)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


def test_lamemo_last_layer_keeps_only_the_segment_rows():
    """The last layer sends only the segment's rows through its output projection and MLP (the memory's would be
    dropped by `exit`): losses, state and every gradient over a two-segment window equal the untrimmed model's,
    where the memory rows go all the way. M = 2T and the fused and reference paths both."""
    for attention in ("fused", "reference"):
        trimmed = tiny_model("lamemo", f"model.memory.mem_len={2 * T}", f"model.attention={attention}")
        full = tiny_model("lamemo", f"model.memory.mem_len={2 * T}", f"model.attention={attention}")
        full.load_state_dict(trimmed.state_dict())
        assert trimmed.blocks["1"].memory.last and not trimmed.blocks["0"].memory.last
        full.blocks["1"].memory.last = False
        rows = {}
        for name, model in (("trimmed", trimmed), ("full", full)):
            model.blocks["1"].register_forward_hook(
                lambda m, i, o, n=name, r=rows: r.update({n: o[0].shape[1]})
            )
        results = []
        for model in (trimmed, full):
            state, total = model.init_state(2), 0.0
            for seed in range(2):
                out = model.step(_tokens(seed), state, targets_BT=_tokens(seed + 10))
                total = total + out.loss_sum
                state = out.state
            total.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((total.detach(), state, grads))
        assert rows == {"trimmed": T, "full": 3 * T}  # the path under test is taken
        (loss_t, state_t, grads_t), (loss_f, state_f, grads_f) = results
        torch.testing.assert_close(loss_t, loss_f, atol=1e-5, rtol=1e-6)
        for name in state_f:
            torch.testing.assert_close(state_t[name], state_f[name], atol=1e-6, rtol=0)
        # Gradients: fp32 rounding, sums over rows that run in another order (measured up to 1.4e-6 on entries
        # of ~3e-2); a wrong row would differ by the size of the entries themselves.
        assert grads_t.keys() == grads_f.keys()
        for name in grads_f:
            torch.testing.assert_close(
                grads_t[name], grads_f[name], atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
            )


def test_lamemo_rel_shift_future_matches_explicit_gather():
    B, H, M = 2, 3, 6
    x = torch.randn(B, H, M, M)
    # Column d of x scores future distance d + 1; entry (r, c), c >= r, must score distance c + 1 - r.
    r, c = torch.arange(M)[:, None], torch.arange(M)[None, :]
    ahead = c >= r
    expected = torch.gather(x, 3, (c - r).clamp(min=0).expand(B, H, M, M))
    assert torch.equal(rel_shift_future(x)[..., ahead], expected[..., ahead])


def test_lamemo_log_normaliser_stays_float32():
    model = tiny_model("lamemo").to(torch.bfloat16).eval()
    state = model.init_state(2)
    for layer in range(2):
        assert (
            state[f"lognorm.{layer}"].dtype == torch.float32
            and state[f"attn.{layer}"].dtype == torch.bfloat16
        )
    with torch.no_grad():
        for seed in range(2):
            state = model.step(_tokens(seed), state, reset_B=torch.tensor([seed == 1, False])).state
    for layer in range(2):
        assert (
            state[f"lognorm.{layer}"].dtype == torch.float32
            and state[f"attn.{layer}"].dtype == torch.bfloat16
        )
        assert state[f"lognorm.{layer}"].isfinite().all()


# -- both ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_reset_isolates_rows(kind):
    """Row 0 streams doc A then doc B (reset at B), row 1 streams doc C: B must look fresh, C must not notice."""
    model = tiny_model(kind, "model.memory.mem_len=12").eval()
    a, b, c, c2 = (_tokens(seed, B=1) for seed in (10, 11, 12, 13))
    with torch.no_grad():
        s = model.step(torch.cat([a, c]), model.init_state(2)).state
        out = model.step(torch.cat([b, c2]), s, reset_B=torch.tensor([True, False]))
        fresh_b = model.step(b, model.init_state(1)).logits_BTV
        only_c = model.step(c2, model.step(c, model.init_state(1)).state).logits_BTV
    torch.testing.assert_close(out.logits_BTV[:1], fresh_b, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits_BTV[1:], only_c, atol=1e-5, rtol=0)
    fresh_state = model.step(b, model.init_state(1)).state
    for name, tensor in out.state.items():  # fixed shapes, and the reset row's state is the fresh one
        assert tensor.shape[0] == 2
        torch.testing.assert_close(tensor[:1], fresh_state[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_memory_is_detached(kind):
    """No gradient reaches the previous segment; the memory's own parameters still learn through it."""
    model = tiny_model(kind)
    grabbed = []

    def grab(module, inputs, out):
        out.retain_grad()
        grabbed.append(out)

    model.embed.register_forward_hook(grab)
    out1 = model.step(_tokens(20), model.init_state(2))
    assert not any(t.requires_grad for _, t in out1.state.items())
    out2 = model.step(_tokens(21), out1.state, targets_BT=_tokens(22))
    out2.loss_sum.backward()
    assert grabbed[0].grad is None  # segment 1's embeddings: unreachable from segment 2's loss
    assert grabbed[1].grad is not None
    assert model.blocks["0"].memory.r_net.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_trains_on_a_repeated_sequence(kind):
    model = tiny_model(kind, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    stream = _tokens(30, N=2 * T + 1)
    losses = []
    for _ in range(30):
        state, loss = model.init_state(2), 0.0
        for seg in range(2):
            window = stream[:, seg * T : (seg + 1) * T + 1]
            out = model.step(window[:, :-1], state, targets_BT=window[:, 1:])
            loss, state = loss + out.loss_sum / out.num_targets, out.state
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item() / 2)
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize("kind", KINDS)
def test_loads_from_config(kind):
    cfg = config_from_dict({}, [*TINY, f"model.memory.kind={kind}", "model.memory.same_length=true"])
    model = MemoryTransformer(cfg.model, segment_len=cfg.data.segment_len)
    assert model.memory.kind == kind and model.memory.mem_len == T  # mem_len 0 means segment_len
    assert model.pos is None  # relative positions: no absolute position table
    assert model.memory.mean_attended_len(T) == T  # same_length: exactly mem_len keys per query
