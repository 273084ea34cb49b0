"""Dimension-generic building blocks.

Every spatial layer used by backbones and heads comes from here, so a model is written once and
serves 2D (N, C, H, W) and 3D (N, C, D, H, W) inputs alike.  ``spatial_dims`` is always an explicit
argument of a constructor; pure functions derive it from the tensor as ``x.ndim - 2``.
"""
from __future__ import annotations

import collections.abc
import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_IN = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_ADAPTIVE_AVG = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
_DROPOUT = {1: nn.Dropout1d, 2: nn.Dropout2d, 3: nn.Dropout3d}
_LINEAR_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}


def check_spatial_dims(spatial_dims: int) -> int:
    """Validate ``spatial_dims`` (2 or 3; 1 is accepted for point-wise layers) and return it."""
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def spatial_dims_of(x: torch.Tensor) -> int:
    """Number of spatial axes of a batched channels-first tensor (N, C, *spatial)."""
    return check_spatial_dims(x.ndim - 2)


def to_ntuple(value: Any, n: int) -> tuple:
    """Broadcast a scalar to an ``n``-tuple; check the length of a sequence."""
    if isinstance(value, collections.abc.Iterable) and not isinstance(value, str):
        out = tuple(value)
        if len(out) != n:
            raise ValueError(f"expected {n} values, got {len(out)}: {out!r}")
        return out
    return (value,) * n


