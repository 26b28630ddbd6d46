"""ARMT: properties that only a faithful implementation has.

The associative memory is checked on its own functions (the delta rule stores and replaces values exactly for
orthogonal feature-mapped keys), then in the tiny model (d_model 32, 2 layers, 2 heads, vocab 50, segments of 8
tokens): stages, reset, replay and gradient through the memory. W_V starts at zero as in the official code, which
keeps A at zero until training has moved it; the model tests draw it N(0, 0.02) so that A carries something.
"""

from __future__ import annotations

import pytest
import torch

from memscale.config import config_from_dict
from memscale.models import MemoryTransformer
from memscale.models.memory.armt import (
    EPS,
    AssociativeLayer,
    associative_read,
    delta_write,
    dpfp,
    feature_map,
)
from memscale.train.bptt import run_window
from tests.helpers import TINY, random_batches, tiny_model


def _keys(E: int) -> torch.Tensor:
    """Three keys of width E, each on a pair of adjacent coordinates of one sign (so that the pair's product
    survives DPFP), the pairs far enough apart (> nu) that their DPFP features (products of a coordinate with its
    1..3 predecessors in [relu(k), relu(-k)]) share no coordinate: orthogonal feature vectors."""
    k = torch.zeros(3, E)
    k[0, 0:2] = torch.tensor([1.0, 2.0])
    k[1, 5:7] = torch.tensor([1.5, 1.0])
    k[2, 11:13] = torch.tensor([-2.0, -0.5])
    return k


def test_dpfp_is_the_products_of_shifted_relu_pairs():
    u = torch.randn(4, 5, dtype=torch.float64)
    r = torch.cat([u.clamp_min(0), (-u).clamp_min(0)], dim=-1)
    want = torch.cat([r * r.roll(j, dims=-1) for j in (1, 2, 3)], dim=-1)
    torch.testing.assert_close(dpfp(u), want, atol=0, rtol=0)
    assert dpfp(u).shape == (4, 2 * 3 * 5)


def test_delta_rule_stores_and_replaces_values_exactly_for_orthogonal_keys():
    E, D = 16, 6
    phi_KF = feature_map(_keys(E))
    gram = phi_KF @ phi_KF.T
    torch.testing.assert_close(gram, torch.eye(3), atol=1e-7, rtol=0)  # orthonormal features
    g = torch.Generator().manual_seed(0)
    v_KD = torch.randn(3, D, generator=g)
    A, z = torch.zeros(1, phi_KF.shape[1], D), torch.zeros(1, phi_KF.shape[1])
    ones = torch.ones(1, 3, 1)

    # An empty memory reads zero; after one write of three (key, value) pairs each key reads its own value.
    assert torch.equal(associative_read(A, z, phi_KF[None]), torch.zeros(1, 3, D))
    A, z = delta_write(A, z, phi_KF[None], v_KD[None], ones)
    torch.testing.assert_close(associative_read(A, z, phi_KF[None])[0], v_KD / (1 + EPS), atol=1e-6, rtol=0)
    torch.testing.assert_close(z[0], phi_KF.sum(0), atol=1e-7, rtol=0)  # gamma = 1 on an empty memory

    # Writing key 0 again replaces its value (the delta rule), leaves keys 1, 2 alone, and adds nothing to z
    # (gamma = 0 for a key already counted).
    new_D = torch.randn(D, generator=g)
    A2, z2 = delta_write(A, z, phi_KF[None, :1], new_D[None, None], ones[:, :1])
    read = associative_read(A2, z2, phi_KF[None])[0]
    torch.testing.assert_close(read[0], new_D, atol=1e-4, rtol=0)
    assert (read[0] - (v_KD[0] + new_D)).abs().max() > 0.1  # not the sum a plain additive write would give
    torch.testing.assert_close(read[1:], v_KD[1:] / (1 + EPS), atol=1e-6, rtol=0)
    torch.testing.assert_close(z2, z, atol=0, rtol=0)

    # A gate beta moves the stored value that fraction of the way: v_old + beta (v_new - v_old).
    A3, z3 = delta_write(A, z, phi_KF[None, :1], new_D[None, None], torch.full((1, 1, 1), 0.25))
    want = v_KD[0] + 0.25 * (new_D - v_KD[0])
    torch.testing.assert_close(associative_read(A3, z3, phi_KF[None, :1])[0, 0], want, atol=1e-4, rtol=0)


