"""Coarse segmentation heads, built from a backbone's declared ``feature_info``.

``build_head(name, feature_info, num_classes, spatial_dims, **kwargs)`` (``heads.registry``) returns
a module whose ``forward(features: dict[str, Tensor]) -> HeadOutput`` maps the model's ordered
feature dict (the input's levels ``input``, ``input_s2``, ..., then the backbone's; ``heads.base``)
to coarse logits (N, K, *S_c) that cover the whole input extent (so normalised point coordinates
over the input address them directly), plus auxiliary logits (a list, empty when none).  This
package only re-exports; importing the head modules registers them.
"""
from . import deeplab, mask_head, unet  # noqa: F401 - registers the heads
from .base import (INPUT, FeatureInfo, HeadOutput, as_feature_info, backbone_levels,
                   input_level, input_stage_name, is_input_level, learned_levels, nearest_level)
from .point_head import StandardPointHead
from .registry import HEADS, build_head, list_heads

__all__ = ["HEADS", "INPUT", "FeatureInfo", "HeadOutput", "StandardPointHead", "as_feature_info",
           "backbone_levels", "build_head", "input_level", "input_stage_name", "is_input_level",
           "learned_levels", "list_heads", "nearest_level"]
