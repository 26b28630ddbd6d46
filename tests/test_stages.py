"""The model cut for pipeline and tensor parallelism (DESIGN.md §2), checked on one process:

- a model built for a slice of layers holds only its parts, and a chain of stages computes what the whole model
  computes, state included;
- every block replays under `torch.utils.checkpoint`, reentrant or not, with the gradients of a plain run, and
  `train.activation_checkpointing` (full, selective) gives them too, for every memory_grad mode;
- the attention projections are laid out per head: a column split of their rows gives each rank whole heads,
  and the kinds read their head count off the modules and tensors they are given.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memscale.config import GRAD_CARRYING_KINDS, config_from_dict
from memscale.models import MemoryTransformer
from memscale.models.layers import Attention
from memscale.models.memory.memformer import MemoryRead
from memscale.models.memory.xl import RelativeLayer
from memscale.train.bptt import run_window
from tests.helpers import TINY, random_batches, tiny_model

KINDS = ["none", "rmt", "xl", "memformer", "lamemo", "infinity", "armt"]
EXTRA = ["model.memory.mem_len=8", "model.memory.num_basis=16", "model.memory.num_samples=32"]


def _cfg(kind: str, *extra: str):
    return config_from_dict(
        {},
        [
            *TINY,
            "model.num_layers=3",
            f"model.memory.kind={kind}",
            "model.memory.num_tokens=4",
            *EXTRA,
            *extra,
        ],
    )


def _stage(cfg, layers: range, full: MemoryTransformer) -> MemoryTransformer:
    stage = MemoryTransformer(cfg.model, segment_len=cfg.data.segment_len, layers=layers)
    full_sd = full.state_dict()
    stage.load_state_dict({name: full_sd[name] for name in stage.state_dict()}, strict=True)
    return stage.eval()


# -- the stage cut -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_stages_chain_to_the_whole_model(kind):
    cfg = _cfg(kind)
    torch.manual_seed(0)
    full = MemoryTransformer(cfg.model, segment_len=cfg.data.segment_len).eval()
    first, middle, last = (_stage(cfg, r, full) for r in (range(0, 1), range(1, 2), range(2, 3)))

    # Each part lives on the stage that uses it; parameter names do not depend on the cut.
    assert first.embed is not None and first.head is None and first.norm is None
    assert middle.embed is None and middle.pos is None and middle.head is None
    assert last.embed is None and last.head is not None and last.norm is not None
    assert list(middle.blocks) == ["1"]
    names = set(full.state_dict())
    assert set().union(*(set(s.state_dict()) for s in (first, middle, last))) == names
    per_layer = [n for n in names if n.startswith("blocks.")]
    assert all(sum(n in s.state_dict() for s in (first, middle, last)) == 1 for n in per_layer)

    # The stages' initial states together are the whole model's; per-layer names belong to one stage only.
    whole = full.init_state(2)
    parts = [s.init_state(2) for s in (first, middle, last)]
    assert set().union(*(set(p) for p in parts)) == set(whole)
    for layer, p in enumerate(parts):
        assert all(n.rsplit(".", 1)[1] == str(layer) for n in p if "." in n)

    state = whole
    tokens = random_batches(2)[0].tokens_BT
    with torch.no_grad():
        for seg in range(2):
            reset = torch.tensor([seg == 1, False])
            torch.manual_seed(seg)  # infinity draws its sticky samples
            ref = full.step(tokens, state, reset_B=reset)
            torch.manual_seed(seg)
            s = full.memory.reset(state, reset)
            T = tokens.shape[1]
            x, new = first.embed_segment(tokens, s)
            for stage in (first, middle, last):
                x, new_layers = stage.run_blocks(x, s, num_tokens=T)
                new.update(new_layers)
            h, new_last = last.finish(x, s, num_tokens=T)
            new.update(new_last)
            assert torch.equal(h, ref.hidden_BTD)
            assert set(new) == set(ref.state)
            for name in ref.state:
                assert torch.equal(new[name], ref.state[name]), name
            state = ref.state


def test_a_layer_slice_must_be_contiguous_and_inside_the_model():
    cfg = _cfg("xl")
    for bad in (range(2, 2), range(0, 4), range(0, 3, 2)):
        with pytest.raises(ValueError, match="contiguous slice"):
            MemoryTransformer(cfg.model, segment_len=8, layers=bad)


# -- activation checkpointing per block ------------------------------------------------------------------------
class Checkpointed(nn.Module):
    """A block replayed in backward by torch.utils.checkpoint (as an outside activation-checkpoint wrapper does)."""

    def __init__(self, block: nn.Module, *, use_reentrant: bool):
        super().__init__()
        self.block = block
        self.use_reentrant = use_reentrant

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, *args):
        return checkpoint(self.block, *args, use_reentrant=self.use_reentrant)


def _grads_of_window(kind: str, *, wrap: bool | None):
    model = tiny_model(kind, "model.dropout=0.1", *EXTRA, seed=2)
    if wrap is not None:
        for name, block in list(model.blocks.items()):
            model.blocks[name] = Checkpointed(block, use_reentrant=wrap)
    torch.manual_seed(5)
    grad = "truncated" if kind in GRAD_CARRYING_KINDS else "detached"
    r = run_window(model, random_batches(3, reset_at={2: [0]}), model.init_state(2), memory_grad=grad)
    return r, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("kind", KINDS)
def test_checkpointed_blocks_give_the_same_gradients(kind):
    """Same loss, state and gradients with every block checkpointed (reentrant and not) as without: a block's
    state comes in and goes out as explicit tensors, and the replay redraws the same dropout masks.

    1e-6 absolute: the recomputation runs the same kernels on the same inputs; only the order in which gradient
    contributions are summed into `.grad` can differ."""
    ref, ref_grads = _grads_of_window(kind, wrap=None)
    assert sum(g is not None for g in ref_grads) > 0
    for reentrant in (True, False):
        _assert_same_window(*_grads_of_window(kind, wrap=reentrant), ref, ref_grads)


def _assert_same_window(got, grads, ref, ref_grads) -> None:
    assert got.loss_sum == pytest.approx(ref.loss_sum, rel=1e-6)
    for name in ref.state:
        torch.testing.assert_close(got.state[name], ref.state[name], atol=1e-6, rtol=0)
    for g, g_ref in zip(grads, ref_grads, strict=True):
        assert (g is None) == (g_ref is None)
        if g is not None:
            torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=0)


def _switched_window(kind: str, mode: str, memory_grad: str, *, meter=None):
    model = tiny_model(kind, "model.dropout=0.1", *EXTRA, seed=2)
    model.set_activation_checkpointing(mode)
    torch.manual_seed(5)
    hooks = (
        torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack)
        if meter is not None
        else contextlib.nullcontext()
    )
    with hooks:
        r = run_window(
            model, random_batches(3, reset_at={2: [0]}), model.init_state(2), memory_grad=memory_grad
        )
    return r, [p.grad for p in model.parameters()]


CASES = [
    (k, g)
    for k in KINDS
    for g in (("detached", "truncated", "replay") if k in GRAD_CARRYING_KINDS else ("detached",))
]


@pytest.mark.parametrize("kind, memory_grad", CASES)
def test_activation_checkpointing_switch_gives_the_same_gradients(kind, memory_grad):
    """`train.activation_checkpointing` full and selective against none, for every kind and memory_grad mode, with
    dropout on: same loss, state and gradients (1e-6 absolute, as above: the same kernels on the same inputs)."""
    ref, ref_grads = _switched_window(kind, "none", memory_grad)
    for mode in ("full", "selective"):
        _assert_same_window(*_switched_window(kind, mode, memory_grad), ref, ref_grads)


@pytest.mark.parametrize("kind", ["rmt", "xl"])
def test_activation_checkpointing_keeps_fewer_activations(kind):
    """What autograd keeps outside recomputed regions (saved_tensors_hooks): selective drops the attention
    sub-layers' tensors, full every block's; the switch is not a no-op."""
    from tests.test_bptt import _SavedBytes

    peak = {}
    for mode in ("none", "selective", "full"):
        meter = _SavedBytes()
        _switched_window(kind, mode, "truncated" if kind in GRAD_CARRYING_KINDS else "detached", meter=meter)
        peak[mode] = meter.peak
    assert peak["full"] < peak["selective"] < peak["none"], peak


# -- per-head layout: a column split gives whole heads ------------------------------------------------------------
TP = 2


def _column_shard(linear: nn.Linear, rank: int) -> nn.Linear:
    """Rows (outputs) rank*n/TP .. (rank+1)*n/TP: a column-parallel linear's shard."""
    n = linear.out_features // TP
    out = nn.Linear(linear.in_features, n, bias=linear.bias is not None)
    out.weight.data = linear.weight.data[rank * n : (rank + 1) * n].clone()
    if linear.bias is not None:
        out.bias.data = linear.bias.data[rank * n : (rank + 1) * n].clone()
    return out