def test_layer_write_goes_through_its_projections():
    """The layer's key, value and gate projections feed the delta rule: with identity key/query maps, W_V = I and
    a saturated gate, the memory tokens' own vectors come back when read with themselves as queries."""
    E = D = 16
    layer = AssociativeLayer(D, E, num_tokens=3)
    with torch.no_grad():
        for lin in (layer.query, layer.key, layer.value):
            lin.weight.copy_(torch.eye(D))
        layer.beta.weight.zero_()
        layer.beta.bias.fill_(50.0)  # sigmoid(50) = 1 in float32
    m = _keys(E)[None]
    A, z, _ = layer.write(m, torch.zeros(1, 6 * E, D), torch.zeros(1, 6 * E))
    # The tokens write one after another: the first into the empty memory (gamma = 1, read back as m / (1 + eps)),
    # the others into a memory that is no longer empty (gamma = 1 - eps, read back as m): equal within eps.
    torch.testing.assert_close(layer.read(m, A, z), m, atol=0, rtol=2 * EPS)


def _identity_layer(D: int, num_tokens: int) -> AssociativeLayer:
    """Key, query and value maps the identity, the gate saturated at 1: a token writes its own vector under itself."""
    layer = AssociativeLayer(D, D, num_tokens=num_tokens)
    with torch.no_grad():
        for lin in (layer.query, layer.key, layer.value):
            lin.weight.copy_(torch.eye(D))
        layer.beta.weight.zero_()
        layer.beta.bias.fill_(50.0)
    return layer


def test_memory_tokens_write_one_after_another():
    """Two memory tokens with the same key in one segment: the second replaces the first's value (the delta rule
    token by token), where one write of both against the same memory stores their mean."""
    D = 16
    layer = _identity_layer(D, num_tokens=2)
    key = _keys(D)[0]
    g = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(D, generator=g), torch.randn(D, generator=g)
    with torch.no_grad():
        layer.value.weight.zero_()  # values from a second map: v_i = W_V m_i with m_i = key + e_i
    m = torch.stack([key, key])[None]
    phi = feature_map(layer.key(m))
    A0, z0 = torch.zeros(1, 6 * D, D), torch.zeros(1, 6 * D)
    vals = torch.stack([v1, v2])[None]
    ones = torch.ones(1, 2, 1)
    A, z = A0, z0
    for i in range(2):  # what AssociativeLayer.write does with these values
        A, z = delta_write(A, z, phi[:, i : i + 1], vals[:, i : i + 1], ones[:, i : i + 1])
    torch.testing.assert_close(associative_read(A, z, phi[:, :1])[0, 0], v2, atol=1e-4, rtol=0)
    together, zt = delta_write(A0, z0, phi, vals, ones)
    torch.testing.assert_close(
        associative_read(together, zt, phi[:, :1])[0, 0], (v1 + v2) / 2, atol=1e-4, rtol=0
    )
    # And the layer itself writes in that order: its own value map, the same check.
    with torch.no_grad():
        layer.value.weight.copy_(torch.eye(D))
    m2 = torch.stack([key, 2 * key])[None]  # one key (phi is normalised), two values: m and 2 m
    A2, z2, _ = layer.write(m2, A0, z0)
    torch.testing.assert_close(layer.read(m2[:, :1], A2, z2)[0, 0], 2 * key, atol=1e-4, rtol=0)


