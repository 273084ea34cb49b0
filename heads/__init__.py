"""Coarse segmentation heads, built from a backbone's declared ``feature_info``.

``build_head(name, feature_info, num_classes, spatial_dims, **kwargs)`` (``heads.registry``) returns
a module whose ``forward(features: dict[str, Tensor]) -> Tensor`` maps the backbone's ordered
feature dict to coarse logits (N, K, *S_c) that cover the whole input extent (so normalised point
coordinates over the input address them directly).  This package only re-exports; importing the
head modules registers them.
"""
from . import deeplab, mask_head, unet  # noqa: F401 - registers the heads
from .base import FeatureInfo, as_feature_info, nearest_level
from .point_head import StandardPointHead
from .registry import HEADS, build_head, list_heads

__all__ = ["HEADS", "FeatureInfo", "StandardPointHead", "as_feature_info", "build_head", "list_heads",
           "nearest_level"]
