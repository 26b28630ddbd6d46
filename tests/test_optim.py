"""Weight decay by parameter role: every projection's weight matrix decays, memory projections included; biases,
norms, embeddings and the memory kinds' learned vectors do not."""

import pytest

from memscale.config import config_from_dict
from memscale.models import MemoryTransformer
from memscale.train.optim import build_optimizer, decay_groups
from tests.helpers import TINY, tiny_model

BLOCK_MATRICES = ["attn.qkv.weight", "attn.out.weight", "mlp.up.weight", "mlp.down.weight"]
MEMORY_MATRICES = {
    "none": ([], []),
    "rmt": ([], []),
    # the reader of every layer: q, k|v, out; the writer: q, k|v
    "memformer": (
        ["memory.q.weight", "memory.kv.weight", "memory.out.weight"],
        ["memory.write.q.weight", "memory.write.kv.weight"],
    ),
    "xl": (["memory.r_net.weight"], []),
    "lamemo": (["memory.r_net.weight"], []),
    # the long-term read's key, value, out and N -> 1 maps, the short-term attention's W_r, the CNN gate
    "infinity": ([f"memory.{m}.weight" for m in ("key", "value", "out", "mu", "sigma", "r_net", "gate")], []),
}
MEMORY_VECTORS = {
    "none": [],
    "rmt": ["memory.mem_init_KD", "memory.read_pos_KD", "memory.write_pos_KD"],
    "memformer": ["memory.bias_MD"],
    "xl": ["memory.u_HK", "memory.v_HK"],
    "lamemo": ["memory.u_HK", "memory.v_HK", "memory.v_future_HK"],
    "infinity": ["memory.u_HK", "memory.v_HK"],
}


def _names(model, params):
    ids = {id(p) for p in params}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


@pytest.mark.parametrize("kind", list(MEMORY_MATRICES))
def test_decay_every_projection_matrix_and_nothing_else(kind):
    model = tiny_model(kind)
    decay, no_decay = decay_groups(model)
    per_layer, shared = MEMORY_MATRICES[kind]
    expected = [f"blocks.{i}.{m}" for i in range(2) for m in BLOCK_MATRICES + per_layer] + shared
    assert _names(model, decay) == sorted(expected)
    exempt = _names(model, no_decay)
    for name in [
        "embed.weight",
        "norm.weight",
        "norm.bias",
        "blocks.0.attn.qkv.bias",
        "blocks.1.norm2.weight",
    ]:
        assert name in exempt
    assert set(MEMORY_VECTORS[kind]) <= set(exempt)
    assert ("pos.weight" in exempt) == (model.pos is not None)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))  # the tied head is the embedding, once
    opt = build_optimizer(model, config_from_dict({}, []).train)
    assert [len(g["params"]) for g in opt.param_groups] == [len(decay), len(no_decay)]
    assert opt.param_groups[0]["weight_decay"] > 0 and opt.param_groups[1]["weight_decay"] == 0


def test_memformer_counts():
    """2 layers: 8 memory projection matrices decay (3 per reader, 2 in the writer); the slots' bias does not."""
    model = tiny_model("memformer")
    decay, no_decay = decay_groups(model)
    memory = [n for n in _names(model, decay) if "memory." in n]
    assert len(memory) == 8
    assert "memory.bias_MD" in _names(model, no_decay)


def test_head_decays_only_when_untied():
    untied = tiny_model("none", "model.tie_embeddings=false")
    assert "head.weight" in _names(untied, decay_groups(untied)[0])
    # A last pipeline stage holds its own copy of a tied head: it is the embedding there too.
    cfg = config_from_dict({}, [*TINY, "model.memory.kind=none"])
    last = MemoryTransformer(cfg.model, segment_len=8, layers=range(1, 2))
    assert last.embed is None and "head.weight" in _names(last, decay_groups(last)[1])