def _row_shard(linear: nn.Linear, rank: int) -> nn.Linear:
    """Columns (inputs) of a rank, bias on rank 0 only: a row-parallel linear's shard (outputs are summed)."""
    n = linear.in_features // TP
    out = nn.Linear(n, linear.out_features, bias=linear.bias is not None)
    out.weight.data = linear.weight.data[:, rank * n : (rank + 1) * n].clone()
    if linear.bias is not None:
        out.bias.data = linear.bias.data.clone() if rank == 0 else torch.zeros_like(linear.bias.data)
    return out


def _attention_shard(attn: Attention, rank: int) -> Attention:
    shard = Attention(32, 4)
    shard.qkv = _column_shard(attn.qkv, rank)
    shard.out = _row_shard(attn.out, rank)
    return shard


def test_attention_split_by_rows_gives_whole_heads():
    torch.manual_seed(0)
    attn = Attention(32, 4)
    h = torch.randn(2, 5, 32)
    shards = [_attention_shard(attn, r) for r in range(TP)]
    assert [s.num_heads for s in shards] == [2, 2] and attn.num_heads == 4
    torch.testing.assert_close(sum(s(h) for s in shards), attn(h), atol=1e-6, rtol=0)
    # Rank r's q, k and v are exactly heads 2r and 2r+1 of the whole projection.
    q, k, v = attn.project(h)
    for r, s in enumerate(shards):
        for whole, part in zip((q, k, v), s.project(h), strict=True):
            torch.testing.assert_close(part, whole[:, 2 * r : 2 * r + 2], atol=1e-6, rtol=0)


