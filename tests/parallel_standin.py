"""A tiny memory model with the parameter patterns of memscale's kinds, and BPTT windows over it.

The patterns that ZeRO-3 does not see by itself:
- `memory.mem_init` (like rmt's memory tokens, memformer's bias, `init_state`): expanded in plain Python by
  `init_state`, outside any forward, and used by the decoder's `step` (not by its owner's forward) to reset rows;
- `embed.weight` used by the decoder's `step` as the tied head (`F.linear(h, embed.weight)`), outside `embed`'s forward;
- `step` is a method, not `forward`: nothing of the decoder itself runs inside a module forward;
- with `cached_head=True`, the tied head weight is reached through a Python list rather than the module attribute.
The memory carries gradient from one segment to the next (like rmt/memformer), so the three memory_grad modes differ.

The window functions mirror memscale/train/bptt.py (detached: one backward per segment; truncated: one backward;
replay: no-grad forward, then one backward per segment with two roots: the loss and the output state) and take the
backward function as an argument: torch.autograd.backward for the reference, ZeroEngine.backward under DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memscale.models.memory.base import MemoryState

V, D, M = 32, 16, 4
IGNORE = -100


@dataclass
class StandInOutput:
    loss_sum: torch.Tensor
    state: MemoryState


class Memory(nn.Module):
    def __init__(self):
        super().__init__()
        self.mem_init = nn.Parameter(torch.randn(M, D) * 0.5)
        self.write = nn.Linear(D, D)

    def forward(self, mem_BMD: torch.Tensor, h_BTD: torch.Tensor) -> torch.Tensor:
        att_BMT = torch.softmax(mem_BMD @ h_BTD.transpose(1, 2) / D**0.5, dim=-1)
        return torch.tanh(self.write(mem_BMD + att_BMT @ h_BTD))


class StandIn(nn.Module):
    def __init__(self, *, cached_head: bool = False):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.memory = Memory()
        self.block = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.norm = nn.LayerNorm(D)
        # The tied head reached through a plain Python reference instead of the module attribute: DeepSpeed's
        # fetch-on-attribute-access (ZeROOrderedDict) cannot see this use; only registration gathers it.
        self._head = [self.embed.weight] if cached_head else None

    def init_state(self, batch_size: int) -> MemoryState:
        return MemoryState({"mem": self.memory.mem_init.unsqueeze(0).expand(batch_size, -1, -1)})

    def step(self, tokens_BT, state: MemoryState, *, targets_BT, reset_B) -> StandInOutput:
        init_BMD = self.memory.mem_init.unsqueeze(0).expand_as(state["mem"])
        mem_BMD = torch.where(reset_B[:, None, None], init_BMD, state["mem"])
        x_BTD = self.embed(tokens_BT) + mem_BMD.mean(1, keepdim=True)
        h_BTD = self.norm(x_BTD + self.block(x_BTD))
        new_mem = self.memory(mem_BMD, h_BTD)
        logits_BTV = F.linear(h_BTD, self._head[0] if self._head else self.embed.weight)
        loss_sum = F.cross_entropy(
            logits_BTV.flatten(0, 1), targets_BT.flatten(), reduction="sum", ignore_index=IGNORE
        )
        return StandInOutput(loss_sum=loss_sum, state=MemoryState({"mem": new_mem}))


def make_data(*, num_windows: int, k: int, B: int, T: int, seed: int = 0):
    """windows[w][t] = (tokens_BT, targets_BT, reset_B) for B global streams. Rows B/2.. get fewer targets, so the
    data-parallel ranks hold different token counts, and rows reset at different segments."""
    g = torch.Generator().manual_seed(seed)
    windows = []
    for w in range(num_windows):
        segs = []
        for t in range(k):
            tokens = torch.randint(0, V, (B, T), generator=g)
            targets = torch.randint(0, V, (B, T), generator=g)
            targets[B // 2 :, : (w + t) % T] = IGNORE
            reset = torch.zeros(B, dtype=torch.bool)
            reset[(w + t) % B] = (w * k + t) % 3 == 1
            segs.append((tokens, targets, reset))
        windows.append(segs)
    return windows


def rows(segs, sl: slice):
    return [(a[sl], b[sl], c[sl]) for a, b, c in segs]


def num_targets(segs) -> int:
    return sum(int((tgt != IGNORE).sum()) for _, tgt, _ in segs)


def _step(model, seg, state):
    tokens, targets, reset = seg
    return model.step(tokens, state, targets_BT=targets, reset_B=reset)


def run_window(model, backward, segs, state: MemoryState, *, mode: str, scale: float, rng: str = "all"):
    """Forward and backward over one window; returns (loss_sum, next state detached).

    replay recomputes each segment under the RNG streams it first ran with: `rng="all"` restores the default
    generator and megatron-core's tracker streams (memscale.parallel.random), `rng="cpu"` only the default generator
    (what bptt.py's own snapshot holds: not enough under TP, kept as the negative control).
    """
    if mode == "detached":
        loss_sum = 0.0
        for seg in segs:
            out = _step(model, seg, state.detach())
            backward([out.loss_sum * scale])
            loss_sum += out.loss_sum.item()
            state = out.state
        return loss_sum, state.detach()
    if mode == "truncated":
        state = state.detach()
        losses = []
        for seg in segs:
            out = _step(model, seg, state)
            losses.append(out.loss_sum)
            state = out.state
        loss = torch.stack(losses).sum()
        backward([loss * scale])
        return loss.item(), state.detach()
    if mode == "replay":
        from memscale.parallel.random import RNGSnapshot, replayed_rng, rng_snapshot

        states = [state.detach()]
        snaps = []
        loss_sum = 0.0
        with torch.no_grad():
            for seg in segs:
                snap = rng_snapshot()
                snaps.append(snap if rng == "all" else RNGSnapshot(cpu=snap.cpu, cuda=None, tracker={}))
                out = _step(model, seg, states[-1])
                loss_sum += out.loss_sum.item()
                states.append(out.state.detach())
        grad_out = None
        for t in range(len(segs) - 1, -1, -1):
            s_in = states[t].map(lambda x: x.detach().clone().requires_grad_(x.is_floating_point()))
            with replayed_rng(snaps[t]):
                out = _step(model, segs[t], s_in)
            roots, grads = [out.loss_sum * scale], [None]
            for name, g in (grad_out or {}).items():
                if out.state[name].requires_grad:
                    roots.append(out.state[name])
                    grads.append(g)
            backward(roots, grads)
            grad_out = {n: x.grad for n, x in s_in.items() if x.grad is not None}
        return loss_sum, states[-1]
    raise ValueError(mode)


def train_config(**overrides):
    from memscale.config import config_from_dict

    sets = [
        "train.lr=0.01",
        "train.min_lr=0.001",
        "train.warmup_steps=2",
        "train.max_steps=5",
        "train.grad_clip=0.5",
        "train.weight_decay=0.1",
        "data.num_streams=2",
    ]
    return config_from_dict({}, sets + [f"{k}={v}" for k, v in overrides.items()])


def reference_run(*, mode: str, num_windows: int = 5, k: int = 3, B: int = 4, T: int = 6):
    """One process, the whole batch: (global mean loss per step, pre-clip grad norm per step)."""
    from memscale.train.optim import apply_hyperparameters, build_optimizer

    cfg = train_config()
    torch.manual_seed(0)
    model = StandIn()
    opt = build_optimizer(model, cfg.train)
    state = model.init_state(B)
    losses, norms = [], []
    for step, segs in enumerate(make_data(num_windows=num_windows, k=k, B=B, T=T)):
        n = num_targets(segs)
        loss_sum, state = run_window(model, torch.autograd.backward, segs, state, mode=mode, scale=1.0 / n)
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip).item())
        # ZeRO keeps every parameter's gradient in a flat buffer, so a parameter that got no gradient this step
        # (detached: the memory write, whose output only the next, detached segment reads) is stepped with a zero
        # gradient, and weight decay applies to it; torch's AdamW skips a None gradient. The reference does as ZeRO.
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        apply_hyperparameters(opt, cfg.train, step=step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_sum / n)
    return losses, norms
