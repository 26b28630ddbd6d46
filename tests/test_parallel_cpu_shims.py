"""megatron-core on CPU: TP=2 layers equal their single-process reference; RNG streams; tensor_parallel.checkpoint.

One 2-process run (tp=2, gloo) computes everything; the tests below read its results. The reference is the same
network written with plain torch ops on the full weights, in each process: what TP=1 computes.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed

V, D, F, T, B = 64, 16, 32, 8, 2

# fp32, max |TP=2 - reference| / max |reference| over the loss and each gathered gradient. A row-parallel layer sums
# two half-width partial products and all-reduces them, the reference sums the full width at once; the vocab-parallel
# softmax reduces its max and sum over two shards: the same terms in another order, so they differ by a few fp32
# roundings (eps 1.2e-7) and no more. Measured: loss 0 (exact), gradients <= 3.5e-7 relative.
TOL = 2e-6


def _mp_config():
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=2, use_cpu_initialization=True, params_dtype=torch.float32
    )


def _no_init(w):
    return w


def _shard(full: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    return full.chunk(2, dim=dim)[rank].clone()


def _layers_check(g) -> dict:
    """Embedding -> column -> row -> tied vocab-parallel head -> vocab-parallel CE, TP=2 vs plain torch."""
    import torch.nn.functional as Fn
    from megatron.core import tensor_parallel as mtp

    cfg = _mp_config()
    gen = torch.Generator().manual_seed(0)
    emb_w = torch.randn(V, D, generator=gen) * 0.5
    w1, b1 = torch.randn(F, D, generator=gen) * 0.3, torch.randn(F, generator=gen) * 0.1
    w2, b2 = torch.randn(D, F, generator=gen) * 0.3, torch.randn(D, generator=gen) * 0.1
    w3 = torch.randn(F, D, generator=gen) * 0.3
    tokens = torch.randint(0, V, (T, B), generator=gen)
    targets = torch.randint(0, V, (T, B), generator=gen)

    # Reference (TP=1): plain ops on the full weights.
    ref = {
        n: t.clone().requires_grad_() for n, t in dict(emb=emb_w, w1=w1, b1=b1, w2=w2, b2=b2, w3=w3).items()
    }
    x = Fn.embedding(tokens, ref["emb"])
    h = Fn.gelu(Fn.linear(x, ref["w1"], ref["b1"]))
    y = Fn.linear(h, ref["w2"], ref["b2"]) + Fn.linear(x, ref["w3"]).sum(-1, keepdim=True)
    ref_loss = Fn.cross_entropy(Fn.linear(y, ref["emb"]).reshape(-1, V), targets.reshape(-1))
    ref_loss.backward()

    r = g.tp_rank
    emb = mtp.VocabParallelEmbedding(V, D, init_method=_no_init, config=cfg, tp_group=g.tp)
    col = mtp.ColumnParallelLinear(
        D, F, config=cfg, init_method=_no_init, bias=True, gather_output=False, tp_group=g.tp
    )
    row = mtp.RowParallelLinear(
        F,
        D,
        config=cfg,
        init_method=_no_init,
        bias=True,
        input_is_parallel=True,
        skip_bias_add=False,
        tp_group=g.tp,
    )
    # gather_output=True allocates its all-gather buffer on torch.cuda.current_device(): shim 1.
    gathered = mtp.ColumnParallelLinear(
        D, F, config=cfg, init_method=_no_init, bias=False, gather_output=True, tp_group=g.tp
    )
    with torch.no_grad():
        emb.weight.copy_(_shard(emb_w, 0, r))
        col.weight.copy_(_shard(w1, 0, r))
        col.bias.copy_(_shard(b1, 0, r))
        row.weight.copy_(_shard(w2, 1, r))
        row.bias.copy_(b2)
        gathered.weight.copy_(_shard(w3, 0, r))
    x = emb(tokens)
    h_par, _ = col(x)
    y, _ = row(Fn.gelu(h_par))
    y = y + gathered(x)[0].sum(-1, keepdim=True)
    logits_par = Fn.linear(mtp.copy_to_tensor_model_parallel_region(y, group=g.tp), emb.weight)  # tied head
    loss = mtp.vocab_parallel_cross_entropy(logits_par.contiguous(), targets).mean()
    loss.backward()

    def gather(t: torch.Tensor, dim: int) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(2)]
        dist.all_gather(parts, t.contiguous(), group=g.tp)
        return torch.cat(parts, dim=dim)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).abs().max() / b.abs().max()).item()

    diffs = {
        "loss": rel(loss.detach(), ref_loss.detach()),
        "emb": rel(gather(emb.weight.grad, 0), ref["emb"].grad),
        "w1": rel(gather(col.weight.grad, 0), ref["w1"].grad),
        "b1": rel(gather(col.bias.grad, 0), ref["b1"].grad),
        "w2": rel(gather(row.weight.grad, 1), ref["w2"].grad),
        "b2": rel(row.bias.grad, ref["b2"].grad),
        "w3": rel(gather(gathered.weight.grad, 0), ref["w3"].grad),
    }
    return {"loss": loss.item(), "ref_loss": ref_loss.item(), "diffs": diffs}


def _rng_check(g) -> dict:
    import torch.distributed as dist
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from memscale.parallel.random import model_parallel_seed, replayed_rng, rng_restore, rng_snapshot

    model_parallel_seed(1234, tp_rank=g.tp_rank)
    tracker = get_cuda_rng_tracker()

    def draw():
        with tracker.fork():
            tp = torch.rand(6)
            drop = torch.nn.functional.dropout(torch.ones(6), 0.5)
        return tp, torch.rand(6), drop

    snap = rng_snapshot()
    tp1, default1, drop1 = draw()
    after1 = draw()
    rng_restore(snap)
    tp2, default2, drop2 = draw()
    after2 = draw()
    with replayed_rng(snap):
        tp3, _, _ = draw()
    ambient = draw()  # the replay left the ambient streams where they were: the third draw of the sequence
    rng_restore(snap)
    draw(), draw()
    third = draw()

    both = [torch.empty(2, 6) for _ in range(2)]
    dist.all_gather(both, torch.stack([tp1, default1]), group=g.tp)
    return {
        "forked_differs_from_default": not torch.equal(tp1, default1),
        "replay_equal": all(
            torch.equal(a, b) for a, b in zip((tp1, default1, drop1), (tp2, default2, drop2), strict=True)
        )
        and all(torch.equal(a, b) for a, b in zip(after1, after2, strict=True)),
        "replayed_rng_equal": torch.equal(tp3, tp1),
        "ambient_kept": all(torch.equal(a, b) for a, b in zip(ambient, third, strict=True)),
        "tp_streams_differ_across_ranks": not torch.equal(both[0][0], both[1][0]),
        "default_equal_across_ranks": torch.equal(both[0][1], both[1][1]),
    }


def _checkpoint_check(g) -> dict:
    """tensor_parallel.checkpoint recomputes with the same default and TP-stream dropout: grads equal exactly."""
    import torch.nn.functional as Fn
    from megatron.core import tensor_parallel as mtp

    from memscale.parallel.random import model_parallel_seed

    cfg = _mp_config()
    col = mtp.ColumnParallelLinear(
        D, F, config=cfg, init_method=torch.nn.init.normal_, bias=True, gather_output=False, tp_group=g.tp
    )
    row = mtp.RowParallelLinear(
        F,
        D,
        config=cfg,
        init_method=torch.nn.init.normal_,
        bias=True,
        input_is_parallel=True,
        skip_bias_add=False,
        tp_group=g.tp,
    )
    x0 = torch.randn(T, B, D, generator=torch.Generator().manual_seed(1))

    def block(x):
        h, _ = col(Fn.dropout(x, 0.3))  # replicated activations: default stream
        with mtp.get_cuda_rng_tracker().fork():
            h = Fn.dropout(h, 0.3)  # TP region: the tracker's stream
        return row(Fn.gelu(h))[0]

    results = []
    for use_ckpt in (False, True):
        model_parallel_seed(7, tp_rank=g.tp_rank)
        for p in (*col.parameters(), *row.parameters()):
            p.grad = None
        x = x0.clone().requires_grad_()
        out = mtp.checkpoint(block, False, x) if use_ckpt else block(x)
        out.square().sum().backward()
        results.append([out.detach(), x.grad, col.weight.grad, row.weight.grad])
    plain, ckpt = results
    return {"checkpoint_max_diff": max((a - b).abs().max().item() for a, b in zip(plain, ckpt, strict=True))}


def _worker():
    from memscale.config import ParallelConfig
    from memscale.parallel.dims import ParallelDims, destroy_distributed, init_distributed

    g = init_distributed(ParallelDims.from_config(ParallelConfig(tp=2)).validate(num_heads=2, vocab_size=V))
    out = {"layers": _layers_check(g), "rng": _rng_check(g), "checkpoint": _checkpoint_check(g)}
    destroy_distributed()
    return out


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(_worker, 2)


def test_tp2_layers_equal_reference(tp2):
    for out in tp2:
        assert abs(out["layers"]["loss"] - out["layers"]["ref_loss"]) <= TOL * abs(out["layers"]["ref_loss"])
        assert max(out["layers"]["diffs"].values()) < TOL, out["layers"]["diffs"]


def test_rng_tracker_streams(tp2):
    for out in tp2:
        assert all(out["rng"].values()), out["rng"]


def test_tensor_parallel_checkpoint_is_exact(tp2):
    for out in tp2:
        assert out["checkpoint"]["checkpoint_max_diff"] == 0.0


def test_shims_idempotent_and_reversible():
    from megatron.core.tensor_parallel import random as mrandom

    from memscale.parallel import cpu_shims

    before = (torch.cuda.current_device, mrandom._get_cuda_rng_state, mrandom.CudaRNGStatesTracker.add)
    try:
        assert cpu_shims.apply_cpu_shims()
        patched = (torch.cuda.current_device, mrandom._get_cuda_rng_state, mrandom.CudaRNGStatesTracker.add)
        assert cpu_shims.apply_cpu_shims()
        assert (
            torch.cuda.current_device,
            mrandom._get_cuda_rng_state,
            mrandom.CudaRNGStatesTracker.add,
        ) == patched
        assert torch.cuda.current_device() == torch.device("cpu")
    finally:
        cpu_shims.remove_cpu_shims()
    assert (
        torch.cuda.current_device,
        mrandom._get_cuda_rng_state,
        mrandom.CudaRNGStatesTracker.add,
    ) == before
    assert not cpu_shims.cpu_shims_applied()


def test_shims_not_applied_on_cuda(monkeypatch):
    from memscale.parallel import cpu_shims

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not cpu_shims.apply_cpu_shims()
    assert not cpu_shims.cpu_shims_applied()
