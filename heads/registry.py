"""The coarse-head registry: ``HEADS`` (name -> class) and ``build_head``.

The head modules register themselves into ``HEADS`` when ``heads`` imports them; they import this
module, never the package ``__init__``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch.nn as nn

from seg.ops import check_spatial_dims
from seg.registry import Registry, check_options

from .base import as_feature_info

HEADS = Registry("head")


def list_heads() -> list[str]:
    """Names of every registered coarse head."""
    return HEADS.names()


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
