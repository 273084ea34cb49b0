"""U-Net decoder coarse head: the backbone's levels decoded back to a fine stride, 2D and 3D.

Why: the backbones open with a stride-4 patchify (ConvNeXt) or stride-2 convs (RepVGG), so a
DeepLab head gives coarse logits at stride 8: 5x7x5 cells on a 40x56x40 hippocampus patch, for a
structure a few voxels thick.  U-Nets win such tasks because their last decoder stage sees the
full-resolution input.  This head keeps the backbone as the encoder and adds what a U-Net has and
the backbone lacks:

* the model's learned input stages (``input_s2``, ...: ``seg.model.InputStages``, two 3^d
  conv-norm-LeakyReLU each, the first strided, nnU-Net's first encoder stages in miniature) as
  skip levels at the strides finer than the backbone's finest level, read from the feature dict
  like any other level; with ``output_stride=1`` the head adds its own stage on the input at
  stride 1 (``stride1_channels`` wide);
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

from .base import INPUT, FeatureInfo, HeadOutput, input_level, learned_levels
from .registry import HEADS


@HEADS.register("unet")
class UNetHead(nn.Module):
    """U-Net decoder over the model's learned levels (module docstring).

    Args:
        feature_info: the model's levels, fine to coarse (``heads.base``): the ``input`` level (read
            only with ``output_stride=1``), the input stages and the backbone's levels (per-axis
            strides powers of two).
        num_classes: K.
        spatial_dims: 2 or 3.
        output_stride: stride of the logits: 1, or the stride of a learned level.
        stride1_channels: width of the head's own stage on the input at stride 1 (built only with
            ``output_stride=1``).
        max_channels: cap on decoder widths.
        norm: normalisation ('instance' as nnU-Net; 'group', 'batch').
        deep_supervision: coarser decoder stages that also predict during training (at most
            this many: as many as the decoder has).

    Attributes:
        output_stride: per-axis stride of the coarse logits.
        in_features: the names of the levels it reads.
    """

    def __init__(self, feature_info: Sequence[FeatureInfo], num_classes: int, spatial_dims: int,
                 output_stride: int = 2, stride1_channels: int = 16, max_channels: int = 320,
                 norm: str = "instance", deep_supervision: int = 2) -> None:
        super().__init__()
        d = spatial_dims
        in_channels = input_level(feature_info, "the unet head").channels
        learned = learned_levels(feature_info)
        if output_stride < 1 or output_stride & (output_stride - 1):
            raise ConfigError(f"unet head output_stride must be a power of two, got {output_stride}")
        for level in learned:
            if any(s & (s - 1) for s in level.stride):
                raise ConfigError(f"unet head needs power-of-two strides, level {level.name!r} "
                                  f"has {level.stride}")
        keep = [f for f in learned if max(f.stride) >= output_stride]
        self.stride1 = None
        if output_stride == 1:                   # the head's own full-resolution stage
            self.stride1 = ops.conv_block(d, in_channels, stride1_channels, 1, norm)
        elif not keep or max(keep[0].stride) != output_stride:
            raise ConfigError(f"unet head output_stride {output_stride} is none of this model's "
                              f"strides {[max(f.stride) for f in learned]} (finer strides come "
                              "from model.input_stages)")
        self.level_names = [f.name for f in keep]
        self.in_features = ([INPUT] if self.stride1 is not None else []) + self.level_names
        levels = [(f.channels, tuple(f.stride)) for f in keep]
        if self.stride1 is not None:
            levels.insert(0, (stride1_channels, (1,) * d))
        self.output_stride = levels[0][1]
        # decoder: deepest level upwards; stage i fuses (upsampled previous, skip level i)
        self.decoder = nn.ModuleList()
        self.classifiers = nn.ModuleList()
        up_channels = levels[-1][0]
        self.decoder_levels = list(range(len(levels) - 2, -1, -1))
        widths_out = []
        for i in self.decoder_levels:
            skip = levels[i][0]
            width = min(max_channels, skip)
            self.decoder.append(ops.conv_block(d, up_channels + skip, width, 1, norm))
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
        maps = [features[name] for name in self.level_names]
        if self.stride1 is not None:
            maps.insert(0, self.stride1(features[INPUT]))
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

