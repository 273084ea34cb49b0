"""PointRend's light coarse mask head (detectron2 ConvFCHead, docs/pointrend.md §8), 2D and 3D.

Per region, the finest level is point-sampled on a regular ``pooler_resolution``^d grid of cell
centres (RoIAlign with sampling_ratio 1), reduced by a kernel-2 stride-2 conv to
``(pooler_resolution/2)``^d, flattened, passed through ``num_fc`` FC layers and predicted as
K x 7^d coarse logits.

The region is the whole input by default, which is what the segmentation model uses (its
subdivision treats the K x 7^d logits as covering the input).  ``forward(features, boxes,
batch_index)`` also runs per box (boxes from ``seg.pointrend.boxes_from_labels``: connected
components of the labels with jitter at training time, of a first coarse pass at inference; points
are box-normalised and mapped to input coordinates).  This per-object path is a tested extension:
``SegmentationModel`` does not route boxes yet (per-box losses and pasting are not written).

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
from seg.errors import ConfigError
from seg.pointrend import (generate_regular_grid_point_coords, point_sample,
                           point_sample_fine_grained_features)
from seg.registry import unknown_name_message

from .base import FeatureInfo, HeadOutput, backbone_levels, nearest_level
from .registry import HEADS

_REFERENCE_FC_INPUT = 256 * 7 * 7


@HEADS.register("mask")
class CoarseMaskHead(nn.Module):
    """Coarse mask head on the whole input.

    Args:
        feature_info: the model's levels, fine to coarse (``heads.base``).
        num_classes: K.
        spatial_dims: 2 or 3.
        in_feature: level name; default the backbone level whose stride is closest to 4.
        pooler_resolution: side of the sampled grid (14); must be even.
        conv_dim: channels of the stride-2 conv (None: 12544 // 7^d, see module docstring).
        fc_dim, num_fc: FC trunk (1024, 2).

    Attributes:
        in_features: the names of the levels it reads (one).
    """

    def __init__(self, feature_info: Sequence[FeatureInfo], num_classes: int, spatial_dims: int,
                 in_feature: str | None = None, pooler_resolution: int = 14,
                 conv_dim: int | None = None, fc_dim: int = 1024, num_fc: int = 2) -> None:
        super().__init__()
        if pooler_resolution % 2:
            raise ConfigError(f"mask head pooler_resolution must be even, got {pooler_resolution}")
        by_name = {f.name: f for f in feature_info}
        if in_feature is not None and in_feature not in by_name:
            raise ConfigError(unknown_name_message("mask head in_feature", in_feature, by_name))
        level = nearest_level(backbone_levels(feature_info), 4) if in_feature is None else by_name[in_feature]
        self.in_feature, self.spatial_dims = level.name, spatial_dims
        self.in_features = [level.name]
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

    def forward(self, features: dict[str, torch.Tensor], boxes: torch.Tensor | None = None,
                batch_index: torch.Tensor | None = None) -> HeadOutput:
        """Coarse logits per region.

        Args:
            features: the model's feature dict.
            boxes: (R, 2d) normalised x-first boxes (see ``seg.pointrend``); None = one region per
                image covering the whole input.
            batch_index: (R,) image of each box (required with ``boxes``).

        Returns:
            ``HeadOutput`` with (R, K, 7, 7[, 7]) logits in box coordinates; R = N without boxes.
        """
        feat = features[self.in_feature]
        r = feat.shape[0] if boxes is None else boxes.shape[0]
        # made on the CPU, then type_as(feat): a traced graph (seg.export) follows the input's device
        coords = generate_regular_grid_point_coords(r, self.pooler_size, dtype=feat.dtype).type_as(feat)
        if boxes is None:  # one region per image, the whole input: box coordinates are input ones
            x = point_sample(feat, coords)  # (N, C, P), no per-image loop (any batch when traced)
        else:
            x = point_sample_fine_grained_features([feat], boxes, batch_index, coords)
        x = x.view(r, feat.shape[1], *self.pooler_size)  # (R, C, 14, 14[, 14])
        x = torch.relu(self.reduce(x)).flatten(1)  # (R, conv_dim * 7^d)
        for fc in self.fcs:
            x = torch.relu(fc(x))
        return HeadOutput(self.predictor(x).view(r, self.num_classes, *self.output_size))
