"""Answer accuracy on a synthetic memory task (memscale/data/synthetic.py).

The model streams each example segment by segment with its memory carried (and reset where `reset_B` says a new
example starts), exactly as in training; its argmax prediction is scored at every answer position
(targets != IGNORE_INDEX). Accuracy is only meaningful next to chance, so the result carries both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from memscale.data.batch import IGNORE_INDEX


@dataclass
class TaskAccuracy:
    accuracy: float
    """Fraction of answer tokens predicted right (argmax)."""
    num_answers: int
    chance: float
    """Accuracy of a guess uniform over the task's symbols (1 / data.task_vocab)."""
    exact_match: float
    """Fraction of examples with every answer right."""
    num_examples: int


@torch.no_grad()
def evaluate_task(model: nn.Module, loader, *, num_examples: int | None = None) -> TaskAccuracy:
    """Score `loader` (a finite TaskLoader) over its first `num_examples` examples (all when None).

    Examples come in aligned groups of one per row, so the count is rounded up to whole groups. Exact match
    assumes an example's answers all sit in one segment, as they do in every task here (the last one).
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    state = None
    started = correct = answers = exact = answered_rows = 0
    try:
        for batch in loader:
            B = batch.tokens_BT.shape[0]
            if batch.reset_B.all():
                if num_examples is not None and started >= num_examples:
                    break
                started += B
            if state is None:
                state = model.init_state(B)
            batch = batch.to(device)
            out = model.step(batch.tokens_BT, state, reset_B=batch.reset_B)
            state = out.state
            mask_BT = batch.targets_BT != IGNORE_INDEX
            hit_BT = (out.logits_BTV.argmax(-1) == batch.targets_BT) & mask_BT
            correct += int(hit_BT.sum())
            answers += int(mask_BT.sum())
            rows_B = mask_BT.any(1)
            exact += int(((hit_BT | ~mask_BT).all(1) & rows_B).sum())
            answered_rows += int(rows_B.sum())
    finally:
        model.train(was_training)
    return TaskAccuracy(
        accuracy=correct / max(answers, 1),
        num_answers=answers,
        chance=loader.chance,
        exact_match=exact / max(answered_rows, 1),
        num_examples=answered_rows,
    )