def test_similar_keys_over_many_segments_keep_the_memory_bounded():
    """A key written once, then 50 segments in which all eight memory tokens write nearly that key again: written
    one by one, each write replaces the stored value and it stays at the values' scale; written together against
    one memory (the official update), each of the eight subtracts the same stored value, the value moves by up
    to 1 - K times itself per segment and grows geometrically (what diverged on the quick start: armt.py); written
    together with each key's share divided by its overlap (`normalized`), it stays at the values' scale too."""
    D, K = 16, 8
    layer = _identity_layer(D, num_tokens=K)
    g = torch.Generator().manual_seed(2)
    base = torch.rand(D, generator=g) + 0.5
    first = torch.zeros(1, K, D)
    first[0, 0] = base  # zero vectors have zero features: they write nothing
    A, z, _ = layer.write(first, torch.zeros(1, 6 * D, D), torch.zeros(1, 6 * D))
    At, zt, An, zn = A.clone(), z.clone(), A.clone(), z.clone()
    joint = _identity_layer(D, num_tokens=K)
    joint.order = "joint"  # model.memory.write_order=joint
    normalized = _identity_layer(D, num_tokens=K)
    normalized.order = "normalized"
    with torch.no_grad():
        for _ in range(50):
            m = (base + 0.05 * torch.randn(K, D, generator=g))[None]
            A, z, _ = layer.write(m, A, z)
            At, zt, _ = joint.write(m, At, zt)
            An, zn, _ = normalized.write(m, An, zn)
    read = layer.read(base[None, None], A, z).abs().max().item()
    assert read < 3 * base.abs().max().item()
    assert normalized.read(base[None, None], An, zn).abs().max().item() < 3 * base.abs().max().item()

    together = layer.read(base[None, None], At, zt).abs().max().item()
    assert not together < 1e6 * read, together  # past float32's range (inf, nan) by 50 segments


def _model(*extra: str, seed: int = 0) -> MemoryTransformer:
    model = tiny_model("armt", *extra, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for block in model.blocks.values():
            w = block.memory.value.weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.02)
    return model


