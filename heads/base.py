"""What a head reads: the backbone's declared feature levels (name, channels, per-axis stride)."""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence


class FeatureInfo(NamedTuple):
    """A declared backbone level (same fields as ``backbones.base.FeatureInfo``; heads only rely
    on the (name, channels, per-axis stride) triple, so they do not import the backbones)."""

    name: str
    channels: int
    stride: tuple[int, ...]


def as_feature_info(feature_info: Sequence[Any], spatial_dims: int) -> list[FeatureInfo]:
    """Validate a feature declaration (FeatureInfo or (name, channels, stride) tuples)."""
    out = []
    for item in feature_info:
        name, channels, stride = item
        stride = tuple(int(s) for s in stride) if isinstance(stride, (tuple, list)) \
            else (int(stride),) * spatial_dims
        if len(stride) != spatial_dims:
            raise ValueError(f"feature {name!r}: stride {stride} has not {spatial_dims} axes")
        out.append(FeatureInfo(str(name), int(channels), stride))
    if not out:
        raise ValueError("feature_info is empty")
    return out


def nearest_level(feature_info: Sequence[FeatureInfo], target_stride: float) -> FeatureInfo:
    """The level whose largest per-axis stride is closest to ``target_stride`` (log scale; ties
    go to the finer level)."""
    return min(feature_info, key=lambda f: (abs(math.log2(max(f.stride) / target_stride)),
                                            max(f.stride)))
