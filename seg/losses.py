"""Segmentation losses with an ignore label, finite when every target is ignored."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from seg.pointrend import IGNORE_INDEX


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy over non-ignored targets; 0 (with a graph) when all are ignored.

    PyTorch's mean reduction divides by the number of valid targets and returns NaN when it is 0
    (docs/pointrend.md §3); this divides by max(count, 1) instead.

    Args:
        logits: (N, K, *S) or point logits (N, K, P).
        labels: (N, *S) / (N, P) int64.
    """
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum().clamp_min(1)
    return total / count


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of the soft Dice of softmax(logits) and one-hot labels.

    Ignored cells are removed from both prediction and target.  Sums run over the batch and all
    cells (a "batch Dice"), so a class absent from one patch does not dominate; a class absent from
    target and prediction scores 1.  All cells ignored -> loss 0.

    Args:
        logits: (N, K, *S).
        labels: (N, *S) int64, values in [0, K) or ``ignore_index``.
    """
    k = logits.shape[1]
    valid = labels != ignore_index
    probs = logits.softmax(dim=1) * valid.unsqueeze(1)
    onehot = F.one_hot(labels.where(valid, 0), k).movedim(-1, 1).to(probs.dtype)
    onehot = onehot * valid.unsqueeze(1)
    dims = [0] + list(range(2, logits.ndim))
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    return 1 - dice.mean()
