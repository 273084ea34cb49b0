"""The backbone contract shared by every architecture."""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from seg import ops
from seg.errors import ConfigError
from seg.registry import check_options


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


def check_out_indices(out_indices: Sequence[int], num_stages: int) -> tuple[int, ...]:
    """Sorted unique stage indices, each in ``0..num_stages-1`` (ConfigError otherwise)."""
    out = tuple(sorted(set(int(i) for i in out_indices)))
    if not out or out[0] < 0 or out[-1] >= num_stages:
        raise ConfigError(f"out_indices must be stage indices in 0..{num_stages - 1}, "
                          f"got {out_indices!r}")
    return out


def per_axis(value: Any, spatial_dims: int, what: str) -> tuple[int, ...]:
    """An option given as an int or a per-axis tuple, as ``spatial_dims`` ints (ConfigError naming
    ``what`` when it has the wrong length or type)."""
    try:
        return tuple(int(v) for v in ops.to_ntuple(value, spatial_dims))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what}: {exc}") from exc


def per_stage(values: Any, count: int, spatial_dims: int, what: str = "strides",
              broadcast: bool = True) -> list[tuple[int, ...]]:
    """``count`` per-axis tuples of positive ints, one per stage (strides, reduction ratios).

    ``values`` holds ``count`` entries, each an int or a per-axis tuple; with ``broadcast`` a single
    int or per-axis tuple also serves every stage (a tuple of length ``count`` is read per stage).
    Anything else raises a ConfigError naming ``what``.
    """
    if broadcast and (isinstance(values, int) or (
            len(values) == spatial_dims and len(values) != count
            and all(isinstance(v, int) for v in values))):
        values = [values] * count
    if isinstance(values, int) or len(values) != count:
        raise ConfigError(f"{what} needs {count} entries (one per stage), got {values!r}")
    out = [per_axis(s, spatial_dims, what) for s in values]
    if any(v < 1 for t in out for v in t):
        raise ConfigError(f"{what} must be positive, got {values!r}")
    return out


def pad_to_multiple(x: torch.Tensor, multiple: Sequence[int]) -> torch.Tensor:
    """Zero-pad the end of every spatial axis up to a multiple of ``multiple`` (per axis).

    Args:
        x: (N, C, *S) tensor.
        multiple: one positive int per spatial axis.

    Returns:
        (N, C, *S') with ``S'[i] = ceil(S[i] / multiple[i]) * multiple[i]``.
    """
    pads: list[int] = []
    for size, m in zip(reversed(x.shape[2:]), reversed(tuple(multiple))):  # F.pad: last axis first
        pads += [0, (-size) % m]
    return F.pad(x, pads) if any(pads) else x


def init_trunc_normal(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) conv and linear weights, zero biases (ConvNeXt, Conv2Former)."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


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
    user's options; an option that is not a constructor argument gets a "did you mean" ConfigError."""
    check_options(cls.__init__, f"{family} option", kwargs)
    return cls(**{**fixed, **kwargs})