def test_stages_chain_to_the_whole_model_and_reset_zeroes_the_reset_rows():
    cfg = config_from_dict({}, [*TINY, "model.memory.kind=armt", "model.memory.num_tokens=4"])
    full = _model().eval()
    stages = []
    for layers in (range(0, 1), range(1, 2)):
        stage = MemoryTransformer(cfg.model, segment_len=cfg.data.segment_len, layers=layers).eval()
        sd = full.state_dict()
        stage.load_state_dict({n: sd[n] for n in stage.state_dict()}, strict=True)
        stages.append(stage)
    first, last = stages
    assert set(first.init_state(2)) == {"A.0", "z.0"} and set(last.init_state(2)) == {"A.1", "z.1"}
    assert hasattr(first.memory, "mem_KD") and not hasattr(last.memory, "mem_KD")

    state = full.init_state(2)
    batches = random_batches(3)
    with torch.no_grad():
        for t, b in enumerate(batches):
            reset = torch.tensor([t == 2, False])
            ref = full.step(b.tokens_BT, state, reset_B=reset)
            s = full.memory.reset(state, reset)
            if t == 2:  # row 0 starts a new document: its A and z are zero again, row 1 keeps its memory
                for name in s:
                    assert torch.equal(s[name][0], torch.zeros_like(s[name][0])), name
                    assert torch.equal(s[name][1], state[name][1]), name
            x, new = first.embed_segment(b.tokens_BT, s)
            for stage in stages:
                x, layer_new = stage.run_blocks(x, s, num_tokens=8)
                new.update(layer_new)
            h, _ = last.finish(x, s, num_tokens=8)
            assert torch.equal(h, ref.hidden_BTD)
            for name in ref.state:
                assert torch.equal(new[name], ref.state[name]), name
            state = ref.state
    assert all(state[f"A.{layer}"].abs().max() > 0 for layer in (0, 1))  # the memory was written

    # A reset row of a whole model behaves as a fresh model on that row.
    tokens = batches[0].tokens_BT
    with torch.no_grad():
        fresh = full.step(tokens, full.init_state(2))
        after = full.step(tokens, state, reset_B=torch.tensor([True, True]))
    torch.testing.assert_close(after.hidden_BTD, fresh.hidden_BTD, atol=0, rtol=0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_replay_equals_truncated_bptt():
    """Memory replay recomputes each segment and backpropagates the incoming gradient of A and z: the same loss,
    state and gradients as plain BPTT over the window (1e-6 absolute: only the summation order differs)."""
    batches = random_batches(4, reset_at={2: [1]})
    out = {}
    for mode in ("truncated", "replay"):
        model = _model("model.dropout=0.1", seed=3).train()
        torch.manual_seed(7)
        r = run_window(model, batches, model.init_state(2), memory_grad=mode)
        out[mode] = (r, _grads(model))
    (rt, gt), (rr, gr) = out["truncated"], out["replay"]
    assert rt.loss_sum == pytest.approx(rr.loss_sum, rel=1e-6)
    assert gt.keys() == gr.keys() and {"blocks.0.memory.value.weight", "memory.mem_KD"} <= gt.keys()
    for name in gt:
        torch.testing.assert_close(gr[name], gt[name], atol=1e-6, rtol=0, msg=name)
    for name in rt.state:
        torch.testing.assert_close(rr.state[name], rt.state[name], atol=1e-6, rtol=0)


def _embedding_grads(memory_grad: str) -> list[float]:
    # No write penalty: its term sits on every segment's own gates, and this follows the token loss alone.
    model = _model("model.memory.write_penalty=0", seed=1)
    captured = []

    def hook(_module, _inp, out):
        out.retain_grad()
        captured.append(out)

    handle = model.embed.register_forward_hook(hook)
    # The loss sits on the last segment only: gradient in an earlier segment arrived through A and z.
    run_window(model, random_batches(3, targets_on={2}), model.init_state(2), memory_grad=memory_grad)
    handle.remove()
    return [0.0 if e.grad is None else e.grad.abs().sum().item() for e in captured]


def test_gradient_reaches_earlier_segments_through_the_memory():
    truncated = _embedding_grads("truncated")
    assert all(g > 0 for g in truncated), truncated
    detached = _embedding_grads("detached")
    assert detached[2] > 0 and detached[0] == 0 and detached[1] == 0, detached


def test_value_map_learns_only_through_a_later_read():
    """W_V starts at zero (official): within one segment its write is read by nobody, so it gets gradient only
    when the memory carries gradient to the next segment."""
    grads = {}
    for mode in ("detached", "truncated"):
        model = tiny_model("armt", seed=2)
        assert all(
            torch.equal(b.memory.value.weight, torch.zeros_like(b.memory.value.weight))
            for b in model.blocks.values()
        )
        run_window(model, random_batches(2), model.init_state(2), memory_grad=mode)
        grads[mode] = model.blocks["0"].memory.value.weight.grad
    assert grads["detached"] is None or grads["detached"].abs().max() == 0
    assert grads["truncated"].abs().max() > 0


def test_normalized_write_stores_copies_once_and_orthogonal_keys_as_the_joint_write():
    """`normalized`: K copies of one key write as one key with the mean of their values (A and z both), where the
    plain joint write adds each copy; keys with orthogonal features write exactly as the joint write does."""
    D, K = 16, 4
    g = torch.Generator().manual_seed(3)
    key = _keys(D)[0]
    phi_copies = feature_map(key.expand(1, K, D))
    vals = torch.randn(1, K, D, generator=g)
    beta = torch.full((1, K, 1), 0.5)
    A0, z0 = torch.randn(1, 6 * D, D, generator=g) * 0.1, phi_copies[:, 0].clone()  # the key counted once
    An, zn = delta_write(A0, z0, phi_copies, vals, beta, normalized=True)
    mean_beta_v = (beta * vals).mean(1, keepdim=True) / beta.mean(1, keepdim=True)  # the copies' mean value
    A1, z1 = delta_write(A0, z0, phi_copies[:, :1], mean_beta_v, beta[:, :1])
    torch.testing.assert_close(An, A1, atol=1e-5, rtol=0)
    torch.testing.assert_close(zn, z1, atol=1e-6, rtol=0)
    Aj, _ = delta_write(A0, z0, phi_copies, vals, beta)
    assert (Aj - A0).norm() > 2 * (An - A0).norm()  # the joint write moves by the sum of the K updates

    phi = feature_map(_keys(D)[None])  # three keys whose features do not overlap
    assert torch.allclose(phi @ phi.transpose(1, 2), torch.eye(3)[None], atol=1e-6)
    vals, beta = vals[:, :3], beta[:, :3]
    for a, b in zip(
        delta_write(A0, z0, phi, vals, beta, normalized=True),
        delta_write(A0, z0, phi, vals, beta),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_write_norm_makes_the_written_values_independent_of_the_stream_scale():
    """`write_norm`: the write reads the memory tokens layer-normalised, so memory tokens 100 times larger (a read
    that grew with the memory, carried in the residual stream) write the same memory; without it they write 100
    times larger values, the feedback that let the memory grow without bound over long documents (armt.py)."""
    D, K = 16, 4
    g = torch.Generator().manual_seed(4)
    layers = {}
    for norm in (False, True):
        torch.manual_seed(0)
        layers[norm] = AssociativeLayer(D, D // 4, K, order="normalized", write_norm=norm)
        with torch.no_grad():
            layers[norm].value.weight.normal_(std=0.1, generator=g)
    m = torch.randn(1, K, D, generator=g)
    F_ = 6 * (D // 4)
    empty = torch.zeros(1, F_, D), torch.zeros(1, F_)
    with torch.no_grad():
        A_small, _, _ = layers[True].write(m, *empty)
        A_big, _, _ = layers[True].write(100 * m, *empty)
        torch.testing.assert_close(A_small, A_big, atol=1e-5, rtol=1e-4)
        raw_small, _, _ = layers[False].write(m, *empty)
        raw_big, _, _ = layers[False].write(100 * m, *empty)
        assert raw_big.norm() > 50 * raw_small.norm() > 0


def test_write_order_is_one_switch():
    """`model.memory.write_order`, `write_norm` and `write_penalty` reach every layer: joint is the official
    update, normalized the default; the write reads normalised memory tokens unless `write_norm=false` (the
    official write)."""
    assert all(b.memory.order == "normalized" for b in tiny_model("armt").blocks.values())
    assert all(b.memory.write_penalty == 3e-4 for b in tiny_model("armt").blocks.values())
    for order in ("joint", "sequential"):
        model = tiny_model("armt", f"model.memory.write_order={order}")
        assert all(b.memory.order == order for b in model.blocks.values())
    assert all(
        b.memory.write_norm for b in tiny_model("armt", "model.memory.write_norm=true").blocks.values()
    )
    with pytest.raises(Exception, match="write_order"):
        tiny_model("armt", "model.memory.write_order=both")
    with pytest.raises(Exception, match="write_penalty=-1.0 must be >= 0"):
        tiny_model("armt", "model.memory.write_penalty=-1")


def test_write_penalty_adds_the_mean_gate_per_token_to_the_objective():
    """`write_penalty`: each layer adds write_penalty x T x (mean gate of its memory tokens), summed over rows, in
    the units of the token-loss sum; its gradient reaches the gates; without it there is no auxiliary term."""
    model = _model("model.memory.write_penalty=0.01")
    batch = random_batches(1)[0]
    gates = []
    hooks = [
        b.memory.beta.register_forward_hook(lambda m, i, o: gates.append(o)) for b in model.blocks.values()
    ]
    out = model.step(batch.tokens_BT, model.init_state(batch.tokens_BT.shape[0]))
    for h in hooks:
        h.remove()
    T = batch.tokens_BT.shape[1]
    want = sum(0.01 * T * torch.sigmoid(g.float()).mean(dim=(1, 2)).sum() for g in gates)
    torch.testing.assert_close(out.aux_sum, want)
    out.aux_sum.backward()
    assert all(b.memory.beta.bias.grad.item() > 0 for b in model.blocks.values())  # pushes the gates shut
    off = _model("model.memory.write_penalty=0")
    assert off.step(batch.tokens_BT, off.init_state(batch.tokens_BT.shape[0])).aux_sum is None
