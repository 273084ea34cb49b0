"""What a head reads and returns: one contract for every head.

A head reads the model's feature dict, described by its ``feature_info`` (name, channels, per-axis
stride, fine to coarse): the input's own levels first (``INPUT``, the image itself at stride 1, and
``FINE_STEM``, the model's learned stride-2 branch on the input when it has one), then the
backbone's levels.  Every head returns a ``HeadOutput``, whatever the mode.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import torch

from seg.errors import ConfigError

#: the input image as a feature level (stride 1); heads that read the input read it under this name
INPUT = "input"
#: the model's learned stride-2 branch on the input (``seg.model.FineStem``), when it has one
FINE_STEM = "fine_stem"
#: the levels the model publishes from the input, beside the backbone's
INPUT_LEVELS = (INPUT, FINE_STEM)


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


def backbone_levels(feature_info: Sequence[FeatureInfo]) -> list[FeatureInfo]:
    """The backbone's levels of a declaration: all but the input's own (``INPUT_LEVELS``); the
    levels a head chooses among by stride."""
    return [f for f in feature_info if f.name not in INPUT_LEVELS]


def input_level(feature_info: Sequence[FeatureInfo], reader: str) -> FeatureInfo:
    """The ``INPUT`` level of a declaration (for a head that reads the image).

    Raises:
        ConfigError: the declaration has no ``INPUT`` level (say who needs it: ``reader``).
    """
    for f in feature_info:
        if f.name == INPUT:
            return f
    raise ConfigError(f"{reader} reads the input level {INPUT!r} (stride 1): feature_info has "
                     f"{[f.name for f in feature_info]}; build it with seg.model.assemble_model, "
                     "which publishes the input beside the backbone's levels")


@dataclasses.dataclass
class HeadOutput:
    """What every coarse head returns, in training and in inference alike.

    Attributes:
        logits: (N, K, *S_c) coarse logits covering the input (per region for the mask head).
        aux: deep-supervision logits of coarser decoder stages, coarse first after the main one;
            empty when the head has none or is not training.
    """

    logits: torch.Tensor
    aux: list[torch.Tensor] = dataclasses.field(default_factory=list)
