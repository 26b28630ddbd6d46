"""Recall accuracy by distance: how far back can a model retrieve a fact (memscale/data/recall.py)?

Each row streams one probe document segment by segment with its memory carried, exactly as in training. At every
requested distance d (a multiple of the segment length) the segment that ends at token d is run twice from the
same memory: once with its question appended (a branch that is scored and dropped) and once as plain text (which
carries the memory on). One pass over the longest document thus scores every shorter distance, at the cost of one
extra segment per distance, and the score at distance d equals that of a document of exactly d tokens (the same
example drawn at a shorter length; `tests/test_recall.py` checks it).

Only the value positions are projected onto the vocabulary (two rows per example, not the whole segment).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from memscale.data.recall import VALUE_LEN, RecallExamples


@dataclass
class RecallAccuracy:
    distance: int
    """Document length in tokens: the fact sits in the first segment, the question ends the document."""
    accuracy: float
    """Fraction of value tokens predicted right (argmax)."""
    exact_match: float
    """Fraction of examples with the whole value right."""
    num_examples: int
    chance: float
    value_logits: torch.Tensor | None = None
    """[num_examples, VALUE_LEN, vocab] logits at the value positions, when asked for (`keep_logits`)."""


def parse_distances(text: str, segment_len: int, *, flag: str = "--distances") -> list[int]:
    """Comma-separated token counts from the command line, checked (ConfigError names the flag)."""
    from memscale.config import ConfigError

    try:
        distances = [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise ConfigError(
            f"{flag} {text}: give comma-separated token counts, e.g. 4096,65536,1048576"
        ) from None
    return check_distances(distances, segment_len)


def check_distances(distances: list[int], segment_len: int) -> list[int]:
    from memscale.config import ConfigError

    bad = [d for d in distances if d <= 0 or d % segment_len]
    if bad or not distances:
        raise ConfigError(
            f"recall distances {bad or distances} must be positive multiples of data.segment_len={segment_len}"
        )
    return sorted(set(distances))


@torch.no_grad()
def evaluate_recall(
    model: nn.Module,
    examples: RecallExamples,
    *,
    distances: list[int],
    num_examples: int,
    num_streams: int,
    keep_logits: bool = False,
    log=None,
) -> list[RecallAccuracy]:
    """Accuracy at each distance over examples 0 .. num_examples - 1 (rounded up to whole groups of rows)."""
    T = examples.segment_len
    distances = check_distances(distances, T)
    ask_at = {d // T - 1: d for d in distances}  # segment index -> distance it completes
    last = max(ask_at)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits = {d: torch.zeros(VALUE_LEN, dtype=torch.int64) for d in distances}
    exact = dict.fromkeys(distances, 0)
    kept: dict[int, list[torch.Tensor]] = {d: [] for d in distances}
    seen = 0
    t0, total = time.perf_counter(), math.ceil(num_examples / num_streams) * (last + 1 + len(distances))
    done = 0
    try:
        for first in range(0, num_examples, num_streams):
            draws = [examples.draw(first + r) for r in range(num_streams)]
            state = model.init_state(num_streams)
            for k in range(last + 1):
                tokens = examples.filler(draws, k * T, T)
                if k in ask_at:
                    asked = tokens.copy()
                    targets = torch.from_numpy(examples.ask(draws, asked))
                    out = model.step(torch.from_numpy(asked).to(device), state, return_logits=False)
                    pos = slice(T - VALUE_LEN - 1, T - 1)
                    logits = model.head(out.hidden_BTD[:, pos]).float().cpu()
                    if keep_logits:
                        kept[ask_at[k]].append(logits)
                    pred = logits.argmax(-1)
                    right = pred == targets[:, pos]
                    hits[ask_at[k]] += right.sum(0)
                    exact[ask_at[k]] += int(right.all(1).sum())
                    done += 1
                    if log is not None:
                        n = seen + num_streams
                        log(
                            f"    recall at {ask_at[k]:,} tokens: exact match {exact[ask_at[k]] / n:.3f} over "
                            f"{n} documents so far ({time.perf_counter() - t0:.0f}s)"
                        )
                if k < last:
                    state = model.step(torch.from_numpy(tokens).to(device), state, return_logits=False).state
                done += 1
                if log is not None and (k + 1) % 256 == 0:
                    rate = done / (time.perf_counter() - t0)
                    log(
                        f"    recall: examples {first}-{first + num_streams - 1}, token {(k + 1) * T:,} of "
                        f"{(last + 1) * T:,} | eta {(total - done) / rate:.0f}s"
                    )
            seen += num_streams
    finally:
        model.train(was_training)
    return [
        RecallAccuracy(
            distance=d,
            accuracy=float(hits[d].sum()) / (seen * VALUE_LEN),
            exact_match=exact[d] / seen,
            num_examples=seen,
            chance=1.0 / len(examples.text.values),
            value_logits=torch.cat(kept[d]) if keep_logits else None,
        )
        for d in distances
    ]
