"""The backbone registry: ``BACKBONES`` (name -> builder) and ``build_backbone``.

The architecture modules register their variants into ``BACKBONES`` when ``backbones`` imports them;
they import this module, never the package ``__init__``.
"""
from __future__ import annotations

from typing import Any

from seg.registry import Registry

from .base import Backbone
from .pretrained import load_pretrained

BACKBONES = Registry("backbone")


def list_backbones() -> list[str]:
    """Names of every registered backbone variant."""
    return BACKBONES.names()


def backbone_options(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options a run builds backbone ``name`` with: the variant's registered defaults with the
    user's ``overrides`` (``model.backbone_kwargs``) merged over them; what checkpoints store."""
    return BACKBONES.options(name, overrides)


def build_backbone(name: str, spatial_dims: int, in_chans: int = 1, pretrained: str | None = None,
                   **kwargs: Any) -> Backbone:
    """Build a registered backbone.

    Args:
        name: registered variant name (see ``list_backbones()``).
        spatial_dims: 2 or 3.
        in_chans: number of input channels.
        pretrained: optional path to a local checkpoint in an official or timm key layout.
        **kwargs: architecture options (drop_path_rate, out_indices, grad_checkpointing, ...), as
            given: the variant's registered run defaults are not applied here (``backbone_options``).
    """
    model = BACKBONES.get(name)(spatial_dims=spatial_dims, in_chans=in_chans, **kwargs)
    if pretrained:
        load_pretrained(model, pretrained)
    return model
