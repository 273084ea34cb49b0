"""DeepLabV3(+) coarse head: ASPP on the deepest level, optional fusion with a finer level.

Output stride: ASPP runs on the deepest declared level (stride 32 for ConvNeXt/RepVGG).  With
``fuse=True`` (default) its output is upsampled to the level whose stride is closest to
``output_stride`` (default 8) and fused with it DeepLabV3+-style (1x1 projection to 48 channels,
concatenation, two 3x3 conv-norm-ReLU); the coarse logits are at that level's stride.  With
``fuse=False`` the logits are at the deepest stride and PointRend subdivides from there.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from seg import ops

from .base import FeatureInfo, HeadOutput, backbone_levels, nearest_level
from .registry import HEADS


def conv_norm_act(spatial_dims: int, cin: int, cout: int, kernel_size: int = 3,
                  dilation: Sequence[int] | int = 1, norm: str = "group") -> nn.Sequential:
    """conv (no bias) -> norm -> ReLU.  Group norm uses groups of >= 8 channels (32 groups at
    256), so it stays defined on the 1-cell maps that small 3D patches give at stride 32."""
    return nn.Sequential(
        ops.conv(spatial_dims, cin, cout, kernel_size, dilation=dilation, bias=False),
        ops.norm(norm, spatial_dims, cout, num_groups=max(1, min(32, cout // 8))),
        nn.ReLU(inplace=True))


def default_atrous_rates(stride: Sequence[int]) -> list[tuple[int, ...]]:
    """DeepLab's rates (6, 12, 18) at output stride 16, scaled per axis to the actual stride
    (stride 32 -> (3, 6, 9), stride 8 -> (12, 24, 36); anisotropic strides get per-axis rates)."""
    return [tuple(max(1, round(base * 16 / s)) for s in stride) for base in (6, 12, 18)]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three atrous 3x3 branches and image pooling.

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: widths.
        rates: three per-axis dilation tuples.
        norm: normalisation name (group norm by default: batch statistics are poor with the small
            3D batches of medical training).
        dropout: dropout after the projection.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 rates: Sequence[Sequence[int]], norm: str = "group", dropout: float = 0.1) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_norm_act(spatial_dims, in_channels, out_channels, 1, norm=norm)]
            + [conv_norm_act(spatial_dims, in_channels, out_channels, 3, r, norm) for r in rates])
        # image pooling: conv with bias, no norm (one cell per sample: nothing to normalise over)
        self.pool = nn.Sequential(ops.adaptive_avg_pool(spatial_dims, 1),
                                  ops.conv(spatial_dims, in_channels, out_channels, 1),
                                  nn.ReLU(inplace=True))
        self.project = nn.Sequential(
            conv_norm_act(spatial_dims, out_channels * (len(rates) + 2), out_channels, 1,
                          norm=norm),
            ops.dropout(spatial_dims, dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, *S) -> (N, C_out, *S)."""
        pooled = self.pool(x).expand(-1, -1, *x.shape[2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


@HEADS.register("deeplab")
class DeepLabHead(nn.Module):
    """DeepLabV3+ coarse head.

    Args:
        feature_info: the model's levels, fine to coarse (``heads.base``); it reads the backbone's.
        num_classes: K.
        spatial_dims: 2 or 3.
        channels: ASPP / decoder width (256 as DeepLab).
        atrous_rates: three ints or per-axis tuples; default scaled to the deepest stride.
        fuse: DeepLabV3+ fusion with a finer level.
        output_stride: target stride of the logits when fusing (8 or 16).
        low_level_channels: width of the projected finer level (48 as DeepLabV3+).
        norm: normalisation name for ``seg.ops.norm``.
        dropout: ASPP dropout.

    Attributes:
        output_stride: per-axis stride of the coarse logits.
        in_features: the names of the levels it reads.
    """

    def __init__(self, feature_info: Sequence[FeatureInfo], num_classes: int, spatial_dims: int,
                 channels: int = 256, atrous_rates: Sequence | None = None, fuse: bool = True,
                 output_stride: int = 8, low_level_channels: int = 48, norm: str = "group",
                 dropout: float = 0.1) -> None:
        super().__init__()
        feature_info = backbone_levels(feature_info)
        deep = feature_info[-1]
        rates = default_atrous_rates(deep.stride) if atrous_rates is None else \
            [ops.to_ntuple(r, spatial_dims) for r in atrous_rates]
        self.deep_name = deep.name
        self.aspp = ASPP(spatial_dims, deep.channels, channels, rates, norm, dropout)
        low = nearest_level(feature_info, output_stride) if fuse else deep
        self.low_name = None if low.name == deep.name else low.name
        self.output_stride = tuple(low.stride) if self.low_name else tuple(deep.stride)
        self.in_features = [deep.name] + ([self.low_name] if self.low_name else [])
        width = channels
        if self.low_name:
            self.low_proj = conv_norm_act(spatial_dims, low.channels, low_level_channels, 1,
                                          norm=norm)
            self.fuse = nn.Sequential(
                conv_norm_act(spatial_dims, channels + low_level_channels, channels, 3, norm=norm),
                conv_norm_act(spatial_dims, channels, channels, 3, norm=norm))
        self.classifier = ops.conv(spatial_dims, width, num_classes, 1)

    def forward(self, features: dict[str, torch.Tensor]) -> HeadOutput:
        """Coarse logits (N, K, *S / output_stride) from the model's feature dict."""
        x = self.aspp(features[self.deep_name])
        if self.low_name:
            low = features[self.low_name]
            x = ops.resize(x, low.shape[2:], mode="linear")
            x = self.fuse(torch.cat([x, self.low_proj(low)], dim=1))
        return HeadOutput(self.classifier(x))
