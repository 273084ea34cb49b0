"""RepVGG backbone, one implementation for 2D and 3D.

Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021
(https://arxiv.org/abs/2101.03697); official code https://github.com/DingXiaoH/RepVGG.

Five stages of 3x3 blocks (stage0 is the one-block stem), the first block of each stage strided.
A training-time block sums three branches and applies ReLU::

    y = ReLU(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x))      # BN(x) only if C_in == C_out, stride 1

``RepVGGBlock.reparameterize()`` folds the three branches into one 3x3 conv with bias, so that the
deployed network is a plain stack of conv + ReLU (``reparameterize_model`` does the whole model).

Output sizes: every 3x3 conv has padding 1 (the 1x1 branch padding 0), so a stage with stride ``s``
on an axis maps size ``n`` to ``ceil(n / s)``; the stage-``i`` feature therefore has size
``ceil(n / stride_i)`` per axis, with ``stride_i`` the product of the per-axis strides of stages
0..i (declared in ``feature_info``). Any input size works, odd and non-cubic included.

Module names follow timm's ``byobnet`` RepVGG (``stem``, ``stages.i.j``, ``conv_kxk``, ``conv_1x1``,
``identity``, ``reparam_conv``), so timm checkpoints load after dropping the classifier;
``checkpoint_filter_fn`` also renames the official training layout (``stage0.rbr_dense`` ...).
"""
from __future__ import annotations

import copy
import re
from typing import Any, Sequence

import torch
import torch.nn as nn

from seg.errors import UserError
from seg.ops import DropPath, batch_norm, check_spatial_dims, conv, to_ntuple

from .base import Backbone, FeatureInfo, build_checked, check_out_indices, per_stage, run_blocks
from .pretrained import adapt_input_conv
from .registry import BACKBONES

#: Stage widths before the width multipliers (stage0 = stem; widths of stages 1..4).
BASE_WIDTHS = (64, 128, 256, 512)
#: Block layer indices (stem = 0, counted over the whole network) that the paper's g2/g4 variants
#: make grouped.
GROUPED_LAYERS = tuple(range(2, 27, 2))
A_DEPTHS = (2, 4, 14, 1)
B_DEPTHS = (4, 6, 16, 1)


