"""Backbones: ``build_backbone(name, spatial_dims, in_chans=1, **kwargs)`` (``backbones.registry``).

Every backbone is one implementation for 2D and 3D, returns an ordered ``dict[str, Tensor]`` of
multi-scale features (fine to coarse) and declares them in ``feature_info``.  This package only
re-exports; importing the architecture modules registers their variants.
"""
from . import cmt, conv2former, convnext, repvgg, swinv2  # noqa: F401 - registers the variants
from .base import Backbone, FeatureInfo
from .registry import BACKBONES, backbone_options, build_backbone, list_backbones
from .repvgg import reparameterize_model

__all__ = ["BACKBONES", "Backbone", "FeatureInfo", "backbone_options", "build_backbone", "list_backbones",
           "reparameterize_model"]
