"""PointRend's light coarse mask head (detectron2 ConvFCHead, POINTREND.md §8.1), 2D and 3D.

Per region, the finest level is point-sampled on a regular ``pooler_resolution``^d grid of cell
centres (RoIAlign with sampling_ratio 1), reduced by a kernel-2 stride-2 conv to
``(pooler_resolution/2)``^d, flattened, passed through ``num_fc`` FC layers and predicted as
K x 7^d coarse logits.

The region is the whole input.  Per-object boxes (connected components at training time,
box-normalised point coordinates) are **not implemented** here: the model treats the K x 7^d
logits as covering the whole input, which is what PointRend's semantic subdivision needs.

3D width: 256 * 7^3 = 87808 FC inputs would give a 90M-parameter first FC layer, so
``conv_dim=None`` keeps the 2D reference FC input width 256 * 7^2 = 12544: conv_dim =
12544 // 7^d, i.e. 256 in 2D and 36 in 3D.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from seg import ops
from seg.pointrend import generate_regular_grid_point_coords, point_sample

from . import HEADS, FeatureInfo, nearest_level

_REFERENCE_FC_INPUT = 256 * 7 * 7


@HEADS.register("mask")
class CoarseMaskHead(nn.Module):
    """Coarse mask head on the whole input.

    Args:
        feature_info: backbone levels, fine to coarse.
        num_classes: K.
        spatial_dims: 2 or 3.
        in_feature: level name; default the level whose stride is closest to 4.
        pooler_resolution: side of the sampled grid (14); must be even.
        conv_dim: channels of the stride-2 conv (None: 12544 // 7^d, see module docstring).
        fc_dim, num_fc: FC trunk (1024, 2).
    """

    def __init__(self, feature_info: Sequence[FeatureInfo], num_classes: int, spatial_dims: int,
                 in_feature: str | None = None, pooler_resolution: int = 14,
                 conv_dim: int | None = None, fc_dim: int = 1024, num_fc: int = 2) -> None:
        super().__init__()
        if pooler_resolution % 2:
            raise ValueError(f"pooler_resolution must be even, got {pooler_resolution}")
        level = nearest_level(feature_info, 4) if in_feature is None else \
            next(f for f in feature_info if f.name == in_feature)
        self.in_feature, self.spatial_dims = level.name, spatial_dims
        self.num_classes = num_classes
        self.pooler_size = (pooler_resolution,) * spatial_dims
        self.output_size = (pooler_resolution // 2,) * spatial_dims
        cells = math.prod(self.output_size)
        conv_dim = conv_dim or max(1, _REFERENCE_FC_INPUT // cells)
        self.reduce = ops.conv(spatial_dims, level.channels, conv_dim, 2, stride=2, padding=0)
        widths = [conv_dim * cells] + [fc_dim] * num_fc
        self.fcs = nn.ModuleList(nn.Linear(widths[i], fc_dim) for i in range(num_fc))
        self.predictor = nn.Linear(widths[-1], num_classes * cells)
        nn.init.kaiming_normal_(self.reduce.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.reduce.bias)
        for fc in self.fcs:  # c2_xavier_fill
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Coarse logits (N, K, 7, 7[, 7]) covering the whole input."""
        feat = features[self.in_feature]
        n = feat.shape[0]
        coords = generate_regular_grid_point_coords(n, self.pooler_size, device=feat.device,
                                                    dtype=feat.dtype)
        x = point_sample(feat, coords).view(n, feat.shape[1], *self.pooler_size)
        x = torch.relu(self.reduce(x)).flatten(1)  # (N, conv_dim * 7^d)
        for fc in self.fcs:
            x = torch.relu(fc(x))
        return self.predictor(x).view(n, self.num_classes, *self.output_size)
