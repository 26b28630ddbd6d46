"""Small builders shared by tests."""

from __future__ import annotations

import torch

from memscale.config import config_from_dict
from memscale.data.batch import IGNORE_INDEX, Batch
from memscale.models import MemoryTransformer

TINY = [
    "model.d_model=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.vocab_size=50",
    "data.segment_len=8",
    "data.num_streams=2",
]


def tiny_model(kind: str = "rmt", *extra: str, seed: int = 0) -> MemoryTransformer:
    cfg = config_from_dict({}, [*TINY, f"model.memory.kind={kind}", "model.memory.num_tokens=4", *extra])
    torch.manual_seed(seed)
    return MemoryTransformer(cfg.model, segment_len=cfg.data.segment_len)


def random_batches(
    n: int,
    *,
    B: int = 2,
    T: int = 8,
    vocab: int = 50,
    seed: int = 0,
    targets_on: set[int] | None = None,
    reset_at: dict[int, list[int]] | None = None,
) -> list[Batch]:
    """n segment batches of random tokens; targets only on segments in `targets_on` (all when None)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n):
        tokens = torch.randint(0, vocab, (B, T), generator=g)
        targets = torch.randint(0, vocab, (B, T), generator=g)
        if targets_on is not None and t not in targets_on:
            targets.fill_(IGNORE_INDEX)
        reset = torch.zeros(B, dtype=torch.bool)
        for row in (reset_at or {}).get(t, []):
            reset[row] = True
        out.append(Batch(tokens, targets, reset, torch.full((B,), t * T)))
    return out
