"""Conv2Former ("Conv2Former: A Simple Transformer-Style ConvNet for Visual Recognition",
Hou et al. 2022): one implementation for 2D and 3D.

Layout (the ConvNeXt skeleton): a patchify stem (conv with kernel = stride = 4, channels-first
LayerNorm), four stages, each but the first opened by a downsampler (LayerNorm, conv with kernel =
stride = 2), each a stack of blocks on channels-first maps (N, C, *S)::

    convolutional modulation:  y = LN(x)
                               a = DWConv_k(GELU(W_a y))        (depthwise k^d, default k = 11)
                               x = x + drop_path(gamma_1 * W_p(a * W_v y))
    MLP:                       h = GELU(W_1 LN(x))              (C -> 4C)
                               h = h + GELU(DWConv_3(h))        (positional depthwise conv)
                               x = x + drop_path(gamma_2 * W_2 h)

``W_*`` are 1x1(x1) convs, ``*`` is the element-wise (Hadamard) product and ``gamma_*`` per-channel
layer scales (init 1e-6).  The block follows the code published with the paper (module names
``attn.a``, ``attn.v``, ``attn.proj``, ``mlp.fc1``, ``mlp.pos``, ``mlp.fc2``, ``layer_scale_1/2``).

Kernel size: ``kernel_size`` (odd; int or per-axis tuple) sets k; the paper reports gains from 5 up
to 21 in 2D.  In 3D a cube of 11 costs 11x the depthwise work of 2D per voxel: anisotropic kernels
such as ``(5, 11, 11)`` or a smaller k are worth trying.

Per-axis strides and output size: exactly as in ``backbones.convnext`` (``strides`` gives the
stem's and each downsampler's factor; every stride-s conv zero-pads the end of each axis to a
multiple of s, so a feature of stride ``s`` has spatial size ``ceil(input / s)``).

Pretrained weights: no official Conv2Former checkpoint layout is mapped here (the published code
shows the block; the stem/downsampler key layout of released weights is not known to this
module), so ``checkpoint_filter_fn`` accepts our own layout only, dropping classifier keys and
unbuilt stages.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch
import torch.nn as nn

from seg import ops
from seg.errors import ConfigError

from .base import (FeatureInfo, StagedBackbone, build_checked, check_out_indices, init_trunc_normal,
                   per_axis, per_stage)
from .convnext import Downsample, Stage, Stem
from .registry import BACKBONES

__all__ = ["Conv2Former", "Conv2FormerBlock", "ConvMod", "checkpoint_filter_fn"]


class ConvMod(nn.Module):
    """Convolutional modulation, (N, C, *S) -> (N, C, *S): ``W_p(DW_k(GELU(W_a y)) * W_v y)``,
    ``y = LN(x)``, LayerNorm over channels."""

    def __init__(self, spatial_dims: int, dim: int, kernel_size: Any = 11) -> None:
        super().__init__()
        self.norm = ops.LayerNormChannelsFirst(dim, eps=1e-6)
        self.a = nn.Sequential(ops.conv(spatial_dims, dim, dim, 1), nn.GELU(),
                               ops.conv(spatial_dims, dim, dim, kernel_size, groups=dim))
        self.v = ops.conv(spatial_dims, dim, dim, 1)
        self.proj = ops.conv(spatial_dims, dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return self.proj(self.a(y) * self.v(y))


class Mlp(nn.Module):
    """LN -> 1x1 C->hC -> GELU -> (+ GELU(3^d depthwise)) -> 1x1 hC->C, (N, C, *S) -> (N, C, *S)."""

    def __init__(self, spatial_dims: int, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = ops.LayerNormChannelsFirst(dim, eps=1e-6)
        self.fc1 = ops.conv(spatial_dims, dim, hidden, 1)
        self.pos = ops.conv(spatial_dims, hidden, hidden, 3, groups=hidden)
        self.fc2 = ops.conv(spatial_dims, hidden, dim, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(self.norm(x)))  # (N, hC, *S)
        x = x + self.act(self.pos(x))
        return self.fc2(x)


class Conv2FormerBlock(nn.Module):
    """Modulation and MLP, each with layer scale, drop path and residual; (N, C, *S) kept."""

    def __init__(self, spatial_dims: int, dim: int, kernel_size: Any = 11, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0, layer_scale_init_value: float = 1e-6) -> None:
        super().__init__()
        self.attn = ConvMod(spatial_dims, dim, kernel_size)
        self.mlp = Mlp(spatial_dims, dim, mlp_ratio)
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        self.drop_path = ops.DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self._scale_shape = (dim,) + (1,) * spatial_dims  # (C,) -> (C, 1, ..., 1) broadcasts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1.view(self._scale_shape) * self.attn(x))
        return x + self.drop_path(self.layer_scale_2.view(self._scale_shape) * self.mlp(x))


def _check_kernel(kernel_size: Any, spatial_dims: int) -> tuple[int, ...]:
    k = per_axis(kernel_size, spatial_dims, "Conv2Former kernel_size")
    if any(v < 1 or v % 2 == 0 for v in k):
        raise ConfigError(f"Conv2Former kernel_size must be odd and positive (same-size output), "
                          f"got {kernel_size!r}")
    return k


class Conv2Former(StagedBackbone):
    """Conv2Former feature extractor for (N, in_chans, H, W) or (N, in_chans, D, H, W) inputs.

    Args:
        spatial_dims: 2 or 3.
        in_chans: number of input channels.
        depths: number of blocks per stage.
        dims: channels per stage.
        kernel_size: depthwise kernel k of the modulation (odd int or per-axis tuple).
        strides: stride factor of the stem and of each downsampler, 4 entries, each an int or a
            per-axis tuple (see ``backbones.convnext``).
        mlp_ratio: hidden width of the MLP relative to its input.
        drop_path_rate: stochastic depth rate, increasing linearly from 0 to this over all blocks.
        layer_scale_init_value: initial value of both layer scales.
        out_indices: stages to output; stages after the last one listed are not built.
        grad_checkpointing: recompute each block in the backward pass to save memory.

    ``forward(x)`` returns ``{"stage<i>": (N, dims[i], *ceil(S / stride_i))}`` for i in
    ``out_indices``, fine to coarse, as declared in ``feature_info``.
    """

    stem_key = "stem.conv.weight"

    def __init__(self, spatial_dims: int, in_chans: int = 1,
                 depths: Sequence[int] = (2, 2, 8, 2), dims: Sequence[int] = (64, 128, 256, 512),
                 kernel_size: Any = 11, strides: Sequence[Any] = (4, 2, 2, 2),
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 layer_scale_init_value: float = 1e-6, out_indices: Sequence[int] = (0, 1, 2, 3),
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"Conv2Former needs spatial_dims 2 or 3, got {spatial_dims!r}")
        self.spatial_dims = spatial_dims
        self.out_indices = check_out_indices(out_indices, len(depths))
        kernel = _check_kernel(kernel_size, spatial_dims)
        factors = per_stage(strides, 4, spatial_dims, broadcast=False)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stem = Stem(spatial_dims, in_chans, dims[0], factors[0])
        self.stages = nn.ModuleList()
        self.feature_info: list[FeatureInfo] = []
        total = (1,) * spatial_dims
        for i in range(max(self.out_indices) + 1):
            down = (nn.Identity() if i == 0
                    else Downsample(spatial_dims, dims[i - 1], dims[i], factors[i]))
            total = tuple(a * b for a, b in zip(total, factors[i]))
            blocks = [Conv2FormerBlock(spatial_dims, dims[i], kernel, mlp_ratio, rate,
                                       layer_scale_init_value)
                      for rate in rates[sum(depths[:i]):sum(depths[:i + 1])]]
            self.stages.append(Stage(down, blocks))
            if i in self.out_indices:
                self.feature_info.append(FeatureInfo(f"stage{i}", dims[i], total))
        self.apply(init_trunc_normal)
        self.set_grad_checkpointing(grad_checkpointing)


_CLASSIFIER = re.compile(r"^(head|norm|norm_pre|fc|classifier)\.")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: Conv2Former
                         ) -> dict[str, torch.Tensor]:
    """Keep a state dict in our own layout, minus classifier keys and stages not built.

    Only our layout is understood (see the module docstring); 2D -> 3D kernel inflation and the
    stem's input channels are handled by ``backbones.pretrained``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        stage = re.match(r"^stages\.(\d+)\.", key)
        if _CLASSIFIER.match(key) or (stage and int(stage.group(1)) >= len(model.stages)):
            continue
        out[key] = value
    return out


