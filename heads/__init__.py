"""Coarse segmentation heads, built from a backbone's declared ``feature_info``.

``build_head(name, feature_info, num_classes, spatial_dims, **kwargs)`` returns a module whose
``forward(features: dict[str, Tensor]) -> Tensor`` maps the backbone's ordered feature dict to
coarse logits (N, K, *S_c) that cover the whole input extent (so normalised point coordinates
over the input address them directly).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import torch.nn as nn

from seg.ops import check_spatial_dims
from seg.registry import Registry, check_options

HEADS = Registry("head")


class FeatureInfo(NamedTuple):
    """A declared backbone level (same fields as ``backbones.base.FeatureInfo``; heads only rely
    on the (name, channels, per-axis stride) triple, so they do not import the backbones)."""

    name: str
    channels: int
    stride: tuple[int, ...]


def list_heads() -> list[str]:
    """Names of every registered coarse head."""
    return HEADS.names()


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


def build_head(name: str, feature_info: Sequence[Any], num_classes: int, spatial_dims: int,
               **kwargs: Any) -> nn.Module:
    """Build a registered coarse head.

    Args:
        name: 'deeplab', 'mask' or 'unet' (see ``list_heads()``).
        feature_info: the backbone's declaration, fine to coarse.
        num_classes: K, including background.
        spatial_dims: 2 or 3.
        **kwargs: head options (see each head's constructor).
    """
    check_spatial_dims(spatial_dims)
    info = as_feature_info(feature_info, spatial_dims)
    check_options(HEADS.get(name), f"{name} head option", kwargs)
    return HEADS.get(name)(feature_info=info, num_classes=num_classes,
                           spatial_dims=spatial_dims, **kwargs)


# Importing the head modules registers them.
from . import deeplab, mask_head, unet  # noqa: E402,F401
from .point_head import StandardPointHead  # noqa: E402,F401

__all__ = ["HEADS", "FeatureInfo", "StandardPointHead", "as_feature_info", "build_head", "list_heads",
           "nearest_level"]
