"""Sliding BPTT depth k: the loss of every segment t reaches segments t-1, ..., t-k through the memory, and no
further, across optimizer steps (memscale/train/bptt.py, `_run_sliding`)."""

import pytest
import torch

from memscale.train.bptt import History, run_window
from tests.helpers import random_batches, tiny_model
from tests.test_bptt import _SavedBytes

KINDS = ["rmt", "memformer", "armt"]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _per_loss_reference(model, history, state, batches, depth):
    """The definition, one graph per loss: for each new segment t, run every segment from the history's start
    (or `state`) with the state detached before segment t - depth, and backpropagate loss_t alone. O(n^2)
    forwards; gradients accumulate into `.grad`."""
    segs = [r.batch for r in history.records] + batches
    h, total = len(history), sum(b.num_targets for b in batches)
    start = history.state if h else state
    loss = 0.0
    for t in range(h, len(segs)):
        s = start.detach()
        for i in range(t + 1):
            if i == t - depth:
                s = s.detach()
            b = segs[i]
            out = model.step(
                b.tokens_BT,
                s,
                targets_BT=b.targets_BT if i == t else None,
                reset_B=b.reset_B,
                return_logits=False,
            )
            s = out.state
        # The segment's objective, auxiliary term included (armt's write penalty).
        objective = out.loss_sum if out.aux_sum is None else out.loss_sum + out.aux_sum
        (objective / total).backward()
        loss += out.loss_sum.item()
    return loss