class ConvBn(nn.Module):
    """Conv (no bias) followed by BatchNorm; one branch of a training-time block."""

    def __init__(self, spatial_dims: int, in_chans: int, out_chans: int, kernel_size: int,
                 stride: Sequence[int], groups: int) -> None:
        super().__init__()
        self.conv = conv(spatial_dims, in_chans, out_chans, kernel_size, stride=stride,
                         groups=groups, bias=False)  # padding (k - 1) // 2: 1 for 3x3, 0 for 1x1
        self.bn = batch_norm(spatial_dims, out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def fuse_bn(kernel: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding bias-free conv.

    Args:
        kernel: conv weight (C_out, C_in / groups, *k).
        bn: BatchNorm over C_out channels (its running statistics are used).

    Returns:
        (kernel * gamma / std, beta - mean * gamma / std): weight (C_out, C_in / groups, *k) and
        bias (C_out,).
    """
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
    shape = (-1,) + (1,) * (kernel.ndim - 1)
    return kernel * scale.reshape(shape), bn.bias - bn.running_mean * scale


def identity_kernel(channels: int, groups: int, spatial_dims: int, like: torch.Tensor
                    ) -> torch.Tensor:
    """The 1x1 (or 1x1x1) grouped conv kernel that maps x to x.

    Output channel ``i`` lies in group ``i // (C / g)`` and sees that group's inputs, of which it
    must pick its own, the ``i % (C / g)``-th one.

    Returns:
        (C, C / groups, *(1,) * spatial_dims) tensor with ``like``'s dtype and device.
    """
    per_group = channels // groups
    kernel = like.new_zeros((channels, per_group) + (1,) * spatial_dims)
    rows = torch.arange(channels, device=like.device)
    kernel[rows, rows % per_group] = 1.0
    return kernel


def pad_to_kernel(kernel: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Zero-pad a 1x1 kernel (C_out, C_in, *1) into the centre of an odd ``size`` kernel."""
    pad: list[int] = []
    for k in reversed(tuple(size)):  # F.pad lists the last axis first
        pad += [(k - 1) // 2, (k - 1) // 2]
    return nn.functional.pad(kernel, pad)


class RepVGGBlock(nn.Module):
    """Training-time RepVGG block; ``reparameterize()`` turns it into conv3x3 + ReLU.

    Args:
        spatial_dims: 2 or 3.
        in_chans: input channels.
        out_chans: output channels.
        stride: int or per-axis stride of both convs.
        groups: groups of the 3x3 and 1x1 convs.
        drop_path: stochastic-depth rate applied to the conv branches' sum, only in blocks that
            have the identity branch (timm's choice; the paper has no drop path).
    """

    def __init__(self, spatial_dims: int, in_chans: int, out_chans: int, stride: Any = 1,
                 groups: int = 1, drop_path: float = 0.0) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.stride = tuple(to_ntuple(stride, spatial_dims))
        self.groups = groups
        has_identity = in_chans == out_chans and all(s == 1 for s in self.stride)
        self.identity = batch_norm(spatial_dims, out_chans) if has_identity else None
        self.conv_kxk = ConvBn(spatial_dims, in_chans, out_chans, 3, self.stride, groups)
        self.conv_1x1 = ConvBn(spatial_dims, in_chans, out_chans, 1, self.stride, groups)
        self.drop_path = DropPath(drop_path) if has_identity and drop_path > 0 else nn.Identity()
        self.act = nn.ReLU()
        self.reparam_conv: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, *S) -> (N, C_out, *ceil(S / stride))."""
        if self.reparam_conv is not None:
            return self.act(self.reparam_conv(x))
        y = self.drop_path(self.conv_kxk(x) + self.conv_1x1(x))
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)

    @torch.no_grad()
    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel (C_out, C_in / g, *3) and bias (C_out,) of the single equivalent conv.

        Uses the BatchNorms' running statistics, so it reproduces the block in eval mode.
        """
        kernel, bias = fuse_bn(self.conv_kxk.conv.weight, self.conv_kxk.bn)
        size = kernel.shape[2:]
        k1, b1 = fuse_bn(self.conv_1x1.conv.weight, self.conv_1x1.bn)
        kernel, bias = kernel + pad_to_kernel(k1, size), bias + b1
        if self.identity is not None:
            eye = identity_kernel(kernel.shape[0], self.groups, self.spatial_dims, kernel)
            ki, bi = fuse_bn(eye, self.identity)
            kernel, bias = kernel + pad_to_kernel(ki, size), bias + bi
        return kernel, bias

    def reparameterize(self) -> None:
        """Replace the three branches by one conv with bias (in place; a no-op once fused)."""
        if self.reparam_conv is not None:
            return
        kernel, bias = self.fused_kernel_bias()
        dense = self.conv_kxk.conv
        fused = conv(self.spatial_dims, dense.in_channels, dense.out_channels, dense.kernel_size,
                     stride=dense.stride, padding=dense.padding, groups=dense.groups, bias=True)
        fused = fused.to(device=kernel.device, dtype=kernel.dtype)
        fused.weight.data.copy_(kernel)
        fused.bias.data.copy_(bias)
        self.reparam_conv = fused
        self.conv_kxk = self.conv_1x1 = self.identity = None
        self.drop_path = nn.Identity()


class RepVGG(Backbone):
    """RepVGG feature extractor for 2D or 3D inputs.

    Args:
        spatial_dims: 2 or 3.
        in_chans: input channels.
        depths: blocks in stages 1..4 (stage0, the stem, is one block).
        width_multipliers: the paper's (a, b): stage widths min(64, 64a), 64a, 128a, 256a, 512b.
        groups: groups of the 3x3/1x1 convs in the blocks listed by ``grouped_layers``.
        grouped_layers: global block indices (stem = 0) that use ``groups``; default the paper's
            2, 4, ..., 26.
        strides: stride of stages 0..4: one int/tuple for all, or five entries, each an int or a
            per-axis tuple in tensor axis order, e.g. ``((1, 2, 2), (1, 2, 2), 2, 2, 2)`` for
            thick-slice volumes.
        out_indices: stages to return (0 = stem at stride 2; default 1..4 at strides 4..32).
            Stages after the last one listed are not built.
        drop_path_rate: stochastic depth, rising linearly over the blocks to this value; applied
            to the conv-branch sum of the blocks with an identity branch (not in the paper).
        grad_checkpointing: recompute each block in backward (``torch.utils.checkpoint``) while
            training. Recomputation runs BatchNorm twice, so running statistics update twice.
    """

    #: Our key of the first 3x3 conv weight (the generic loader adapts it to ``in_chans``; the
    #: stem's other convs, 1x1 branch or fused conv, are adapted by ``checkpoint_filter_fn``).
    stem_key = "stem.conv_kxk.conv.weight"

    def __init__(self, spatial_dims: int, in_chans: int = 1, depths: Sequence[int] = A_DEPTHS,
                 width_multipliers: Sequence[float] = (0.75, 2.5), groups: int = 1,
                 grouped_layers: Sequence[int] = GROUPED_LAYERS, strides: Any = 2,
                 out_indices: Sequence[int] = (1, 2, 3, 4), drop_path_rate: float = 0.0,
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if spatial_dims not in (2, 3):
            raise ValueError(f"RepVGG needs spatial_dims 2 or 3, got {spatial_dims}")
        self.out_indices = check_out_indices(out_indices, len(depths) + 1)
        self.grad_checkpointing = grad_checkpointing
        stage_strides = per_stage(strides, len(depths) + 1, spatial_dims)
        widths = stage_widths(width_multipliers)
        self.feature_info: list[FeatureInfo] = []
        total = [1] * spatial_dims

        def declare(index: int, channels: int, stride: Sequence[int]) -> None:
            for axis, s in enumerate(stride):
                total[axis] *= s
            if index in self.out_indices:
                self.feature_info.append(FeatureInfo(f"stage{index}", channels, tuple(total)))

        self.stem = RepVGGBlock(spatial_dims, in_chans, widths[0], stage_strides[0])
        declare(0, widths[0], stage_strides[0])
        rates = _drop_path_rates(drop_path_rate, sum(depths))
        stages, layer, prev = [], 1, widths[0]
        for i in range(1, max(self.out_indices) + 1):
            blocks = []
            for j in range(depths[i - 1]):
                g = groups if layer in grouped_layers else 1
                blocks.append(RepVGGBlock(spatial_dims, prev, widths[i],
                                          stage_strides[i] if j == 0 else 1, g, rates[layer - 1]))
                prev, layer = widths[i], layer + 1
            stages.append(nn.Sequential(*blocks))
            declare(i, widths[i], stage_strides[i])
        self.stages = nn.ModuleList(stages)

    def _block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return run_blocks([block], x, self.grad_checkpointing and self.training)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, C_in, *S) -> {"stage<i>": (N, C_i, *ceil(S / stride_i))} for i in out_indices."""
        out: dict[str, torch.Tensor] = {}
        x = self._block(self.stem, x)  # (N, C_0, *ceil(S / 2))
        if 0 in self.out_indices:
            out["stage0"] = x
        for i, stage in enumerate(self.stages, start=1):
            for block in stage:
                x = self._block(block, x)
            if i in self.out_indices:
                out[f"stage{i}"] = x
        return out


def stage_widths(width_multipliers: Sequence[float]) -> list[int]:
    """Widths of stages 0..4 from the paper's (a, b): min(64, 64a), 64a, 128a, 256a, 512b."""
    a, b = width_multipliers
    return [min(64, int(64 * a))] + [int(c * a) for c in BASE_WIDTHS[:3]] + [int(512 * b)]





def _drop_path_rates(rate: float, num_blocks: int) -> list[float]:
    """Linearly rising stochastic-depth rates for blocks 1..num_blocks (the stem gets none)."""
    return [rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fuse every block that has ``reparameterize()`` (RepVGG blocks) into a plain conv.

    The fused model equals the training-form model in eval mode (BatchNorm running statistics are
    folded in); call ``.eval()`` on it before use.

    Args:
        model: any module containing RepVGG-style blocks.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The fused model (``model`` itself when ``inplace``).
    """
    if not inplace:
        model = copy.deepcopy(model)
    blocks = [m for m in model.modules()
              if m is not model and callable(getattr(m, "reparameterize", None))]
    for block in blocks:
        block.reparameterize()
    return model


# key renaming ------------------------------------------------------------------------------------
_OFFICIAL_BRANCHES = {"rbr_dense.": "conv_kxk.", "rbr_1x1.": "conv_1x1.",
                      "rbr_identity.": "identity.", "rbr_reparam.": "reparam_conv."}
_CLASSIFIER = ("linear.", "head.", "fc.", "final_conv.")


def _rename_official(key: str) -> str:
    """``stage0.x`` -> ``stem.x``; ``stage<i>.<j>.x`` -> ``stages.<i-1>.<j>.x``; branch names."""
    match = re.match(r"stage(\d+)\.(.*)", key)
    if match:
        i, rest = int(match.group(1)), match.group(2)
        key = "stem." + rest if i == 0 else f"stages.{i - 1}.{rest}"
    for old, new in _OFFICIAL_BRANCHES.items():
        key = key.replace(old, new)
    return key


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: RepVGG
                         ) -> dict[str, torch.Tensor]:
    """Rename an official (DingXiaoH) or timm RepVGG state dict into this module's layout.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` and ``module.`` prefixes, drops the
    classifier and the stages the model did not build. The stem has a second conv that sees the
    input channels, the 1x1 branch: it is fitted to ``in_chans`` here with the loader's rule
    (``adapt_input_conv``: RGB summed for one channel), while ``stem_key`` is left to the generic
    loader. Kernels stay 2D: the loader inflates them to 3D.

    Raises:
        UserError: a re-parameterised (deploy) checkpoint for a training-form model.
    """
    for wrapper in ("state_dict", "model"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    built = len(model.stages)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = _rename_official(key.removeprefix("module."))
        if key.startswith(_CLASSIFIER):
            continue
        match = re.match(r"stages\.(\d+)\.", key)
        if match and int(match.group(1)) >= built:
            continue
        out[key] = value
    model_keys = model.state_dict().keys()
    _fit_stem_inputs(out, model)
    if any("reparam_conv." in k for k in out) and not any("reparam_conv." in k for k in model_keys):
        raise UserError("re-parameterised (deploy) RepVGG checkpoint: load a training-form one, "
                         "or call reparameterize_model(model, inplace=True) before loading")
    return out


def _fit_stem_inputs(state_dict: dict[str, torch.Tensor], model: RepVGG) -> None:
    """Adapt, in place, the input channels of every stem conv weight except ``stem_key``."""
    ours = model.state_dict()
    for key, value in state_dict.items():
        target = ours.get(key)
        if (key.startswith("stem.") and key.endswith("weight") and key != model.stem_key
                and target is not None and value.ndim >= 3 and value.shape[1] != target.shape[1]):
            state_dict[key] = adapt_input_conv(value, target.shape[1])  # (O, I, *k) -> (O, C, *k)


# variants (the paper's Table 2) ------------------------------------------------------------------
#: name -> (depths of stages 1..4, width multipliers (a, b), groups of the grouped layers)
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[float, float], int]] = {
    "repvgg_a0": (A_DEPTHS, (0.75, 2.5), 1),
    "repvgg_a1": (A_DEPTHS, (1.0, 2.5), 1),
    "repvgg_a2": (A_DEPTHS, (1.5, 2.75), 1),
    "repvgg_b0": (B_DEPTHS, (1.0, 2.5), 1),
    "repvgg_b1": (B_DEPTHS, (2.0, 4.0), 1),
    "repvgg_b1g2": (B_DEPTHS, (2.0, 4.0), 2),
    "repvgg_b1g4": (B_DEPTHS, (2.0, 4.0), 4),
}


def _build(name: str, spatial_dims: int, in_chans: int, kwargs: dict[str, Any]) -> RepVGG:
    depths, widths, groups = VARIANTS[name]
    fixed = dict(spatial_dims=spatial_dims, in_chans=in_chans, depths=depths,
                 width_multipliers=widths, groups=groups)
    return build_checked(RepVGG, "RepVGG", fixed, kwargs)


@BACKBONES.register()
def repvgg_a0(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> RepVGG:
    return _build("repvgg_a0", spatial_dims, in_chans, kwargs)


@BACKBONES.register()
def repvgg_a1(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> RepVGG:
    return _build("repvgg_a1", spatial_dims, in_chans, kwargs)


@BACKBONES.register()
def repvgg_a2(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> RepVGG:
    return _build("repvgg_a2", spatial_dims, in_chans, kwargs)


@BACKBONES.register()
def repvgg_b0(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> RepVGG:
    return _build("repvgg_b0", spatial_dims, in_chans, kwargs)


@BACKBONES.register()
def repvgg_b1(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> RepVGG:
    return _build("repvgg_b1", spatial_dims, in_chans, kwargs)


@BACKBONES.register()
def repvgg_b1g2(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> RepVGG:
    return _build("repvgg_b1g2", spatial_dims, in_chans, kwargs)


@BACKBONES.register()
def repvgg_b1g4(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> RepVGG:
    return _build("repvgg_b1g4", spatial_dims, in_chans, kwargs)
