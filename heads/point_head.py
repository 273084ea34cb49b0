"""PointRend's StandardPointHead: a shared MLP (Conv1d, kernel 1) over point features.

Dimension-free: it sees (N, C, P) point features, whatever the number of spatial axes of the maps
they were sampled from (docs/pointrend.md §6).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class StandardPointHead(nn.Module):
    """Shared MLP on [fine features ; coarse logits] at each point.

    Args:
        fine_channels: C_f, channels of the concatenated fine-grained features.
        num_classes: K (coarse logit channels in, point logit channels out).
        num_fc: number of hidden layers (detectron2 NUM_FC=3).
        fc_dim: hidden width (FC_DIM=256).
        coarse_pred_each_layer: concatenate the K coarse logits again before every later layer.
            Off by default, as in detectron2's semantic configs ("much more stable, no NaNs").
    """

    def __init__(self, fine_channels: int, num_classes: int, num_fc: int = 3, fc_dim: int = 256,
                 coarse_pred_each_layer: bool = False) -> None:
        super().__init__()
        self.coarse_pred_each_layer = coarse_pred_each_layer
        extra = num_classes if coarse_pred_each_layer else 0
        widths = [fine_channels + num_classes] + [fc_dim + extra] * num_fc
        self.fcs = nn.ModuleList(nn.Conv1d(widths[i], fc_dim, 1) for i in range(num_fc))
        self.predictor = nn.Conv1d(widths[-1], num_classes, 1)
        for layer in self.fcs:  # c2_msra_fill
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """Point logits.

        Args:
            fine: (N, C_f, P) fine-grained features at the points.
            coarse: (N, K, P) coarse logits at the points.

        Returns:
            (N, K, P) logits (no softmax).
        """
        x = torch.cat([fine, coarse], dim=1)
        for layer in self.fcs:
            x = torch.relu(layer(x))
            if self.coarse_pred_each_layer:
                x = torch.cat([x, coarse], dim=1)
        return self.predictor(x)
