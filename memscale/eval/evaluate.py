"""Held-out evaluation: perplexity of a model streamed segment by segment with its memory carried."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from memscale.models import IGNORE_INDEX, MemoryTransformer


@dataclass
class EvalResult:
    loss: float
    ppl: float
    num_tokens: int
    num_segments: int
    unigram_ppl: float | None = None
    """Perplexity of the train-split unigram distribution on the same tokens (a floor any LM must beat)."""
    by_position: dict[str, tuple[float, int]] = field(default_factory=dict)
    """Bucket label -> (mean loss, tokens), by position of the token in its document."""


@torch.no_grad()
def evaluate_lm(
    model: MemoryTransformer,
    loader,
    *,
    num_segments: int | None,
    num_streams: int,
    device: torch.device | str = "cpu",
    unigram_logp=None,
    buckets: tuple[int, ...] = (),
) -> EvalResult:
    """Stream `loader` for up to `num_segments` segment steps (all when None) with memory carried.

    `unigram_logp` (V float tensor of log-probabilities), when given, scores the same targets with a unigram
    model for the baseline. `buckets` are document-position boundaries (tokens) for a
    per-position breakdown, e.g. (4096, 32768) -> "0-4096", "4096-32768", "32768+".
    """
    was_training = model.training
    model.eval()
    state = model.init_state(num_streams, device=device)
    if unigram_logp is not None:
        unigram_logp = unigram_logp.to(device)  # once, not per segment
    total_loss, total_tokens, uni_loss, steps = 0.0, 0, 0.0, 0
    edges = (0, *buckets, math.inf)
    pos_loss = torch.zeros(len(edges) - 1, dtype=torch.float64)
    pos_count = torch.zeros(len(edges) - 1, dtype=torch.float64)
    for batch in loader:
        if num_segments is not None and steps >= num_segments:
            break
        batch = batch.to(device)
        # No targets here: the per-token loss below is the only cross-entropy computed (the step's summed loss
        # would be a second pass over the logits).
        out = model.step(batch.tokens_BT, state, reset_B=batch.reset_B)
        state = out.state
        steps += 1
        mask = batch.targets_BT != IGNORE_INDEX
        if not mask.any():
            continue
        tok_loss = torch.nn.functional.cross_entropy(
            out.logits_BTV.flatten(0, 1).float(),
            batch.targets_BT.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view_as(batch.targets_BT)
        total_loss += tok_loss[mask].sum().item()
        total_tokens += int(mask.sum())
        if unigram_logp is not None:
            uni_loss -= unigram_logp[batch.targets_BT[mask]].sum().item()
        if buckets:
            T = batch.tokens_BT.shape[1]
            pos = batch.doc_pos_B[:, None] + torch.arange(T, device=device)[None, :]
            idx = torch.bucketize(
                pos[mask].double().cpu(), torch.tensor(edges[1:-1], dtype=torch.float64), right=True
            )
            pos_loss.index_add_(0, idx, tok_loss[mask].double().cpu())
            pos_count.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
    if was_training:
        model.train()
    loss = total_loss / max(total_tokens, 1)
    by_position = {}
    for i in range(len(edges) - 1):
        label = f"{edges[i]}-{edges[i + 1]}" if edges[i + 1] != math.inf else f"{edges[i]}+"
        if pos_count[i] > 0:
            by_position[label] = ((pos_loss[i] / pos_count[i]).item(), int(pos_count[i]))
    return EvalResult(
        loss=loss,
        ppl=math.exp(min(loss, 50.0)),
        num_tokens=total_tokens,
        num_segments=steps,
        unigram_ppl=math.exp(uni_loss / total_tokens) if unigram_logp is not None and total_tokens else None,
        by_position=by_position,
    )
