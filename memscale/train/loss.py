"""The language-model loss of a segment, outside the model: the single-process step and a last pipeline stage
call the same function with the final hidden states and the output projection.

Legend: B batch, T segment tokens, N scored tokens, D width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memscale.data.batch import IGNORE_INDEX
from memscale.kernels.cross_entropy import fused_linear_cross_entropy


@dataclass
class TokenLoss:
    loss_sum: Tensor | None
    """Sum of the token cross-entropies over targets != IGNORE_INDEX (divide by `num_targets`)."""
    num_targets: int
    logits_BTV: Tensor | None = None


def token_loss(
    h_BTD: Tensor,
    head: nn.Linear,
    targets_BT: Tensor | None,
    *,
    fused: bool,
    return_logits: bool,
) -> TokenLoss:
    """Cross-entropy of the head's logits against `targets_BT` (summed), and the logits if asked for.

    With `fused` and no logits wanted, while gradients are recorded, the projection and the cross-entropy run
    chunked (memscale/kernels/cross_entropy.py) and keep no logits for backward; otherwise the plain head and
    `F.cross_entropy`, the reference.
    """
    if targets_BT is not None and not return_logits and fused and torch.is_grad_enabled():
        h_ND, y_N = h_BTD.flatten(0, 1), targets_BT.flatten()
        scored_N = y_N != IGNORE_INDEX
        num_targets = int(scored_N.sum())
        if num_targets < len(y_N):  # project only the scored rows (sparse targets: tasks, probes)
            idx = scored_N.nonzero().squeeze(1)
            h_ND, y_N = h_ND[idx], y_N[idx]
        return TokenLoss(fused_linear_cross_entropy(h_ND, head.weight, y_N), num_targets)
    if targets_BT is not None:
        logits = head(h_BTD)
        loss_sum = F.cross_entropy(
            logits.flatten(0, 1).float(), targets_BT.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        num_targets = int((targets_BT != IGNORE_INDEX).sum())
        return TokenLoss(loss_sum, num_targets, logits if return_logits else None)
    return TokenLoss(None, 0, head(h_BTD) if return_logits else None)
