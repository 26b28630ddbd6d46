"""One segment step of input for all streams of a rank.

Legend: B streams (rows), T segment tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100  # the target value that the loss skips (padding after a document's end)


@dataclass
class Batch:
    tokens_BT: Tensor
    """int64 input ids; padded positions hold the pad id."""
    targets_BT: Tensor
    """int64 next-token targets; IGNORE_INDEX where there is nothing to predict (padding, dry streams)."""
    reset_B: Tensor
    """bool: this row starts a new document at this segment (its memory must be reset first)."""
    doc_pos_B: Tensor
    """int64: position in its document of the row's first token (for perplexity by position)."""

    @property
    def num_targets(self) -> int:
        return int((self.targets_BT != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.tokens_BT, self.targets_BT, self.reset_B, self.doc_pos_B)))