def reachable_taps(kernel_size: Sequence[int], dilation: Sequence[int], padding: Sequence[int],
                   size: Sequence[int]) -> tuple[slice, ...] | None:
    """Kernel taps of a stride-1 'same' convolution that can ever touch the input.

    With zero padding ``p = d (k - 1) / 2``, tap ``j`` of an axis reads input ``i + (j - k // 2) d``
    for output ``i``; when ``|j - k // 2| d >= size`` it reads padding for every output, so it
    contributes nothing to the result and receives zero gradient.  Returns per-axis slices of the
    taps that can contribute, or None when all can (nothing to crop).
    """
    out, cropped = [], False
    for k, d, p, s in zip(kernel_size, dilation, padding, size):
        c = k // 2
        if k % 2 == 0 or p != c * d:
            return None
        r = min(c, (int(s) - 1) // d)  # int(): a plain int also while tracing (sizes are tensors there)
        cropped |= r < c
        out.append(slice(c - r, c + r + 1))
    return tuple(out) if cropped else None


class _ReachableConv:
    """Mixin for nn.ConvNd: skip kernel taps that only ever read zero padding.

    Deep levels of small patches are smaller than their kernels (a 7x7x7 depthwise kernel on a
    2x2x1 map, a rate-6 ASPP branch on a 4x4x2 map): those taps multiply padding zeros.  Cropping
    the kernel to the taps that can reach the input gives the same output and the same gradients
    (zero for the cropped taps) at a fraction of the cost.  Parameters and state dict are those of
    the plain ``nn.ConvNd``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode == "zeros" and all(s == 1 for s in self.stride) \
                and not isinstance(self.padding, str):
            taps = reachable_taps(self.kernel_size, self.dilation, self.padding, x.shape[2:])
            if taps is not None:
                weight = self.weight[(slice(None), slice(None), *taps)]
                padding = tuple((t.stop - t.start) // 2 * d for t, d in zip(taps, self.dilation))
                return self._functional(x, weight, self.bias, 1, padding, self.dilation, self.groups)
        return super().forward(x)


class Conv1d(_ReachableConv, nn.Conv1d):
    _functional = staticmethod(F.conv1d)


class Conv2d(_ReachableConv, nn.Conv2d):
    _functional = staticmethod(F.conv2d)


class Conv3d(_ReachableConv, nn.Conv3d):
    _functional = staticmethod(F.conv3d)


_CONV = {1: Conv1d, 2: Conv2d, 3: Conv3d}


def conv(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: Any = 3,
         stride: Any = 1, padding: Any | None = None, dilation: Any = 1, groups: int = 1,
         bias: bool = True, padding_mode: str = "zeros") -> nn.Module:
    """Convolution for any ``spatial_dims``; ``padding=None`` means 'same' for odd kernels."""
    k = to_ntuple(kernel_size, spatial_dims)
    d = to_ntuple(dilation, spatial_dims)
    if padding is None:
        padding = tuple((ki - 1) // 2 * di for ki, di in zip(k, d))
    return _CONV[check_spatial_dims(spatial_dims)](
        in_channels, out_channels, k, stride=to_ntuple(stride, spatial_dims), padding=padding,
        dilation=d, groups=groups, bias=bias, padding_mode=padding_mode)


class LayerNormChannelsFirst(nn.Module):
    """LayerNorm over the channel axis of (N, C, *spatial) tensors, any number of spatial axes."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C, *S) -> (N, *S, C) -> normalise over C -> (N, C, *S)
        y = F.layer_norm(channels_last(x), (self.num_channels,), self.weight, self.bias, self.eps)
        return channels_first(y)


def norm(name: str, spatial_dims: int, num_channels: int, num_groups: int = 8,
         eps: float | None = None) -> nn.Module:
    """Normalisation layer by name: 'batch', 'instance', 'group', 'layer' (channels-first), 'none'."""
    check_spatial_dims(spatial_dims)
    name = name.lower()
    if name == "batch":
        return _BN[spatial_dims](num_channels, eps=eps or 1e-5)
    if name == "instance":
        return _IN[spatial_dims](num_channels, eps=eps or 1e-5, affine=True)
    if name == "group":
        groups = math.gcd(num_groups, num_channels)
        return nn.GroupNorm(groups, num_channels, eps=eps or 1e-5)
    if name == "layer":
        return LayerNormChannelsFirst(num_channels, eps=eps or 1e-6)
    if name == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {name!r}; choose one of batch, instance, group, layer, none")


def batch_norm(spatial_dims: int, num_channels: int, **kwargs: Any) -> nn.Module:
    """BatchNorm for any ``spatial_dims``."""
    return _BN[check_spatial_dims(spatial_dims)](num_channels, **kwargs)


def conv_block(spatial_dims: int, cin: int, cout: int, stride: Sequence[int] | int = 1,
               norm_name: str = "instance") -> nn.Sequential:
    """Two 3^d conv -> norm -> LeakyReLU(0.01) (the first with ``stride``), as nnU-Net's stages."""
    def one(ci: int, s: Sequence[int] | int) -> list[nn.Module]:
        return [conv(spatial_dims, ci, cout, 3, stride=s, bias=False),
                norm(norm_name, spatial_dims, cout, num_groups=max(1, cout // 8)),
                nn.LeakyReLU(0.01, inplace=True)]
    return nn.Sequential(*one(cin, stride), *one(cout, 1))


def adaptive_avg_pool(spatial_dims: int, output_size: Any = 1) -> nn.Module:
    """Adaptive average pooling for any ``spatial_dims``."""
    return _ADAPTIVE_AVG[check_spatial_dims(spatial_dims)](output_size)


def dropout(spatial_dims: int, p: float) -> nn.Module:
    """Channel dropout for any ``spatial_dims`` (identity when ``p == 0``)."""
    return _DROPOUT[check_spatial_dims(spatial_dims)](p) if p > 0 else nn.Identity()


def linear_mode(spatial_dims: int) -> str:
    """The ``F.interpolate`` / ``grid_sample`` name of (bi/tri)linear interpolation."""
    return _LINEAR_MODE[check_spatial_dims(spatial_dims)]


def resize(x: torch.Tensor, size: Sequence[int], mode: str = "linear") -> torch.Tensor:
    """Resize (N, C, *spatial) to ``size`` with align_corners=False.

    Args:
        x: (N, C, *S) tensor.
        size: target spatial size, one entry per spatial axis.
        mode: 'linear' (bi/trilinear by dims), 'nearest', or 'area'.
    """
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    if mode == "linear":
        return F.interpolate(x, size=size, mode=linear_mode(spatial_dims_of(x)), align_corners=False)
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest-exact")
    return F.interpolate(x, size=size, mode=mode)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *S) -> (N, *S, C)."""
    return x.permute(0, *range(2, x.ndim), 1)


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """(N, *S, C) -> (N, C, *S)."""
    return x.permute(0, x.ndim - 1, *range(1, x.ndim - 1))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (works for any tensor rank, batch first)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Stochastic depth as a module."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
