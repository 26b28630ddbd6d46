"""memscale's own memory kinds under ZeRO (dp=2, real processes) against one process on the whole batch.

The stand-in model of test_parallel_zero.py pins each mechanism; this runs the real `MemoryTransformer` of every
kind through the same engine, with the memory_grad modes each kind allows: rmt's `mem_init_KD` expanded in
`init_state`, the tied `head.weight` in the fused loss, `pos.weight[:T]`, memformer's bias and xl/lamemo's `u`/`v`
are all used outside their owning module's forward. memscale/train/bptt.py's run_window also runs unchanged through
`engine.model` (plain `backward()` calls). ZeRO-3 is in the default suite (it has the blind spots);
ZeRO-1/2 are marked slow (test_parallel_zero.py covers their accumulation and scaling).
"""

from __future__ import annotations

import pytest
import torch

from memscale.parallel.dims import ParallelDims
from tests import parallel_standin as si
from tests.distributed import run_distributed

CASES = [
    ("rmt", "replay"),
    ("rmt", "truncated"),
    ("rmt", "detached"),
    ("memformer", "replay"),
    ("armt", "replay"),
    ("armt", "truncated"),
    ("xl", "detached"),
    ("lamemo", "detached"),
    # Sticky memories draw sample positions from the RNG per row: two ranks of 2 rows draw other numbers than one
    # process of 4 rows (measured 6e-3 apart under every stage alike). Without them the kind is deterministic.
    ("infinity", "detached"),
    ("none", "detached"),
]
VOCAB, B_LOCAL, DP = 50, 2, 2

# fp32: measured max relative difference 2.5e-7 over losses and grad norms, all kinds, modes and stages.
RTOL = 1e-5


def _model(kind: str):
    from tests.helpers import tiny_model

    extra = ("model.memory.sticky=false",) if kind == "infinity" else ()
    return tiny_model(kind, *extra, seed=0)


def _data(B: int, num_windows: int = 3):
    g = torch.Generator().manual_seed(0)
    windows = []
    for w in range(num_windows):
        segs = []
        for t in range(3):
            tokens = torch.randint(0, VOCAB, (B, 8), generator=g)
            targets = torch.randint(0, VOCAB, (B, 8), generator=g)
            targets[B // 2 :, : (w + t) % 8] = si.IGNORE
            reset = torch.zeros(B, dtype=torch.bool)
            reset[(w + t) % B] = (w * 3 + t) % 3 == 1
            segs.append((tokens, targets, reset))
        windows.append(segs)
    return windows


def _reference(kind: str, mode: str, num_windows: int = 3):
    from memscale.train.optim import build_optimizer

    cfg = si.train_config()
    model = _model(kind)
    opt = build_optimizer(model, cfg.train)
    state = model.init_state(B_LOCAL * DP)
    losses, norms = [], []
    for segs in _data(B_LOCAL * DP, num_windows):
        n = si.num_targets(segs)
        loss_sum, state = si.run_window(model, torch.autograd.backward, segs, state, mode=mode, scale=1.0 / n)
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_sum / n)
    return losses, norms


BPTT_MODES = ("detached", "replay")


def _batches(B: int, rows: slice):
    from memscale.data.batch import Batch

    return [
        [
            Batch(
                tokens_BT=a[rows],
                targets_BT=b[rows],
                reset_B=c[rows],
                doc_pos_B=torch.zeros_like(c[rows], dtype=torch.long),
            )
            for a, b, c in segs
        ]
        for segs in _data(B)
    ]


def _bptt_reference(mode: str) -> list[float]:
    from memscale.train.bptt import run_window
    from memscale.train.optim import build_optimizer

    cfg = si.train_config()
    model = _model("rmt")
    opt = build_optimizer(model, cfg.train)
    state, losses = model.init_state(B_LOCAL * DP), []
    for batches in _batches(B_LOCAL * DP, slice(None)):
        r = run_window(model, batches, state, memory_grad=mode)
        state = r.state
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(r.loss_sum / r.num_targets)
    return losses