def test_memformer_read_split_by_heads():
    torch.manual_seed(0)
    read = MemoryRead(32, 4)
    x, mem = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    total = torch.zeros_like(x)
    for r in range(TP):
        shard = MemoryRead(32, 4)
        shard.norm.load_state_dict(read.norm.state_dict())
        shard.q, shard.kv, shard.out = (
            _column_shard(read.q, r),
            _column_shard(read.kv, r),
            _row_shard(read.out, r),
        )
        total = total + shard(x, mem) - x
    torch.testing.assert_close(x + total, read(x, mem), atol=1e-6, rtol=0)


def test_xl_layer_split_by_heads():
    """u, v, r_net and the attention split by heads; the cached inputs (mem) are replicated."""
    torch.manual_seed(0)
    model = tiny_model("xl", "model.num_heads=4", "model.memory.mem_len=8").eval()
    block = model.blocks["0"]
    T, M = 8, 8
    state = model.init_state(2)
    state.tensors["mem.0"] = torch.randn(2, M, 32)
    state.tensors["valid"][:, 3:] = True
    ctx, _ = model.memory.begin(state, num_tokens=T, device=torch.device("cpu"), dtype=torch.float32)
    h = torch.randn(2, T, 32)
    with torch.no_grad():
        whole, (new_mem,) = block.memory.attention(block.attn, h, ctx, {"mem": state["mem.0"]})
        total = torch.zeros_like(whole)
        for r in range(TP):
            layer = RelativeLayer(32)
            layer.r_net = _column_shard(block.memory.r_net, r)
            heads = slice(2 * r, 2 * r + 2)
            ctx_r = {**ctx, "u": ctx["u"][heads], "v": ctx["v"][heads]}
            part, (mem_r,) = layer.attention(
                _attention_shard(block.attn, r), h, ctx_r, {"mem": state["mem.0"]}
            )
            total = total + part
            assert torch.equal(mem_r, new_mem)
    torch.testing.assert_close(total, whole, atol=1e-6, rtol=0)


