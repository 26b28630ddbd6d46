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
from memscale.kernels.cross_entropy import (
    fused_linear_cross_entropy,
    vocab_parallel_fused_linear_cross_entropy,
)


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
    `F.cross_entropy`, the reference. A vocab-parallel head (memscale/parallel/tensor.py, `head.tp_group`) gets
    the vocab-parallel loss.
    """
    if getattr(head, "tp_group", None) is not None:
        return _vocab_parallel_token_loss(h_BTD, head, targets_BT, fused=fused, return_logits=return_logits)
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


def _vocab_parallel_token_loss(
    h_BTD: Tensor, head: nn.Module, targets_BT: Tensor | None, *, fused: bool, return_logits: bool
) -> TokenLoss:
    """Under tensor parallelism: `head` holds the vocabulary rows [head.vocab_start, + V / tp) and `h_BTD` is
    replicated over `head.tp_group`. The loss is vocab-parallel and equal on every rank: the chunked fused kernel
    when `fused` or without a graph (a replayed segment's forward), otherwise the plain formula by autograd on the
    local logits (the reference; tests compare both with megatron-core's `vocab_parallel_cross_entropy`).
    Logits, when asked for, are gathered whole (evaluation)."""
    logits = head(h_BTD) if return_logits else None
    if targets_BT is None:
        return TokenLoss(None, 0, logits)
    h_ND, y_N = h_BTD.flatten(0, 1), targets_BT.flatten()
    scored_N = y_N != IGNORE_INDEX
    num_targets = int(scored_N.sum())
    if fused or not torch.is_grad_enabled():
        if num_targets < len(y_N):
            idx = scored_N.nonzero().squeeze(1)
            h_ND, y_N = h_ND[idx], y_N[idx]
        loss_sum = vocab_parallel_fused_linear_cross_entropy(
            h_ND, head.weight, y_N, vocab_start=head.vocab_start, group=head.tp_group
        )
        return TokenLoss(loss_sum, num_targets, logits)
    import torch.distributed as dist
    from megatron.core import tensor_parallel as mtp

    # The plain way, differentiable by autograd (the reference): local logits kept for backward.
    group, v, start = head.tp_group, head.weight.shape[0], head.vocab_start
    local_Nv = F.linear(mtp.copy_to_tensor_model_parallel_region(h_ND, group=group), head.weight).float()
    m_N1 = local_Nv.detach().amax(dim=-1, keepdim=True)
    dist.all_reduce(m_N1, op=dist.ReduceOp.MAX, group=group)
    sumexp_N = mtp.reduce_from_tensor_model_parallel_region((local_Nv - m_N1).exp().sum(dim=-1), group=group)
    in_shard_N = scored_N & (y_N >= start) & (y_N < start + v)
    picked_N = local_Nv.gather(1, torch.where(in_shard_N, y_N - start, 0)[:, None]).squeeze(1) * in_shard_N
    picked_N = mtp.reduce_from_tensor_model_parallel_region(picked_N, group=group)
    per_token_N = m_N1.squeeze(1) + sumexp_N.log() - picked_N
    return TokenLoss((per_token_N * scored_N).sum(), num_targets, logits)
