"""Backbone registry: ``build_backbone(name, spatial_dims, in_chans=1, **kwargs)``.

Every backbone is one implementation for 2D and 3D, returns an ordered ``dict[str, Tensor]`` of
multi-scale features (fine to coarse) and declares them in ``feature_info``.
"""
from __future__ import annotations

from typing import Any

from seg.registry import Registry

from .base import Backbone, FeatureInfo

BACKBONES = Registry("backbone")


def list_backbones() -> list[str]:
    """Names of every registered backbone variant."""
    return BACKBONES.names()


def build_backbone(name: str, spatial_dims: int, in_chans: int = 1, pretrained: str | None = None,
                   **kwargs: Any) -> Backbone:
    """Build a registered backbone.

    Args:
        name: registered variant name (see ``list_backbones()``).
        spatial_dims: 2 or 3.
        in_chans: number of input channels.
        pretrained: optional path to a local checkpoint in an official or timm key layout.
        **kwargs: architecture options (drop_path_rate, out_indices, grad_checkpointing, ...).
    """
    model = BACKBONES.get(name)(spatial_dims=spatial_dims, in_chans=in_chans, **kwargs)
    if pretrained:
        from .pretrained import load_pretrained
        load_pretrained(model, pretrained)
    return model


# Importing the architecture modules registers their variants.
from . import cmt, conv2former, convnext, repvgg, swinv2  # noqa: E402,F401
from .repvgg import reparameterize_model  # noqa: E402,F401

__all__ = ["BACKBONES", "Backbone", "FeatureInfo", "build_backbone", "list_backbones",
           "reparameterize_model"]