def test_lamemo_layer_split_by_heads():
    """LaMemo attends per head and keeps per-head state (attention vectors, log-normalisers): split with the heads
    (`head_sharded_state`), a rank's new state is its heads' share of the whole."""
    from memscale.models.memory.lamemo import LookAheadLayer

    torch.manual_seed(0)
    model = tiny_model("lamemo", "model.num_heads=4", "model.memory.mem_len=8").eval()
    block = model.blocks["0"]
    assert block.memory.head_sharded_state == ("attn", "lognorm")
    T, M, K = 8, 8, 8
    state = model.init_state(2)
    state.tensors["valid"][:, 2:] = True
    state.tensors["attn.0"] = torch.randn(2, M, 32)
    state.tensors["lognorm.0"] = torch.randn(2, M, 4)
    ctx, _ = model.memory.begin(state, num_tokens=T, device=torch.device("cpu"), dtype=torch.float32)
    h = torch.randn(2, M + T, 32)
    layer_state = {"attn": state["attn.0"], "lognorm": state["lognorm.0"]}
    with torch.no_grad():
        whole, (attn_new, lognorm_new) = block.memory.attention(block.attn, h, ctx, layer_state)
        total = torch.zeros_like(whole)
        for r in range(TP):
            layer = LookAheadLayer(32)
            layer.r_net = _column_shard(block.memory.r_net, r)
            heads, cols = slice(2 * r, 2 * r + 2), slice(2 * r * K, (2 * r + 2) * K)
            ctx_r = {**ctx, **{n: ctx[n][heads] for n in ("u", "v", "v_future")}}
            state_r = {"attn": layer_state["attn"][..., cols], "lognorm": layer_state["lognorm"][..., heads]}
            part, (attn_r, lognorm_r) = layer.attention(_attention_shard(block.attn, r), h, ctx_r, state_r)
            total = total + part
            torch.testing.assert_close(attn_r, attn_new[..., cols], atol=1e-6, rtol=0)
            torch.testing.assert_close(lognorm_r, lognorm_new[..., heads], atol=1e-6, rtol=0)
    torch.testing.assert_close(total, whole, atol=1e-6, rtol=0)


def test_infinity_layer_split_by_heads():
    """The short-term attention (u, v, r_net, q/k/v) and the long-term key/value maps split by heads, the output
    maps by rows; the cached inputs, the coefficients and the gate are replicated, and without sticky sampling
    every rank refits the same memory. Each rank's KL term covers its own heads: the terms sum to the whole."""
    from memscale.models.memory.infinity import LongTermAttention

    torch.manual_seed(0)
    model = tiny_model(
        "infinity", "model.num_heads=4", *EXTRA, "model.memory.sticky=false", "model.memory.kl_lambda=0.01"
    ).eval()
    block = model.blocks["0"]
    T, M = 8, 8
    state = model.init_state(2)
    state.tensors["mem.0"] = torch.randn(2, M + T, 32)
    state.tensors["coef.0"] = torch.randn(2, 16, 32)
    state.tensors["valid"][:] = True
    state.tensors["empty"][:] = False
    ctx, _ = model.memory.begin(state, num_tokens=T, device=torch.device("cpu"), dtype=torch.float32)
    h = torch.randn(2, T, 32)
    layer_state = {n: state[f"{n}.0"] for n in ("mem", "coef", "mass")}
    with torch.no_grad():
        whole, (*new, aux) = block.memory.attention(block.attn, h, ctx, layer_state)
        total, aux_total = torch.zeros_like(whole), 0.0
        for r in range(TP):
            layer = LongTermAttention(32, 4, 16, sticky=False, num_samples=32, kl_lambda=0.01)
            layer.load_state_dict(block.memory.state_dict())
            layer.r_net = _column_shard(block.memory.r_net, r)
            layer.key, layer.value = _column_shard(block.memory.key, r), _column_shard(block.memory.value, r)
            layer.out = _row_shard(block.memory.out, r)
            heads = slice(2 * r, 2 * r + 2)
            ctx_r = {**ctx, "u": ctx["u"][heads], "v": ctx["v"][heads]}
            part, (mem_r, coef_r, _, aux_r) = layer.attention(
                _attention_shard(block.attn, r), h, ctx_r, layer_state
            )
            total, aux_total = total + part, aux_total + aux_r
            assert torch.equal(coef_r, new[1]) and torch.equal(mem_r, new[0])
    torch.testing.assert_close(total, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(aux_total, aux, atol=0, rtol=1e-6)
    assert aux > 0