# --- variants (widths and depths of the paper's Table 1; MLP ratio 4, k = 11) ------------------


def _create(spatial_dims: int, in_chans: int, depths: tuple[int, ...], dims: tuple[int, ...],
            kwargs: dict[str, Any]) -> Conv2Former:
    fixed = dict(spatial_dims=spatial_dims, in_chans=in_chans, depths=depths, dims=dims)
    return build_checked(Conv2Former, "Conv2Former", fixed, kwargs)


@BACKBONES.register()
def conv2former_n(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> Conv2Former:
    return _create(spatial_dims, in_chans, (2, 2, 8, 2), (64, 128, 256, 512), kwargs)


@BACKBONES.register()
def conv2former_t(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> Conv2Former:
    return _create(spatial_dims, in_chans, (3, 3, 12, 3), (72, 144, 288, 576), kwargs)


@BACKBONES.register()
def conv2former_s(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> Conv2Former:
    return _create(spatial_dims, in_chans, (4, 4, 32, 4), (72, 144, 288, 576), kwargs)


@BACKBONES.register()
def conv2former_b(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> Conv2Former:
    return _create(spatial_dims, in_chans, (4, 4, 34, 4), (96, 192, 384, 768), kwargs)


@BACKBONES.register()
def conv2former_l(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> Conv2Former:
    return _create(spatial_dims, in_chans, (4, 4, 48, 4), (128, 256, 512, 1024), kwargs)
