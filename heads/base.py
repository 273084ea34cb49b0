"""What a head reads and returns: one contract for every head.

A head reads the model's feature dict, described by its ``feature_info`` (name, channels, per-axis
stride, fine to coarse): the input's own levels first (``INPUT``, the image itself at stride 1, then
the model's learned input stages ``input_s2``, ``input_s4``, ... at the strides finer than the
backbone's finest level), then the backbone's levels.  A head names the levels it reads in its
``in_features`` attribute (the model builds no input stage that nothing reads), and returns a
``HeadOutput``, whatever the mode.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import torch

from seg.errors import ConfigError

#: the input image as a feature level (stride 1); heads that read the input read it under this name
INPUT = "input"


def input_stage_name(stride: Sequence[int]) -> str:
    """The name of the model's learned input stage at ``stride`` (``input_s2`` at stride 2)."""
    return f"{INPUT}_s{max(stride)}"


def is_input_level(name: str) -> bool:
    """Whether ``name`` is one of the levels the model publishes from the input (the input itself
    and its learned stages), as opposed to a backbone level."""
    return name == INPUT or name.startswith(INPUT + "_s")


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
    """The backbone's levels of a declaration: all but the input's own (``is_input_level``)."""
    return [f for f in feature_info if not is_input_level(f.name)]


def learned_levels(feature_info: Sequence[FeatureInfo]) -> list[FeatureInfo]:
    """Every learned level of a declaration, fine to coarse: the input stages and the backbone's
    (all but the raw ``INPUT``); the levels a decoder or the point head chooses among by stride."""
    return [f for f in feature_info if f.name != INPUT]


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