@pytest.mark.parametrize("mode", ["truncated", "replay"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("depth", [1, 3])
def test_sliding_equals_one_graph_per_loss(kind, mode, depth):
    """Two steps (2 then 4 segments, a document reset in one row): the second step's gradients equal the per-loss
    definition above, run from the history the first step left.

    Tolerance 1e-6 absolute (fp32, gradients ~1e-2): the same segment computations, summed into `.grad` in
    another order (all ages of a segment at once here, loss by loss there). The reference at depth - 1 and
    depth + 1 is checked to differ by more, so the comparison can tell the depths apart."""
    batches = random_batches(6, reset_at={3: [1]})
    model = _model(kind, seed=3)
    first = run_window(model, batches[:2], model.init_state(2), memory_grad=mode, depth=depth)
    assert len(first.history) == min(depth, 2)
    model.zero_grad()
    second = run_window(model, batches[2:], first.state, memory_grad=mode, depth=depth, history=first.history)
    assert len(second.history) == depth
    got = _grads(model)
    assert any(n.startswith("memory.") for n in got)
    for d in (depth, depth - 1, depth + 1):
        model.zero_grad()
        loss = _per_loss_reference(model, first.history, first.state, batches[2:], d)
        want = _grads(model)
        diff = max((got.get(n, 0) - want.get(n, 0)).abs().max().item() for n in got.keys() | want.keys())
        if d == depth:
            assert got.keys() == want.keys()
            assert diff <= 1e-6, diff
            assert second.loss_sum == pytest.approx(loss, rel=1e-6)
        else:
            assert diff > 1e-5, (d, diff)


def _model(kind, seed, *extra):
    """A tiny model whose memory carries gradient from the first step: armt's W_V starts at zero (official
    initialisation), which makes its first writes, and so d(later loss)/d(earlier tokens), exactly zero."""
    model = tiny_model(kind, *extra, seed=seed)
    for name, p in model.named_parameters():
        if name.endswith("memory.value.weight"):
            torch.nn.init.normal_(p.data, std=0.02)
    return model


def _segment_reach(kind, mode, depth, *, target, n_steps, per_step, reset_at):
    """Train `n_steps` steps of `per_step` segments (SGD between steps, the history carried), with targets on
    segment `target` only; the gradient that reached each segment's token embeddings, per [segment, row], summed
    over every run of that segment (a segment runs again in later steps as history)."""
    num = n_steps * per_step
    batches = random_batches(num, targets_on={target}, reset_at=reset_at)
    # The token loss alone: armt's write penalty is a term of every segment, on its own gates.
    model = _model(kind, 1, *(["model.memory.write_penalty=0"] if kind == "armt" else []))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reach = torch.zeros(num, 2, dtype=torch.float64)
    captured = []

    def hook(_module, inp, out):
        if out.requires_grad:
            out.retain_grad()
            captured.append((inp[0], out))

    handle = model.embed.register_forward_hook(hook)
    state, history = model.init_state(2), History()
    for s in range(n_steps):
        opt.zero_grad()
        step = batches[s * per_step : (s + 1) * per_step]
        r = run_window(model, step, state, memory_grad=mode, depth=depth, history=history)
        state, history = r.state, r.history
        for tokens, emb in captured:
            seg = next(i for i, b in enumerate(batches) if torch.equal(b.tokens_BT, tokens))
            if emb.grad is not None:
                reach[seg] += emb.grad.abs().double().flatten(1).sum(1)
        captured.clear()
        opt.step()
    handle.remove()
    return reach


@pytest.mark.parametrize("mode", ["truncated", "replay"])
@pytest.mark.parametrize("kind", KINDS)
def test_loss_of_every_segment_reaches_exactly_k_back(kind, mode):
    """Sliding depth 2 over 4 steps of 2 segments: for every target segment t (the first ones, with fewer than 2
    before them, included), the gradient reaches segments max(t - 2, 0) .. t and is exactly zero before; the
    step boundary does not cut it. Row 1 starts a new document at segment 5: its gradient from t >= 5 stops at 5."""
    depth, reset = 2, 5
    for t in range(8):
        reach = _segment_reach(kind, mode, depth, target=t, n_steps=4, per_step=2, reset_at={reset: [1]})
        for row in (0, 1):
            lo = max(t - depth, 0)
            if row == 1 and t >= reset:
                lo = max(lo, reset)
            for seg in range(8):
                g = reach[seg, row].item()
                if lo <= seg <= t:
                    assert g > 0, (t, row, seg, reach)
                else:
                    assert g == 0, (t, row, seg, reach)


@pytest.mark.parametrize("kind", KINDS)
def test_replay_equals_truncated_with_dropout(kind):
    """Sliding depth 2 over three steps with dropout: replay reruns every segment (history ones too) with the RNG
    state it first ran with, so its gradients equal the mode that keeps every graph (1e-6: summation order), the
    ambient RNG ends where it does, and the memory carried on is the same."""
    batches = random_batches(6, reset_at={2: [0]})
    results = {}
    for mode in ("truncated", "replay"):
        model = tiny_model(kind, "model.dropout=0.1", seed=3)
        model.train()
        torch.manual_seed(7)
        state, history, grads = model.init_state(2), History(), []
        for s in range(3):
            model.zero_grad()
            r = run_window(
                model, batches[2 * s : 2 * s + 2], state, memory_grad=mode, depth=2, history=history
            )
            state, history = r.state, r.history
            grads.append(_grads(model))
        results[mode] = (grads, state, torch.get_rng_state())
    (gt, st, rng_t), (gr, sr, rng_r) = results["truncated"], results["replay"]
    for a, b in zip(gt, gr, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)
    for name in st:
        torch.testing.assert_close(sr[name], st[name], atol=1e-6, rtol=0)
    assert torch.equal(rng_t, rng_r)


def test_depth_0_is_detached():
    batches = random_batches(4)
    grads = {}
    for mode, depth in (("detached", None), ("replay", 0), ("truncated", 0)):
        model = tiny_model("rmt", seed=3)
        r = run_window(model, batches, model.init_state(2), memory_grad=mode, depth=depth)
        grads[(mode, depth)] = _grads(model)
        assert depth is None or len(r.history) == 0
    ref = grads[("detached", None)]
    for key, g in grads.items():
        for name in ref:
            torch.testing.assert_close(g[name], ref[name], atol=1e-7, rtol=0, msg=f"{key} {name}")


@pytest.mark.parametrize("mode", ["truncated", "replay"])
def test_history_rerun_reproduces_the_memory(mode):
    """Weights unchanged between steps, dropout on: rerunning the history (with its RNG states, without targets)
    gives the same memory as the first run, so two sliding steps carry the memory a plain forward carries, and
    report the same losses (1e-6: forward with and without a graph)."""
    batches = random_batches(4, reset_at={1: [1]})
    model = tiny_model("memformer", "model.dropout=0.1", seed=3)
    torch.manual_seed(5)
    state, history, losses = model.init_state(2), History(), []
    for s in range(2):
        r = run_window(model, batches[2 * s : 2 * s + 2], state, memory_grad=mode, depth=3, history=history)
        state, history = r.state, r.history
        losses.append(r.loss_sum)
    torch.manual_seed(5)
    plain, plain_losses = model.init_state(2), []
    with torch.no_grad():
        for s in range(2):
            r = run_window(model, batches[2 * s : 2 * s + 2], plain, memory_grad="detached")
            plain = r.state
            plain_losses.append(r.loss_sum)
    assert losses == pytest.approx(plain_losses, rel=1e-6)
    for name in plain:
        torch.testing.assert_close(state[name], plain[name], atol=1e-6, rtol=0, msg=name)


def test_history_checkpoint_round_trip():
    batches = random_batches(3)
    model = tiny_model("rmt", "model.dropout=0.1", seed=3)
    r = run_window(model, batches, model.init_state(2), memory_grad="replay", depth=2)
    sd = r.history.state_dict()
    back = History.from_state_dict(sd, device=torch.device("cpu"))
    assert len(back) == 2 and back.state_dict().keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(back.state_dict()[k], v), k
    assert History().state_dict() == {} and len(History.from_state_dict({}, device=torch.device("cpu"))) == 0


class _SavedBytesDetached(_SavedBytes):
    """`_SavedBytes`, keeping a detached alias of each saved tensor: a holder that kept the tensor itself would
    keep its graph node alive through the node's own saved variable (a cycle Python cannot see), and a graph that
    a pass with retain_graph did not free would then look alive after it is gone."""

    def pack(self, t):
        return super().pack(t.detach())


def _peak_saved_bytes_of_second_step(mode, depth, kind):
    model = tiny_model(kind, seed=0)
    batches = random_batches(12)
    first = run_window(model, batches[:6], model.init_state(2), memory_grad=mode, depth=depth)
    meter = _SavedBytesDetached()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        run_window(model, batches[6:8], first.state, memory_grad=mode, depth=depth, history=first.history)
    return meter.peak


@pytest.mark.parametrize("kind", KINDS)
def test_replay_saved_bytes_do_not_grow_with_depth(kind):
    """replay holds one segment's graph at a time whatever the depth; truncated holds all depth + n graphs."""
    replay = [_peak_saved_bytes_of_second_step("replay", d, kind) for d in (1, 6)]
    truncated = [_peak_saved_bytes_of_second_step("truncated", d, kind) for d in (1, 6)]
    assert replay[1] == replay[0], replay
    assert truncated[1] > 2 * truncated[0], truncated
