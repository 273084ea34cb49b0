"""ConvNeXt ("A ConvNet for the 2020s", Liu et al. 2022): one implementation for 2D and 3D.

Layout: a patchify stem (conv with kernel = stride = 4, then channels-first LayerNorm), four stages,
each but the first opened by a downsampler (channels-first LayerNorm, then conv with kernel =
stride = 2), each a stack of blocks::

    x -> depthwise k^d conv -> LayerNorm (channels-last) -> Linear C->4C -> GELU -> Linear 4C->C
      -> * gamma (layer scale) -> drop path -> + x

Per-axis strides: ``strides`` gives the stride factor of the stem and of each downsampler, one
int (all axes) or one per-axis tuple per stage, e.g. for thick-slice volumes
``strides=((1, 4, 4), (1, 2, 2), (2, 2, 2), (2, 2, 2))`` keeps depth at full resolution in the stem
and stage 1 (cumulative strides (1, 4, 4), (1, 8, 8), (2, 16, 16), (4, 32, 32)).  The kernel of
the stem and of the downsamplers equals their stride on every axis (non-overlapping patches).

Output size: every stride-s conv zero-pads its input at the end of each axis up to a multiple of
s, so a feature of stride ``s`` has spatial size ``ceil(input / s)`` on every axis, for any input.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch
import torch.nn as nn

from seg import ops

from .base import (FeatureInfo, StagedBackbone, build_checked, check_out_indices, init_trunc_normal,
                   pad_to_multiple, per_stage, run_blocks)
from .registry import BACKBONES

__all__ = ["ConvNeXt", "checkpoint_filter_fn"]




class Stem(nn.Module):
    """Patchify stem: (N, in_chans, *S) -> (N, C, *ceil(S / stride))."""

    def __init__(self, spatial_dims: int, in_chans: int, out_chans: int, stride: tuple[int, ...]):
        super().__init__()
        self.stride = stride
        self.conv = ops.conv(spatial_dims, in_chans, out_chans, stride, stride=stride, padding=0)
        self.norm = ops.LayerNormChannelsFirst(out_chans, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(pad_to_multiple(x, self.stride)))


class Downsample(nn.Module):
    """Between stages: (N, C_in, *S) -> LayerNorm -> patch conv -> (N, C_out, *ceil(S / stride))."""

    def __init__(self, spatial_dims: int, in_chans: int, out_chans: int, stride: tuple[int, ...]):
        super().__init__()
        self.stride = stride
        self.norm = ops.LayerNormChannelsFirst(in_chans, eps=1e-6)
        self.conv = ops.conv(spatial_dims, in_chans, out_chans, stride, stride=stride, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(pad_to_multiple(self.norm(x), self.stride))


class Block(nn.Module):
    """ConvNeXt block, (N, C, *S) -> (N, C, *S)."""

    def __init__(self, spatial_dims: int, dim: int, kernel_size: Any = 7, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0, layer_scale_init_value: float | None = 1e-6) -> None:
        super().__init__()
        self.conv_dw = ops.conv(spatial_dims, dim, dim, kernel_size, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, int(mlp_ratio * dim))
        self.act = nn.GELU()
        self.fc2 = nn.Linear(int(mlp_ratio * dim), dim)
        self.gamma = (nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
                      if layer_scale_init_value else None)
        self.drop_path = ops.DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.channels_last(self.conv_dw(x))  # (N, C, *S) -> (N, *S, C)
        y = self.fc2(self.act(self.fc1(self.norm(y))))  # (N, *S, C) -> (N, *S, 4C) -> (N, *S, C)
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(ops.channels_first(y))  # (N, *S, C) -> (N, C, *S)


class Stage(nn.Module):
    """Optional downsampler followed by ``depth`` blocks."""

    def __init__(self, downsample: nn.Module, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        return run_blocks(self.blocks, x, self.grad_checkpointing)




class ConvNeXt(StagedBackbone):
    """ConvNeXt feature extractor for (N, in_chans, H, W) or (N, in_chans, D, H, W) inputs.

    Args:
        spatial_dims: 2 or 3.
        in_chans: number of input channels.
        depths: number of blocks per stage.
        dims: channels per stage.
        kernel_size: depthwise kernel of the blocks (int or per-axis tuple).
        strides: stride factor of the stem and of each downsampler (see the module docstring).
        mlp_ratio: hidden width of the block MLP relative to its input.
        drop_path_rate: stochastic depth rate, increasing linearly from 0 to this over all blocks.
        layer_scale_init_value: initial layer-scale gamma (None or 0: no layer scale).
        out_indices: stages to output; stages after the last one listed are not built.
        grad_checkpointing: recompute each block in the backward pass to save memory.

    ``forward(x)`` returns ``{"stage<i>": (N, dims[i], *ceil(S / stride_i))}`` for i in
    ``out_indices``, fine to coarse, as declared in ``feature_info``.
    """

    stem_key = "stem.conv.weight"

    def __init__(self, spatial_dims: int, in_chans: int = 1,
                 depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 kernel_size: Any = 7, strides: Sequence[Any] = (4, 2, 2, 2),
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 layer_scale_init_value: float | None = 1e-6,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"ConvNeXt needs spatial_dims 2 or 3, got {spatial_dims!r}")
        self.spatial_dims = spatial_dims
        self.out_indices = check_out_indices(out_indices, len(depths))
        factors = per_stage(strides, 4, spatial_dims, broadcast=False)
        num_stages = max(self.out_indices) + 1
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stem = Stem(spatial_dims, in_chans, dims[0], factors[0])
        self.stages = nn.ModuleList()
        self.feature_info: list[FeatureInfo] = []
        total = factors[0]
        for i in range(num_stages):
            down = (nn.Identity() if i == 0
                    else Downsample(spatial_dims, dims[i - 1], dims[i], factors[i]))
            total = total if i == 0 else tuple(a * b for a, b in zip(total, factors[i]))
            block_rates = rates[sum(depths[:i]):sum(depths[:i + 1])]
            blocks = [Block(spatial_dims, dims[i], kernel_size, mlp_ratio, rate,
                            layer_scale_init_value) for rate in block_rates]
            self.stages.append(Stage(down, blocks))
            if i in self.out_indices:
                self.feature_info.append(FeatureInfo(f"stage{i}", dims[i], total))
        self.apply(init_trunc_normal)
        self.set_grad_checkpointing(grad_checkpointing)






# --- checkpoint key layouts -------------------------------------------------------------------
# facebookresearch/ConvNeXt: downsample_layers.0 = stem (conv, norm), downsample_layers.i
# (i >= 1) = (norm, conv), stages.i.j = block j of stage i (dwconv, norm, pwconv1, pwconv2, gamma),
# norm = final norm, head = classifier.
_OFFICIAL_RULES = [
    (r"^downsample_layers\.0\.0\.", "stem.conv."),
    (r"^downsample_layers\.0\.1\.", "stem.norm."),
    (r"^downsample_layers\.(\d+)\.0\.", r"stages.\1.downsample.norm."),
    (r"^downsample_layers\.(\d+)\.1\.", r"stages.\1.downsample.conv."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"\.dwconv\.", ".conv_dw."),
    (r"\.pwconv([12])\.", r".fc\1."),
]
# timm: stem.(0 conv, 1 norm), stages.i.downsample.(0 norm, 1 conv), stages.i.blocks.j.(conv_dw,
# norm, mlp.fc1, mlp.fc2, gamma), head.(norm, fc), norm_pre; small variants use 1x1 convs as MLP.
_TIMM_RULES = [
    (r"^stem\.0\.", "stem.conv."),
    (r"^stem\.1\.", "stem.norm."),
    (r"^stages\.(\d+)\.downsample\.0\.", r"stages.\1.downsample.norm."),
    (r"^stages\.(\d+)\.downsample\.1\.", r"stages.\1.downsample.conv."),
    (r"\.mlp\.fc([12])\.", r".fc\1."),
]
_CLASSIFIER = re.compile(r"^(head|norm|norm_pre|fc|classifier)\.")


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: ConvNeXt
                         ) -> dict[str, torch.Tensor]:
    """Map an official (facebookresearch) or timm ConvNeXt state dict to this module's keys.

    Drops the classifier, the final norm and stages the model does not build (``out_indices``);
    reshapes timm's 1x1-conv MLP weights (O, I, 1, 1) to Linear weights (O, I).  Kernels stay 2D
    here: inflation to 3D and input-channel adaptation are done by ``backbones.pretrained``.
    """
    if any(k.startswith("visual.trunk.") for k in state_dict):  # open_clip wrapping a timm trunk
        state_dict = {k[len("visual.trunk."):]: v for k, v in state_dict.items()
                      if k.startswith("visual.trunk.")}
    if any(k.startswith("downsample_layers.") for k in state_dict):
        rules = _OFFICIAL_RULES
    elif "stem.0.weight" in state_dict:
        rules = _TIMM_RULES
    else:
        rules = []  # already in our layout
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = _rename(key, rules)
        stage = re.match(r"^stages\.(\d+)\.", key)
        if _CLASSIFIER.match(key) or (stage and int(stage.group(1)) >= len(model.stages)):
            continue
        if key in ours and ours[key].ndim == 2 and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value.reshape(value.shape[:2])  # (O, I, 1, 1) -> (O, I)
        out[key] = value
    return out


# --- variants ---------------------------------------------------------------------------------

#: what a run builds every variant with unless model.backbone_kwargs says otherwise: 3^d depthwise
#: kernels, a third of the 7^d backbone's time at the same Dice (docs/figures.md); timm's 2D weights
#: need the published 7: model.backbone_kwargs={"kernel_size": 7}. ``build_backbone`` by name alone
#: (and ``ConvNeXt``) keeps the published 7, as timm does.
RUN_DEFAULTS = {"kernel_size": 3}


def _create(spatial_dims: int, in_chans: int, depths: tuple[int, ...], dims: tuple[int, ...],
            kwargs: dict[str, Any]) -> ConvNeXt:
    fixed = dict(spatial_dims=spatial_dims, in_chans=in_chans, depths=depths, dims=dims)
    return build_checked(ConvNeXt, "ConvNeXt", fixed, kwargs)


@BACKBONES.register(defaults=RUN_DEFAULTS)
def convnext_atto(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> ConvNeXt:
    return _create(spatial_dims, in_chans, (2, 2, 6, 2), (40, 80, 160, 320), kwargs)


@BACKBONES.register(defaults=RUN_DEFAULTS)
def convnext_femto(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> ConvNeXt:
    return _create(spatial_dims, in_chans, (2, 2, 6, 2), (48, 96, 192, 384), kwargs)


@BACKBONES.register(defaults=RUN_DEFAULTS)
def convnext_pico(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> ConvNeXt:
    return _create(spatial_dims, in_chans, (2, 2, 6, 2), (64, 128, 256, 512), kwargs)


@BACKBONES.register(defaults=RUN_DEFAULTS)
def convnext_nano(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> ConvNeXt:
    return _create(spatial_dims, in_chans, (2, 2, 8, 2), (80, 160, 320, 640), kwargs)


@BACKBONES.register(defaults=RUN_DEFAULTS)
def convnext_tiny(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> ConvNeXt:
    return _create(spatial_dims, in_chans, (3, 3, 9, 3), (96, 192, 384, 768), kwargs)


@BACKBONES.register(defaults=RUN_DEFAULTS)
def convnext_small(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> ConvNeXt:
    return _create(spatial_dims, in_chans, (3, 3, 27, 3), (96, 192, 384, 768), kwargs)


@BACKBONES.register(defaults=RUN_DEFAULTS)
def convnext_base(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> ConvNeXt:
    return _create(spatial_dims, in_chans, (3, 3, 27, 3), (128, 256, 512, 1024), kwargs)
