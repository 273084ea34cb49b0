"""U-Net decoder coarse head: the backbone's levels decoded back to a fine stride, 2D and 3D.

Why: the backbones open with a stride-4 patchify (ConvNeXt) or stride-2 convs (RepVGG), so a
DeepLab head gives coarse logits at stride 8: 5x7x5 cells on a 40x56x40 hippocampus patch, for a
structure a few voxels thick.  U-Nets win such tasks because their last decoder stage sees the
full-resolution input.  This head keeps the backbone as the encoder and adds what a U-Net has and
the backbone lacks:

* ``input stages``: light conv stages on the *input* (the model's ``input`` level, stride 1, read
  from the feature dict like any other level) at the strides finer than the backbone's
  finest level and not finer than the logits (stride 2, or 1 and 2, for ConvNeXt), nnU-Net's
  first encoder stages in miniature (two 3^d conv-norm-LeakyReLU each, the first strided; narrow
  by default (``input_channels``): at stride 2 this stage and its decoder stage cost most of the
  head's FLOPs; twice the default width there made backbone + head about 1.6x slower on a 40x56x40
  patch);
* a decoder: from the deepest level, upsample x2 (trilinear), concatenate the next finer level
  (backbone level or input stage), two 3^d conv-norm-LeakyReLU; the width of each decoder stage is
  its skip's width (capped by ``max_channels``);
* logits at ``output_stride`` (the default, 2, leaves PointRend the last factor 2: its subdivision
  has a stride-1 step to render; 1 gives full-resolution logits and leaves the point head only
  its training loss).

Deep supervision: with ``deep_supervision=k`` the head also returns logits of the ``k`` next
coarser decoder stages during training (``HeadOutput.aux``, empty when not ``self.training``); ``SegmentationModel.loss`` weights main and auxiliary terms 1, 1/2, 1/4, ...
normalised to sum 1 (``seg.losses.deep_supervision_weights``), each auxiliary term against the
labels nearest-resampled to its grid.  nnU-Net halves its weights the same way but supervises
every decoder stage and gives the lowest-resolution output weight 0.

The defaults of every option are those of ``UNetHead``'s signature (the one place they are set).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from seg import ops
from seg.errors import ConfigError

from .base import INPUT, FeatureInfo, HeadOutput, backbone_levels, input_level
from .registry import HEADS


def conv_block(spatial_dims: int, cin: int, cout: int, stride: Sequence[int] | int = 1,
               norm: str = "instance") -> nn.Sequential:
    """Two 3^d conv -> norm -> LeakyReLU(0.01) (the first with ``stride``), as nnU-Net's stages."""
    def one(ci: int, s) -> list[nn.Module]:
        return [ops.conv(spatial_dims, ci, cout, 3, stride=s, bias=False),
                ops.norm(norm, spatial_dims, cout, num_groups=max(1, cout // 8)),
                nn.LeakyReLU(0.01, inplace=True)]
    return nn.Sequential(*one(cin, stride), *one(cout, 1))


@HEADS.register("unet")
class UNetHead(nn.Module):
    """U-Net decoder over the backbone levels plus light input stages (module docstring).

    Args:
        feature_info: the model's levels, fine to coarse (``heads.base``): the ``input`` level (its
            channels feed the input stages) and the backbone's (per-axis strides powers of two);
            the model's ``fine_stem`` level, if any, is not read.
        num_classes: K.
        spatial_dims: 2 or 3.
        output_stride: stride of the logits: 1, 2, or any finer-or-equal power of two of a level.
        input_channels: widths of the input stages at strides 1, 2, 4, ... below the backbone's
            finest level (the stages finer than ``output_stride`` are not built).
        max_channels: cap on decoder widths.
        norm: normalisation ('instance' as nnU-Net; 'group', 'batch').
        deep_supervision: coarser decoder stages that also predict during training (at most
            this many: as many as the decoder has).

    Attributes:
        output_stride: per-axis stride of the coarse logits.
    """

    def __init__(self, feature_info: Sequence[FeatureInfo], num_classes: int, spatial_dims: int,
                 output_stride: int = 2, input_channels: Sequence[int] = (16, 16),
                 max_channels: int = 320, norm: str = "instance", deep_supervision: int = 2) -> None:
        super().__init__()
        d = spatial_dims
        in_channels = input_level(feature_info, "the unet head").channels
        feature_info = backbone_levels(feature_info)
        finest = tuple(feature_info[0].stride)
        if output_stride < 1 or output_stride & (output_stride - 1):
            raise ConfigError(f"unet head output_stride must be a power of two, got {output_stride}")
        for level in feature_info:
            if any(s & (s - 1) for s in level.stride):
                raise ConfigError(f"unet head needs power-of-two strides, level {level.name!r} "
                                  f"has {level.stride}")
        # input stages: strides 1, 2, ... up to (not including) the finest backbone level; a
        # per-axis stride stops growing on an axis the backbone does not reduce
        stages: list[tuple[int, ...]] = []
        stride = (1,) * d
        while any(s < f for s, f in zip(stride, finest)):
            stages.append(stride)
            stride = tuple(min(2 * s, f) for s, f in zip(stride, finest))
        widths = list(input_channels)
        if len(widths) < len(stages):
            raise ConfigError(f"unet head input_channels {tuple(input_channels)} gives {len(widths)} "
                              f"input stages; this backbone needs {len(stages)} (strides "
                              f"{[s for s in stages]})")
        self.input_stages = nn.ModuleList()
        levels: list[tuple[int, tuple[int, ...]]] = []   # (channels, stride), fine to coarse
        cin, prev = in_channels, (1,) * d
        for width, st in zip(widths, stages):
            if max(st) < output_stride:          # finer than the logits: not computed
                continue
            step = tuple(a // b for a, b in zip(st, prev))
            self.input_stages.append(conv_block(d, cin, width, step, norm))
            levels.append((width, st))
            cin, prev = width, st
        self.level_names = [f.name for f in feature_info]
        levels += [(f.channels, tuple(f.stride)) for f in feature_info]
        keep = [i for i, (_, st) in enumerate(levels) if max(st) >= output_stride]
        if not keep or max(levels[keep[0]][1]) != output_stride:
            raise ConfigError(f"unet head output_stride {output_stride} is none of this model's "
                              f"strides {[max(st) for _, st in levels]}")
        self.first = keep[0]                     # the decoder stops at this level
        self.output_stride = levels[self.first][1]
        # decoder: deepest level upwards; stage i fuses (upsampled previous, skip level i)
        self.decoder = nn.ModuleList()
        self.classifiers = nn.ModuleList()
        up_channels = levels[-1][0]
        self.decoder_levels = list(range(len(levels) - 2, self.first - 1, -1))
        widths_out = []
        for i in self.decoder_levels:
            skip = levels[i][0]
            width = min(max_channels, skip)
            self.decoder.append(conv_block(d, up_channels + skip, width, 1, norm))
            widths_out.append(width)
            up_channels = width
        if not self.decoder_levels:              # output at the deepest level: no decoding
            widths_out = [levels[-1][0]]
        if int(deep_supervision) < 0:
            raise ConfigError(f"unet head deep_supervision must be >= 0, got {deep_supervision}")
        self.deep_supervision = min(int(deep_supervision), len(widths_out) - 1)
        # classifiers: the last (finest) decoder stage, then the aux ones coarser
        for width in widths_out[::-1][:1 + self.deep_supervision]:
            self.classifiers.append(ops.conv(d, width, num_classes, 1))
        self.num_levels = len(levels)

    def forward(self, features: dict[str, torch.Tensor]) -> HeadOutput:
        """Logits (N, K, *S / output_stride); the aux logits in training with deep supervision."""
        maps, x = [], features[INPUT]
        for stage in self.input_stages:
            x = stage(x)
            maps.append(x)
        maps += [features[name] for name in self.level_names]
        x = maps[-1]
        outs = []
        for i, block in zip(self.decoder_levels, self.decoder):
            skip = maps[i]
            x = block(torch.cat([ops.resize(x, skip.shape[2:], mode="linear"), skip], dim=1))
            outs.append(x)
        if not outs:
            outs = [x]
        logits = self.classifiers[0](outs[-1])
        if not (self.training and self.deep_supervision):
            return HeadOutput(logits)
        return HeadOutput(logits, [clf(outs[-2 - j]) for j, clf in enumerate(self.classifiers[1:])])

