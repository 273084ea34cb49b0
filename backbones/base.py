"""The backbone contract shared by every architecture."""
from __future__ import annotations

import inspect
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from seg.registry import unknown_name_message


class FeatureInfo(NamedTuple):
    """One multi-scale output of a backbone.

    Attributes:
        name: key of the output in ``forward``'s dict.
        channels: number of channels.
        stride: per-axis stride with respect to the input, in the tensor's spatial axis order
            ((H, W) in 2D, (D, H, W) in 3D).
    """

    name: str
    channels: int
    stride: tuple[int, ...]


class Backbone(nn.Module):
    """Base class: ``forward(x)`` returns an ordered ``dict[str, Tensor]`` fine to coarse whose
    keys, channels and strides are exactly ``self.feature_info``."""

    spatial_dims: int
    feature_info: list[FeatureInfo]

    def feature_names(self) -> list[str]:
        return [f.name for f in self.feature_info]


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, grad_checkpointing: bool = False) -> torch.Tensor:
    """Apply ``blocks`` in order; with ``grad_checkpointing`` (and autograd on) each block's activations
    are recomputed in the backward pass instead of stored (3D memory)."""
    for block in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


class StagedBackbone(Backbone):
    """A backbone made of ``self.stem`` then ``self.stages`` (each with a ``grad_checkpointing`` flag),
    outputting the stages listed in ``self.out_indices`` as ``stage<i>``."""

    stem: nn.Module
    stages: nn.ModuleList
    out_indices: Sequence[int]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block during backward (saves activation memory, costs compute)."""
        for stage in self.stages:
            stage.grad_checkpointing = bool(enable)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, in_chans, *S) -> ordered dict of (N, C_i, *ceil(S / stride_i)), fine to coarse."""
        x = self.stem(x)
        features: dict[str, torch.Tensor] = {}
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                features[f"stage{i}"] = x
        return features


def build_checked(cls: type, family: str, fixed: dict[str, Any], kwargs: dict[str, Any]) -> nn.Module:
    """``cls(**fixed, **kwargs)`` for a registered variant: the variant's ``fixed`` arguments, then the
    user's options; an option that is not a constructor argument gets a "did you mean" ValueError."""
    options = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for name in kwargs:
        if name not in options:
            raise ValueError(unknown_name_message(f"{family} option", name, options))
    return cls(**{**fixed, **kwargs})
