"""CMT ("CMT: Convolutional Neural Networks Meet Vision Transformers", Guo et al. CVPR 2022): one
implementation for 2D and 3D.

Layout: a convolutional stem (3^d conv stride 2, then two 3^d convs; each conv -> GELU -> BatchNorm,
as in the authors' code), then four stages, each opened by a patch aggregation (conv with kernel =
stride = 2, channels-first LayerNorm) and made of CMT blocks on channels-first maps (N, C, *S)::

    LPU:    x = x + DWConv_3(x)
    LMHSA:  x = x + drop_path(Attn(LN(x)))     queries: every position; keys and values: the
                                               LN'd map reduced by a depthwise conv with kernel =
                                               stride = k (k = 8, 4, 2, 1) + LayerNorm
    IRFFN:  x = x + drop_path(FFN(LN(x)))      FFN: 1x1 C->rC, GELU, BN; h + DWConv_3(h), GELU,
                                               BN; 1x1 rC->C, BN

Relative position bias (our choice, the paper's table is frozen to one input size): the authors
learn one free value per head and per (query, reduced key) pair, a (heads, N, N / k^2) tensor for
a fixed 224^2 input.  Here the bias is a function of geometry, so any input size and any number of
spatial axes work: the query position ``i`` (stage grid) is mapped to the reduced grid,
``(i + 1/2) / k - 1/2`` (centre alignment), and its offset ``r`` to the reduced key position ``j``
(per axis, in reduced cells) enters a small MLP, ``d -> 64 -> ReLU -> heads``, through the
log-spaced coordinate ``sign(r) log2(1 + |r|)`` (as Swin V2 does, so larger inputs extrapolate
gently).  The MLP is evaluated once per stage and forward on the distinct offsets only (about
``prod(2 S_i)`` of them) and gathered into the (heads, N_q, N_k) bias; like the authors' table it
is shared by all blocks of a stage.  Geometry tables are cached pure functions of the sizes;
nothing size-dependent is stored in the module or its state dict.

Per-axis strides: ``strides`` gives the factors of the stem conv and of the four patch
aggregations (5 entries, default 2 each: stage strides 4, 8, 16, 32); the key reduction of stage i
defaults to (stride of the last stage) / (stride of stage i) per axis, which gives 8, 4, 2, 1 for
the default strides and keeps every stage's keys on the coarsest grid for anisotropic ones
(override with ``sr_ratios``).  Every stride-s layer yields ``ceil(size / s)`` per axis (the stem
conv by its padding of 1, the others by zero-padding the end of each axis to a multiple of s).

Pretrained weights: none are published in timm; ``checkpoint_filter_fn`` reads our own layout
(dropping classifier keys and unbuilt stages) and, for a 3D model, gives the 2D position-bias MLP a
zero depth column.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from seg import ops
from seg.errors import ConfigError

from .base import (FeatureInfo, StagedBackbone, build_checked, check_out_indices, pad_to_multiple,
                   per_stage)
from .registry import BACKBONES

__all__ = ["CMT", "CMTBlock", "LightweightAttention", "RelativePositionBias",
           "checkpoint_filter_fn", "relative_geometry"]


# ----------------------------------------------------------------------------------------------
# Position-bias geometry: a pure function of sizes, written once for d axes
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def relative_geometry(size: tuple[int, ...], ratio: tuple[int, ...], device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct (query, reduced key) offsets and the offset of every pair.

    Per axis with stage size ``s``, reduction ``k`` and reduced size ``m = ceil(s / k)``, query
    ``i`` and key ``j`` differ by ``r = ((i + 1/2) / k - 1/2) - j`` reduced cells; ``i - k j`` takes
    ``u = s + k (m - 1)`` distinct values.

    Args:
        size: stage grid (S_0, ..., S_{d-1}).
        ratio: per-axis reduction k.
        device: where the tables live.

    Returns:
        coords: (prod u_a, d) float32 ``sign(r) log2(1 + |r|)``, row-major over the offsets.
        index: (prod S_a, prod m_a) int64 row of ``coords`` for each (query, key) pair, queries and
            keys row-major (the order of ``flatten`` on (N, *S, C) maps).
    """
    with torch.inference_mode(False):  # a cached tensor must stay usable by autograd later
        d = len(size)
        index = torch.zeros((1,) * (2 * d), dtype=torch.long, device=device)
        offsets = []
        for axis, (s, k) in enumerate(zip(size, ratio)):
            m = -(-s // k)
            i = torch.arange(s, device=device)
            j = torch.arange(m, device=device)
            diff = i[:, None] - k * j[None, :] + k * (m - 1)  # (s, m) in [0, u)
            view = [1] * (2 * d)
            view[axis], view[d + axis] = s, m
            u = s + k * (m - 1)
            index = index * u + diff.view(view)  # (S_0, ..., S_{d-1}, m_0, ..., m_{d-1})
            offsets.append((torch.arange(u, device=device) - k * (m - 1) + 0.5 - k / 2) / k)
        grid = torch.stack(torch.meshgrid(*offsets, indexing="ij"), dim=-1).reshape(-1, d)
        coords = torch.sign(grid) * torch.log2(1.0 + grid.abs())  # (prod u_a, d)
        return coords.float(), index.reshape(math.prod(size), -1)


class RelativePositionBias(nn.Module):
    """Per-head bias of every (query, reduced key) pair from an MLP over relative coordinates.

    Args:
        spatial_dims: d.
        num_heads: attention heads.
        ratio: per-axis key reduction k of the stage.
        hidden: hidden width of the MLP.
    """

    def __init__(self, spatial_dims: int, num_heads: int, ratio: Sequence[int], hidden: int = 64
                 ) -> None:
        super().__init__()
        self.ratio = tuple(int(k) for k in ratio)
        self.mlp = nn.Sequential(nn.Linear(spatial_dims, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, num_heads))

    def forward(self, size: Sequence[int]) -> torch.Tensor:
        """Bias for a stage grid of ``size``: (heads, prod S, prod ceil(S / k))."""
        weight = self.mlp[0].weight
        coords, index = relative_geometry(tuple(int(s) for s in size), self.ratio, weight.device)
        table = self.mlp(coords.to(weight.dtype))  # (U, heads)
        return table.t()[:, index]  # (heads, N_q, N_k)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------
class SpatialReduction(nn.Module):
    """Keys/values source: pad to a multiple of k, depthwise conv kernel = stride = k, LayerNorm;
    (N, C, *S) -> (N, C, *ceil(S / k))."""

    def __init__(self, spatial_dims: int, dim: int, ratio: Sequence[int]) -> None:
        super().__init__()
        self.ratio = tuple(ratio)
        self.conv = ops.conv(spatial_dims, dim, dim, self.ratio, stride=self.ratio, padding=0,
                             groups=dim)
        self.norm = ops.LayerNormChannelsFirst(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(pad_to_multiple(x, self.ratio)))


class LightweightAttention(nn.Module):
    """Multi-head attention of every position to spatially reduced keys and values.

    Args:
        spatial_dims: 2 or 3.
        dim: channels C.
        num_heads: heads h (C divisible by h).
        ratio: per-axis reduction k of keys and values (all ones: none, no extra layers).
        qkv_bias: biases in the q, k, v projections.
        attn_drop: dropout on attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(self, spatial_dims: int, dim: int, num_heads: int, ratio: Sequence[int],
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.reduce = (SpatialReduction(spatial_dims, dim, ratio) if any(k > 1 for k in ratio)
                       else nn.Identity())
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Attend.

        Args:
            x: (N, *S, C) channels-last map (already normalised).
            bias: optional (h, prod S, prod ceil(S / k)) additive logit bias.

        Returns:
            (N, *S, C).
        """
        n, *size, c = x.shape
        h = self.num_heads
        kv = ops.channels_last(self.reduce(ops.channels_first(x)))  # (N, *S_r, C)
        q = self.q(x).reshape(n, -1, h, c // h).transpose(1, 2)  # (N, h, L_q, C/h)
        k = self.k(kv).reshape(n, -1, h, c // h).transpose(1, 2)  # (N, h, L_k, C/h)
        v = self.v(kv).reshape(n, -1, h, c // h).transpose(1, 2)  # (N, h, L_k, C/h)
        mask = None if bias is None else bias.unsqueeze(0).to(q.dtype)  # (1, h, L_q, L_k)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(n, *size, c)  # (N, h, L_q, C/h) -> (N, *S, C)
        return self.proj_drop(self.proj(out))


class IRFFN(nn.Module):
    """Inverted residual FFN, (N, C, *S) -> (N, C, *S)."""

    def __init__(self, spatial_dims: int, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.conv1 = ops.conv(spatial_dims, dim, hidden, 1)
        self.bn1 = ops.batch_norm(spatial_dims, hidden)
        self.dw = ops.conv(spatial_dims, hidden, hidden, 3, groups=hidden)
        self.bn2 = ops.batch_norm(spatial_dims, hidden)
        self.conv2 = ops.conv(spatial_dims, hidden, dim, 1)
        self.bn3 = ops.batch_norm(spatial_dims, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.act(self.conv1(x)))  # (N, rC, *S)
        x = self.bn2(self.act(x + self.dw(x)))
        return self.bn3(self.conv2(x))  # (N, C, *S)


class CMTBlock(nn.Module):
    """LPU, lightweight MHSA and IRFFN with residuals; (N, C, *S) -> (N, C, *S).

    ``forward(x, bias)`` takes the stage's position bias (see ``RelativePositionBias``).
    """

    def __init__(self, spatial_dims: int, dim: int, num_heads: int, ratio: Sequence[int],
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0) -> None:
        super().__init__()
        self.lpu = ops.conv(spatial_dims, dim, dim, 3, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = LightweightAttention(spatial_dims, dim, num_heads, ratio, qkv_bias)
        self.norm2 = ops.LayerNormChannelsFirst(dim, eps=1e-6)
        self.ffn = IRFFN(spatial_dims, dim, mlp_ratio)
        self.drop_path = ops.DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.lpu(x)
        y = self.attn(self.norm1(ops.channels_last(x)), bias)  # (N, *S, C)
        x = x + self.drop_path(ops.channels_first(y))
        return x + self.drop_path(self.ffn(self.norm2(x)))


class Stem(nn.Module):
    """Three 3^d convs (the first with ``stride``), each -> GELU -> BatchNorm;
    (N, in_chans, *S) -> (N, C, *ceil(S / stride))."""

    def __init__(self, spatial_dims: int, in_chans: int, dim: int, stride: Sequence[int]) -> None:
        super().__init__()
        self.conv1 = ops.conv(spatial_dims, in_chans, dim, 3, stride=stride, padding=1)
        self.norm1 = ops.batch_norm(spatial_dims, dim)
        self.conv2 = ops.conv(spatial_dims, dim, dim, 3)
        self.norm2 = ops.batch_norm(spatial_dims, dim)
        self.conv3 = ops.conv(spatial_dims, dim, dim, 3)
        self.norm3 = ops.batch_norm(spatial_dims, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.act(self.conv1(x)))
        x = self.norm2(self.act(self.conv2(x)))
        return self.norm3(self.act(self.conv3(x)))


class PatchAggregation(nn.Module):
    """Pad to a multiple of ``stride``, conv kernel = stride, LayerNorm over channels;
    (N, C_in, *S) -> (N, C_out, *ceil(S / stride))."""

    def __init__(self, spatial_dims: int, in_chans: int, out_chans: int, stride: Sequence[int]
                 ) -> None:
        super().__init__()
        self.stride = tuple(stride)
        self.conv = ops.conv(spatial_dims, in_chans, out_chans, self.stride, stride=self.stride,
                             padding=0)
        self.norm = ops.LayerNormChannelsFirst(out_chans, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(pad_to_multiple(x, self.stride)))


class CMTStage(nn.Module):
    """Patch aggregation, the stage's position bias, then ``depth`` CMT blocks."""

    def __init__(self, downsample: nn.Module, pos_bias: RelativePositionBias,
                 blocks: list[CMTBlock]) -> None:
        super().__init__()
        self.downsample, self.pos_bias = downsample, pos_bias
        self.blocks = nn.ModuleList(blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        bias = self.pos_bias(x.shape[2:])  # (h, N_q, N_k), shared by the blocks
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, bias, use_reentrant=False)
            else:
                x = block(x, bias)
        return x


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class CMT(StagedBackbone):
    """CMT feature extractor for (N, in_chans, H, W) or (N, in_chans, D, H, W) inputs.

    Args:
        spatial_dims: 2 or 3.
        in_chans: number of input channels.
        stem_chans: channels of the stem convs.
        dims: channels per stage.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        mlp_ratio: IRFFN expansion ratio.
        strides: factor of the stem conv and of the four patch aggregations: 5 entries (or one
            for all), each an int or a per-axis tuple.
        sr_ratios: per-stage key/value reduction k (4 entries, int or per-axis tuple); None:
            last stage stride / stage stride, per axis (8, 4, 2, 1 by default).
        qkv_bias: biases in the q, k, v projections.
        pos_bias_hidden: hidden width of the position-bias MLP.
        drop_path_rate: stochastic depth rate, increasing linearly from 0 over all blocks.
        out_indices: stages to output; stages after the last one listed are not built.
        grad_checkpointing: recompute each block in the backward pass to save memory.

    ``forward(x)`` returns ``{"stage<i>": (N, dims[i], *ceil(S / stride_i))}`` for i in
    ``out_indices``, fine to coarse, as declared in ``feature_info``.
    """

    stem_key = "stem.conv1.weight"

    def __init__(self, spatial_dims: int, in_chans: int = 1, stem_chans: int = 16,
                 dims: Sequence[int] = (46, 92, 184, 368), depths: Sequence[int] = (2, 2, 10, 2),
                 num_heads: Sequence[int] = (1, 2, 4, 8), mlp_ratio: float = 3.6,
                 strides: Any = 2, sr_ratios: Any = None, qkv_bias: bool = True,
                 pos_bias_hidden: int = 64, drop_path_rate: float = 0.0,
                 out_indices: Sequence[int] = (0, 1, 2, 3), grad_checkpointing: bool = False
                 ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"CMT needs spatial_dims 2 or 3, got {spatial_dims!r}")
        self.spatial_dims = spatial_dims
        self.out_indices = check_out_indices(out_indices, len(depths))
        factors = per_stage(strides, len(depths) + 1, spatial_dims, "strides")
        totals = [tuple(math.prod(f[a] for f in factors[:i + 2]) for a in range(spatial_dims))
                  for i in range(len(depths))]  # cumulative stride of each stage
        if sr_ratios is None:  # keys of every stage on the last stage's grid: 8, 4, 2, 1
            ratios = [tuple(last // t for last, t in zip(totals[-1], tot)) for tot in totals]
        else:
            ratios = per_stage(sr_ratios, len(depths), spatial_dims, "sr_ratios")
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stem = Stem(spatial_dims, in_chans, stem_chans, factors[0])
        self.stages = nn.ModuleList()
        self.feature_info: list[FeatureInfo] = []
        for i in range(max(self.out_indices) + 1):
            down = PatchAggregation(spatial_dims, dims[i - 1] if i else stem_chans, dims[i],
                                    factors[i + 1])
            blocks = [CMTBlock(spatial_dims, dims[i], num_heads[i], ratios[i], mlp_ratio,
                               qkv_bias, rate)
                      for rate in rates[sum(depths[:i]):sum(depths[:i + 1])]]
            bias = RelativePositionBias(spatial_dims, num_heads[i], ratios[i], pos_bias_hidden)
            self.stages.append(CMTStage(down, bias, blocks))
            if i in self.out_indices:
                self.feature_info.append(FeatureInfo(f"stage{i}", dims[i], totals[i]))
        self.apply(_init_weights)
        self.set_grad_checkpointing(grad_checkpointing)


def _init_weights(module: nn.Module) -> None:
    """As the authors: linear weights truncated normal (std 0.02), conv weights normal with std
    sqrt(2 / fan_out) (fan_out = kernel volume x out channels / groups), zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
    elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
        fan_out = math.prod(module.kernel_size) * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
    else:
        return
    if module.bias is not None:
        nn.init.zeros_(module.bias)


# --- checkpoint layout ------------------------------------------------------------------------
_CLASSIFIER = re.compile(r"^(head|norm|fc|_fc|_bn|classifier)\.")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: CMT
                         ) -> dict[str, torch.Tensor]:
    """Our own layout: drop classifier keys and stages not built; for a 3D model, widen a 2D
    position-bias MLP input ``(hidden, 2)`` over (h, w) to ``(hidden, 3)`` over (d, h, w) with a
    zero d column (the bias then ignores depth offsets).  Conv inflation and the stem's input
    channels are handled by ``backbones.pretrained``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        stage = re.match(r"^stages\.(\d+)\.", key)
        if _CLASSIFIER.match(key) or (stage and int(stage.group(1)) >= len(model.stages)):
            continue
        if (model.spatial_dims == 3 and key.endswith("pos_bias.mlp.0.weight")
                and value.ndim == 2 and value.shape[1] == 2):
            value = torch.cat([value.new_zeros(value.shape[0], 1), value], dim=1)
        out[key] = value
    return out


# --- variants (the paper's Table 1) -------------------------------------------------------------


def _create(spatial_dims: int, in_chans: int, defaults: dict[str, Any], kwargs: dict[str, Any]
            ) -> CMT:
    return build_checked(CMT, "CMT", dict(spatial_dims=spatial_dims, in_chans=in_chans, **defaults), kwargs)


@BACKBONES.register()
def cmt_ti(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> CMT:
    """CMT-Ti: stem 16, dims (46, 92, 184, 368), depths (2, 2, 10, 2), IRFFN ratio 3.6."""
    return _create(spatial_dims, in_chans, dict(stem_chans=16, dims=(46, 92, 184, 368),
                                                depths=(2, 2, 10, 2), mlp_ratio=3.6), kwargs)


@BACKBONES.register()
def cmt_xs(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> CMT:
    """CMT-XS: stem 16, dims (52, 104, 208, 416), depths (3, 3, 12, 3), IRFFN ratio 3.8."""
    return _create(spatial_dims, in_chans, dict(stem_chans=16, dims=(52, 104, 208, 416),
                                                depths=(3, 3, 12, 3), mlp_ratio=3.8), kwargs)


@BACKBONES.register()
def cmt_s(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> CMT:
    """CMT-S: stem 32, dims (64, 128, 256, 512), depths (3, 3, 16, 3), IRFFN ratio 4."""
    return _create(spatial_dims, in_chans, dict(stem_chans=32, dims=(64, 128, 256, 512),
                                                depths=(3, 3, 16, 3), mlp_ratio=4.0), kwargs)


@BACKBONES.register()
def cmt_b(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> CMT:
    """CMT-B: stem 38, dims (76, 152, 304, 608), depths (4, 4, 20, 4), IRFFN ratio 4."""
    return _create(spatial_dims, in_chans, dict(stem_chans=38, dims=(76, 152, 304, 608),
                                                depths=(4, 4, 20, 4), mlp_ratio=4.0), kwargs)