def _worker(stage: int, tp: int = 1, num_windows: int = 3):
    import torch.distributed as dist

    from memscale.parallel.dims import destroy_distributed, init_distributed
    from memscale.parallel.random import model_parallel_seed
    from memscale.parallel.tensor import parallelize
    from memscale.parallel.zero import build_engine
    from memscale.train.optim import build_optimizer

    dims = ParallelDims(tp=tp, pp=1, dp=DP, zero_stage=stage, world_size=tp * DP).validate()
    groups = init_distributed(dims)
    if tp > 1:
        model_parallel_seed(0, tp_rank=groups.tp_rank)
    mine = slice(groups.dp_rank * B_LOCAL, (groups.dp_rank + 1) * B_LOCAL)
    cfg = si.train_config()
    data = _data(B_LOCAL * DP, num_windows)
    probe_seg = si.rows(data[0], mine)[0]
    results = {}
    for kind, mode in CASES:
        model = _model(kind)  # the plain model from the seed, cut into this rank's TP shard
        if tp > 1:
            parallelize(model, groups=groups)

        def probe(m, seg=probe_seg):
            return m.step(seg[0], m.init_state(B_LOCAL), targets_BT=seg[1], reset_B=seg[2])

        engine = build_engine(
            model,
            build_optimizer(model, cfg.train),
            cfg,
            dims,
            groups=groups,
            probe=probe,
            zero3_persist_below=0,
        )
        state = engine.model.init_state(B_LOCAL)
        losses, norms = [], []
        for segs in data:
            local = si.rows(segs, mine)
            scale = engine.global_token_scale(si.num_targets(local))
            loss_sum, state = si.run_window(
                engine.model, engine.backward, local, state, mode=mode, scale=scale
            )
            norms.append(engine.step())
            totals = torch.tensor([loss_sum, float(si.num_targets(local))], dtype=torch.float64)
            dist.all_reduce(totals, group=groups.dp)
            losses.append((totals[0] / totals[1]).item())
        results[(kind, mode)] = (losses, norms)
    if tp > 1:
        destroy_distributed()
        return results
    # memscale's own window code (memscale/train/bptt.py: loss.backward(), autograd.backward with several roots),
    # unchanged, through engine.model: DeepSpeed's hooks on the engine's outputs take plain backward calls too.
    from memscale.train.bptt import run_window

    for mode in BPTT_MODES:
        model = _model("rmt")
        engine = build_engine(
            model, build_optimizer(model, cfg.train), cfg, dims, groups=groups, zero3_persist_below=0
        )
        state, losses = engine.model.init_state(B_LOCAL), []
        for batches in _batches(B_LOCAL * DP, mine):
            n = sum(b.num_targets for b in batches)
            r = run_window(
                engine.model, batches, state, memory_grad=mode, loss_scale=engine.global_token_scale(n) * n
            )
            state = r.state
            engine.step()
            totals = torch.tensor([r.loss_sum, float(r.num_targets)], dtype=torch.float64)
            dist.all_reduce(totals, group=groups.dp)
            losses.append((totals[0] / totals[1]).item())
        results[("bptt", mode)] = losses
    destroy_distributed()
    return results


@pytest.mark.parametrize(
    "stage", [3, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)]
)
def test_memory_kinds_under_zero(stage):
    out = run_distributed(_worker, DP, stage, timeout=400)
    for kind, mode in CASES:
        ref_losses, ref_norms = _reference(kind, mode)
        for rank_results in out:
            losses, norms = rank_results[(kind, mode)]
            assert losses == pytest.approx(ref_losses, rel=RTOL), (kind, mode)
            assert norms == pytest.approx(ref_norms, rel=RTOL), (kind, mode)
    for mode in BPTT_MODES:
        ref = _bptt_reference(mode)
        for rank_results in out:
            assert rank_results[("bptt", mode)] == pytest.approx(ref, rel=RTOL), mode


@pytest.mark.parametrize(
    "stage", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)]
)
def test_memory_kinds_under_tp2_x_dp2_zero(stage):
    """tp=2 x dp=2 (4 processes): every kind's plain model cut by `parallelize` and wrapped in the ZeRO engine, 5
    optimizer steps against one process on the whole batch: the same losses and gradient norms (DeepSpeed counts
    a replicated parameter's gradient once, on TP rank 0, through the mpu adapter). Tolerance as above, plus the
    TP partial sums in another order (measured in test_parallel_zero_tp.py: 1.1e-7)."""
    out = run_distributed(_worker, 2 * DP, stage, 2, 5, timeout=600)
    for kind, mode in CASES:
        ref_losses, ref_norms = _reference(kind, mode, 5)
        for rank_results in out:
            losses, norms = rank_results[(kind, mode)]
            assert losses == pytest.approx(ref_losses, rel=RTOL), (kind, mode)
            assert norms == pytest.approx(ref_norms, rel=RTOL), (kind, mode)
