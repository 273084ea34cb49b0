"""Segmentation losses with an ignore label, finite when every target is ignored."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from seg.ops import resize
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


def deep_supervision_weights(count: int) -> list[float]:
    """Weights of the main and ``count`` auxiliary outputs: 1, 1/2, 1/4, ... normalised to sum 1
    (count 2: 4/7, 2/7, 1/7).

    nnU-Net halves its weights the same way, but over every decoder output, and gives the
    lowest-resolution one weight 0; here every output counted is weighted.
    """
    raw = [0.5 ** i for i in range(count + 1)]
    return [w / math.fsum(raw) for w in raw]


def ce_dice_losses(outputs: Sequence[torch.Tensor], labels: torch.Tensor,
                   weights: Sequence[float] | None = None, ignore_index: int = IGNORE_INDEX
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted cross-entropy and soft Dice over a main output and deep-supervision outputs.

    The main output (first) is upsampled (bi/trilinear) to the label size; each further output is
    compared with the labels nearest-resampled to its own grid, as nnU-Net does.  Outputs with
    weight 0 are skipped.

    Args:
        outputs: logits (N, K, *S_i), the main one first.
        labels: (N, *S) int64, ``ignore_index`` ignored.
        weights: one per output; default ``deep_supervision_weights(len(outputs) - 1)``.

    Returns:
        (cross-entropy, Dice loss), each the weighted sum.
    """
    weights = deep_supervision_weights(len(outputs) - 1) if weights is None else list(weights)
    ce = dice = outputs[0].new_zeros(())
    for i, (w, logits) in enumerate(zip(weights, outputs)):
        if w == 0:
            continue
        if i == 0:
            logits, target = resize(logits, labels.shape[1:], mode="linear"), labels
        else:
            target = resize(labels.unsqueeze(1).float(), logits.shape[2:], mode="nearest")
            target = target[:, 0].round().long()
        ce = ce + w * masked_cross_entropy(logits, target, ignore_index)
        dice = dice + w * soft_dice_loss(logits, target, ignore_index)
    return ce, dice
