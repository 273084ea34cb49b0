"""Swin Transformer V2 backbone, one implementation for 2D (N, C, H, W) and 3D (N, C, D, H, W).

Paper: Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution" (CVPR 2022).
References read (not copied): microsoft/Swin-Transformer ``swin_transformer_v2.py`` and timm's
``swin_transformer_v2.py``.

Architecture, written once for ``d = spatial_dims`` axes:
    * patch embedding: conv with kernel = stride = ``patch_size`` (per axis), then LayerNorm;
    * window attention with scaled cosine attention (cos(q, k) times a per-head learnable scale,
      clamped at log(100) before exp) and a log-spaced continuous position bias: an MLP
      (d -> 512 -> ReLU -> heads) over relative window coordinates, bias = 16 * sigmoid(mlp);
    * residual post-norm: ``x = x + drop_path(norm(attn(x)))``, same for the MLP;
    * shifted windows on every odd block (shift = window // 2 on axes where the window is smaller
      than the feature map), with the attention mask of the cyclically rolled map;
    * patch merging between stages: the ``f_0 x ... x f_{d-1}`` neighbourhood concatenated,
      Linear(k C -> 2 C, no bias), LayerNorm(2 C) (V2 order: reduce, then norm).

Odd and non-cubic inputs: the input is zero-padded to a multiple of ``patch_size``, every merge
pads its input to a multiple of its merge factor, and each block pads to a multiple of its window
(padded keys are masked out of the attention, then the padding is cropped again).  A feature of
stride ``s`` therefore has spatial size ``ceil(size / s)`` per axis.

Windows are clamped to the feature size where the feature is smaller.  Relative position tables,
indices and masks are derived from the current window and feature size on every forward (pure
functions with a small cache keyed on sizes, window, shift and device); nothing input-size
dependent is stored in the module or the state dict.

Default windows: 8 in 2D (the window of the ``*_window8_256`` ImageNet weights); (4, 8, 8) in 3D
(depth first): 8 in-plane evaluates the position-bias MLP at the coordinates it was pretrained on
in 2D, and 4 along depth keeps a window at 256 tokens and suits the few slices of thick-slice
volumes.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.errors import ConfigError, UserError
from seg.ops import DropPath, channels_first, channels_last, check_spatial_dims, conv, to_ntuple

from .base import Backbone, FeatureInfo, build_checked, per_axis, run_blocks
from .registry import BACKBONES

__all__ = ["SwinTransformerV2", "checkpoint_filter_fn", "window_partition", "window_reverse",
           "relative_coords_table", "relative_position_index", "attention_mask"]

LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # the cosine-attention scale is clamped at 100
# Additive logit of a forbidden (query, key) pair.  The official code uses -100, which leaks when
# the cosine scale is near its clamp (logits span +-100 + 16); -1e4 masks exactly, stays finite in
# float16 (rows of padding queries, whose keys are all masked, give no NaN) and agrees with -100
# wherever -100 does not leak.
MASK_VALUE = -1.0e4
CPB_HIDDEN = 512  # hidden width of the continuous position bias MLP


# ----------------------------------------------------------------------------------------------
# Window geometry: pure functions of sizes, written once for d axes
# ----------------------------------------------------------------------------------------------
def _interleave(a: Sequence[int], b: Sequence[int]) -> list[int]:
    """[a0, b0, a1, b1, ...]."""
    return [v for pair in zip(a, b) for v in pair]


def _pad_spatial(x: torch.Tensor, target: Sequence[int], first_axis: int) -> torch.Tensor:
    """Zero-pad the spatial axes ``first_axis .. first_axis + len(target) - 1`` at their end."""
    size = x.shape[first_axis:first_axis + len(target)]
    if tuple(size) == tuple(target):
        return x
    pad = [0, 0] * (x.ndim - first_axis - len(target))  # trailing non-spatial axes (channels)
    for s, t in zip(reversed(size), reversed(tuple(target))):
        pad += [0, t - s]
    return F.pad(x, pad)


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Cut a channels-last map into non-overlapping windows.

    Args:
        x: (B, *S, C), every S_i a multiple of ``window[i]``.
        window: per-axis window size (w_0, ..., w_{d-1}).

    Returns:
        (B * nW, T, C) with nW = prod(S_i / w_i) windows (row-major over the window grid, batch
        first) and T = prod(w_i) tokens per window (row-major inside the window).
    """
    d, (b, *size, c) = len(window), x.shape
    grid = [s // w for s, w in zip(size, window)]
    x = x.view(b, *_interleave(grid, window), c)  # (B, n_0, w_0, ..., n_{d-1}, w_{d-1}, C)
    perm = (0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2), 2 * d + 1)
    return x.permute(perm).reshape(-1, math.prod(window), c)  # (B * nW, T, C)


def window_reverse(windows: torch.Tensor, window: Sequence[int], size: Sequence[int]
                   ) -> torch.Tensor:
    """Inverse of ``window_partition``: (B * nW, T, C) -> (B, *size, C)."""
    d, c = len(window), windows.shape[-1]
    grid = [s // w for s, w in zip(size, window)]
    x = windows.view(-1, *grid, *window, c)  # (B, n_0, ..., n_{d-1}, w_0, ..., w_{d-1}, C)
    perm = (0, *_interleave(range(1, d + 1), range(d + 1, 2 * d + 1)), 2 * d + 1)
    return x.permute(perm).reshape(-1, *size, c)  # (B, *size, C)


@functools.lru_cache(maxsize=64)
def relative_coords_table(window: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Log-spaced relative coordinates fed to the continuous position bias MLP.

    Each axis offset in [-(w-1), w-1] is divided by max(w - 1, 1), scaled by 8 and mapped to
    sign(x) * log2(|x| + 1) / log2(8), so it lies in [-1, 1].

    Returns:
        (prod(2 w_i - 1), d) float32, row-major over the offsets, coordinates in axis order.
    """
    with torch.inference_mode(False):  # a cached tensor must stay usable by autograd later
        axes = [torch.arange(1 - w, w, dtype=torch.float32, device=device) / max(w - 1, 1) * 8
                for w in window]
        table = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (2w_0-1, ..., d)
        table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
        return table.reshape(-1, len(window))  # (prod(2 w_i - 1), d)


@functools.lru_cache(maxsize=64)
def relative_position_index(window: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Row of ``relative_coords_table`` for every (query, key) pair of a window.

    Returns:
        (T, T) int64, T = prod(w_i).
    """
    with torch.inference_mode(False):
        grids = torch.meshgrid(*[torch.arange(w, device=device) for w in window], indexing="ij")
        coords = torch.stack(grids).flatten(1)  # (d, T)
        rel = coords[:, :, None] - coords[:, None, :]  # (d, T, T) query minus key
        index = torch.zeros_like(rel[0])
        for axis, w in enumerate(window):  # row-major over offsets shifted to [0, 2w - 2]
            index = index * (2 * w - 1) + rel[axis] + (w - 1)
        return index  # (T, T)


@functools.lru_cache(maxsize=64)
def attention_mask(size: tuple[int, ...], padded: tuple[int, ...], window: tuple[int, ...],
                   shift: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Additive attention mask of the padded, rolled map.

    The map of real size ``size`` is zero-padded to ``padded`` and rolled by ``-shift``.  Per axis,
    rolled position j belongs to region 0 (j < P - w), 1 (P - w <= j < P - s) or 2 (j >= P - s):
    tokens rolled in from the other border must not see their new neighbours.  A (query, key)
    pair is allowed when both lie in the same region on every axis and the key is a real token.

    Returns:
        (nW, T, T) float32: 0 for allowed pairs, ``MASK_VALUE`` otherwise.
    """
    with torch.inference_mode(False):
        d = len(size)
        ids = torch.zeros(padded, dtype=torch.long, device=device)
        real = torch.ones(padded, dtype=torch.bool, device=device)
        for axis, (s, p, w, sh) in enumerate(zip(size, padded, window, shift)):
            j = torch.arange(p, device=device)
            label = (j >= p - w).long() + (j >= p - sh).long()  # region 0, 1 or 2 (sh=0: 0, 1)
            view = [1] * d
            view[axis] = p
            ids = ids * 3 + label.view(view)  # region id over all axes, (*P)
            real = real & ((j + sh) % p < s).view(view)  # rolled position holds a real token
        ids = torch.where(real, ids, torch.full_like(ids, -1))
        ids = window_partition(ids[None, ..., None], window)[..., 0]  # (nW, T)
        allowed = (ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] >= 0)  # (nW, T, T)
        return torch.where(allowed, 0.0, MASK_VALUE).float()


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------
class WindowAttention(nn.Module):
    """Multi-head scaled cosine attention inside windows, with continuous position bias.

    Args:
        spatial_dims: number of spatial axes d (inputs of the bias MLP).
        dim: channels C.
        num_heads: attention heads.
        attn_drop: dropout on attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(self, spatial_dims: int, dim: int, num_heads: int, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(spatial_dims, CPB_HIDDEN), nn.ReLU(inplace=True),
                                     nn.Linear(CPB_HIDDEN, num_heads, bias=False))
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def position_bias(self, window: tuple[int, ...]) -> torch.Tensor:
        """16 * sigmoid(cpb_mlp(relative coordinates)) for every pair: (heads, T, T)."""
        device = self.logit_scale.device
        table = relative_coords_table(window, device).to(self.cpb_mlp[0].weight.dtype)
        bias = self.cpb_mlp(table)  # (prod(2 w_i - 1), heads)
        bias = bias[relative_position_index(window, device)]  # (T, T, heads)
        return 16 * torch.sigmoid(bias.permute(2, 0, 1))  # (heads, T, T)

    def forward(self, x: torch.Tensor, window: tuple[int, ...], mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Attend within windows.

        Args:
            x: (B * nW, T, C) window tokens, batch major.
            window: the window size these tokens come from (T = prod(window)).
            mask: optional (nW, T, T) additive mask shared by every image of the batch.

        Returns:
            (B * nW, T, C).
        """
        bw, t, c = x.shape
        h = self.num_heads
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, qkv_bias)  # (B * nW, T, 3 C)
        qkv = qkv.view(bw, t, 3, h, c // h).permute(2, 0, 3, 1, 4)  # (3, B * nW, heads, T, C/h)
        q, k, v = qkv.unbind(0)
        scale = torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()  # (heads, 1, 1)
        q = F.normalize(q, dim=-1) * scale  # cosine attention: the scale rides on q
        k = F.normalize(k, dim=-1)
        bias = self.position_bias(window)  # (heads, T, T)
        groups = 1
        if mask is not None:
            groups = mask.shape[0]  # nW: fold the windows into the head axis so the bias broadcasts
            bias = (bias + mask.to(bias.dtype)[:, None]).flatten(0, 1)  # (nW * heads, T, T)
        # (B * nW / groups, groups * heads, T, C/h): 4-D keeps the fused SDPA kernels usable
        q, k, v = (z.reshape(-1, groups * h, t, c // h) for z in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.unsqueeze(0).to(q.dtype),
            dropout_p=self.attn_drop if self.training else 0.0, scale=1.0)
        out = out.reshape(bw, h, t, c // h).transpose(1, 2).reshape(bw, t, c)  # (B * nW, T, C)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """Token MLP: Linear -> GELU -> Linear, channels last."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwinV2Block(nn.Module):
    """(Shifted-)window attention and MLP with residual post-norm, on (B, *S, C) tensors.

    Args:
        spatial_dims: 2 or 3.
        dim: channels C.
        num_heads: attention heads.
        window_size: per-axis window (clamped to the feature size at run time).
        shifted: whether this block shifts its windows by window // 2.
        mlp_ratio: MLP hidden width / C.
        drop_path: stochastic depth rate of both residual branches.
        attn_drop: attention-weight dropout.
        proj_drop: dropout after projections.
    """

    def __init__(self, spatial_dims: int, dim: int, num_heads: int, window_size: Sequence[int],
                 shifted: bool, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.spatial_dims, self.shifted = spatial_dims, shifted
        self.window_size = to_ntuple(window_size, spatial_dims)
        self.attn = WindowAttention(spatial_dims, dim, num_heads, attn_drop, proj_drop)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.norm2 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path)

    def window_and_shift(self, size: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Effective window (clamped to ``size``) and shift (only where the window is smaller)."""
        window = tuple(min(w, s) for w, s in zip(self.window_size, size))
        shift = tuple(w // 2 if self.shifted and w < s else 0 for w, s in zip(window, size))
        return window, shift

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Window attention of a (B, *S, C) map: pad, roll, partition, attend, undo; same shape."""
        size = tuple(x.shape[1:-1])
        window, shift = self.window_and_shift(size)
        padded = tuple(-(-s // w) * w for s, w in zip(size, window))
        axes = tuple(range(1, self.spatial_dims + 1))
        x = _pad_spatial(x, padded, first_axis=1)  # (B, *P, C)
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=axes)
        mask = None
        if any(shift) or padded != size:
            mask = attention_mask(size, padded, window, shift, x.device)  # (nW, T, T)
        windows = self.attn(window_partition(x, window), window, mask)  # (B * nW, T, C)
        x = window_reverse(windows, window, padded)  # (B, *P, C)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=axes)
        return x[(slice(None), *(slice(0, s) for s in size))]  # (B, *S, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *S, C) -> (B, *S, C)."""
        x = x + self.drop_path(self.norm1(self.attention(x)))
        return x + self.drop_path(self.norm2(self.mlp(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches: pad to a multiple of ``patch_size``, conv, LayerNorm.

    Maps (B, C_in, *S) to channels-last (B, *ceil(S / patch), C).
    """

    def __init__(self, spatial_dims: int, in_chans: int, dim: int, patch_size: Sequence[int]
                 ) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = conv(spatial_dims, in_chans, dim, kernel_size=self.patch_size,
                         stride=self.patch_size, padding=0)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        target = [-(-s // p) * p for s, p in zip(x.shape[2:], self.patch_size)]
        x = self.proj(_pad_spatial(x, target, first_axis=2))  # (B, C, *S/p)
        return self.norm(channels_last(x))  # (B, *S/p, C)


class PatchMerging(nn.Module):
    """Concatenate each ``factor`` neighbourhood, then Linear(k C -> out_dim) and LayerNorm.

    The k = prod(factor) neighbours are concatenated with the offset of the LAST spatial axis most
    significant and the first least: in 2D (w, h) as in the official code
    ([x(0,0), x(1,0), x(0,1), x(1,1)] with (h, w) offsets), in 3D (w, h, d).
    """

    def __init__(self, dim: int, out_dim: int, factor: Sequence[int]) -> None:
        super().__init__()
        self.factor = tuple(factor)
        self.reduction = nn.Linear(math.prod(self.factor) * dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *S, C) -> (B, *ceil(S / factor), out_dim)."""
        d = len(self.factor)
        x = _pad_spatial(x, [-(-s // f) * f for s, f in zip(x.shape[1:-1], self.factor)], 1)
        b, *size, c = x.shape
        grid = [s // f for s, f in zip(size, self.factor)]
        x = x.view(b, *_interleave(grid, self.factor), c)  # (B, S_0/f_0, f_0, ..., C)
        perm = (0, *range(1, 2 * d, 2), *range(2 * d, 0, -2), 2 * d + 1)  # offsets last axis first
        x = x.permute(perm).reshape(b, *grid, -1)  # (B, *S/f, k C)
        return self.norm(self.reduction(x))


class SwinV2Stage(nn.Module):
    """Optional patch merging (at the start, as in timm >= 0.9), then ``depth`` blocks whose odd
    members shift their windows."""

    def __init__(self, spatial_dims: int, in_dim: int, dim: int, depth: int, num_heads: int,
                 window_size: Sequence[int], merge_factor: Sequence[int] | None,
                 mlp_ratio: float, drop_path: Sequence[float], attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.downsample = nn.Identity() if merge_factor is None else \
            PatchMerging(in_dim, dim, merge_factor)
        self.blocks = nn.ModuleList([
            SwinV2Block(spatial_dims, dim, num_heads, window_size, shifted=i % 2 == 1,
                        mlp_ratio=mlp_ratio, drop_path=drop_path[i], attn_drop=attn_drop,
                        proj_drop=proj_drop) for i in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *S, C_in) -> (B, *S', C), channels last."""
        x = self.downsample(x)
        return run_blocks(self.blocks, x, self.grad_checkpointing)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def _merge_factors(value: Any, spatial_dims: int, num_merges: int) -> list[tuple[int, ...]]:
    """int | per-axis tuple (every merge) | one per-axis tuple per merge -> list of tuples."""
    if isinstance(value, Sequence) and value and isinstance(value[0], Sequence):
        if len(value) != num_merges:
            raise ConfigError(f"merge_factors: expected {num_merges} per-stage entries, "
                              f"got {value!r}")
        return [per_axis(v, spatial_dims, "merge_factors") for v in value]
    return [per_axis(value, spatial_dims, "merge_factors")] * num_merges


class SwinTransformerV2(Backbone):
    """Swin Transformer V2 feature extractor for 2D and 3D.

    ``forward(x)`` maps (N, in_chans, *S) to ``{"stage{i}": (N, C_i, *ceil(S / stride_i))}`` for
    i in ``out_indices``, fine to coarse; the outputs are the stage outputs (no extra norm).

    Args:
        spatial_dims: 2 or 3.
        in_chans: input channels.
        embed_dim: channels of stage 0; stage i has ``embed_dim * 2**i``.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: int or per-axis tuple (axis order of the tensor), all stages; None: 8 in 2D,
            (4, 8, 8) in 3D.  Clamped to the feature size where that is smaller.
        patch_size: int or per-axis patch size of the stem, e.g. (1, 4, 4) for thick slices.
        merge_factors: per-axis downsampling of each patch merging: an int, one per-axis tuple for
            every merge, or one per-axis tuple per merge (e.g. ((1, 2, 2), (2, 2, 2), (2, 2, 2))).
        mlp_ratio: MLP hidden width / channels.
        drop_path_rate: stochastic depth, rising linearly over all blocks to this value.
        attn_drop_rate: attention-weight dropout.
        proj_drop_rate: dropout after projections and in the MLP.
        out_indices: stages to return (default all); stages after the last one are not built.
        grad_checkpointing: recompute every block in the backward pass to save memory.
    """

    stem_key = "patch_embed.proj.weight"

    def __init__(self, spatial_dims: int, in_chans: int = 1, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int | Sequence[int] | None = None, patch_size: Any = 4,
                 merge_factors: Any = 2, mlp_ratio: float = 4.0, drop_path_rate: float = 0.1,
                 attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 out_indices: Sequence[int] | None = None, grad_checkpointing: bool = False
                 ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(depths) != len(num_heads):
            raise ConfigError(f"depths {depths} and num_heads {num_heads} differ in length")
        num_stages = len(depths)
        self.out_indices = tuple(range(num_stages)) if out_indices is None else \
            tuple(sorted(set(int(i) for i in out_indices)))
        if not self.out_indices or not all(0 <= i < num_stages for i in self.out_indices):
            raise ConfigError(f"out_indices {out_indices} must lie in [0, {num_stages - 1}]")
        if window_size is None:
            window_size = 8 if spatial_dims == 2 else (4, 8, 8)
        window = per_axis(window_size, spatial_dims, "window_size")
        patch = per_axis(patch_size, spatial_dims, "patch_size")
        merges = _merge_factors(merge_factors, spatial_dims, num_stages - 1)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()

        self.patch_embed = PatchEmbed(spatial_dims, in_chans, embed_dim, patch)
        self.stages = nn.ModuleList()
        self.feature_info = []
        stride, in_dim = patch, embed_dim
        for i in range(self.out_indices[-1] + 1):
            dim, merge = embed_dim * 2 ** i, merges[i - 1] if i > 0 else None
            if merge is not None:
                stride = tuple(s * f for s, f in zip(stride, merge))
            first = sum(depths[:i])
            self.stages.append(SwinV2Stage(
                spatial_dims, in_dim, dim, depths[i], num_heads[i], window, merge, mlp_ratio,
                rates[first:first + depths[i]], attn_drop_rate, proj_drop_rate))
            if i in self.out_indices:
                self.feature_info.append(FeatureInfo(f"stage{i}", dim, stride))
            in_dim = dim
        self.init_weights()
        self.set_grad_checkpointing(grad_checkpointing)

    def init_weights(self) -> None:
        """Official initialisation: truncated normal (std 0.02) linears, zero biases, and zero
        residual post-norms (every block starts as the identity)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, SwinV2Block):
                for n in (m.norm1, m.norm2):
                    nn.init.zeros_(n.weight)
                    nn.init.zeros_(n.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (torch.utils.checkpoint) when enabled."""
        for stage in self.stages:
            stage.grad_checkpointing = bool(enable)

    def set_window_size(self, window_size: int | Sequence[int]) -> None:
        """Change the window of every block; tables and masks follow on the next forward."""
        window = to_ntuple(window_size, self.spatial_dims)
        for m in self.modules():
            if isinstance(m, SwinV2Block):
                m.window_size = window

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, in_chans, *S) -> ordered ``{name: (N, C_i, *ceil(S / stride_i))}``."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected a {self.spatial_dims + 2}-D (N, C, *spatial) input, "
                             f"got shape {tuple(x.shape)}")
        x = self.patch_embed(x)  # (N, *S/patch, C_0)
        out = {}
        for i, stage in enumerate(self.stages):
            x = stage(x)  # (N, *S/stride_i, C_i)
            if i in self.out_indices:
                out[f"stage{i}"] = channels_first(x).contiguous()  # (N, C_i, *S/stride_i)
        return out


# ----------------------------------------------------------------------------------------------
# Pretrained weights
# ----------------------------------------------------------------------------------------------
_DERIVED = ("relative_coords_table", "relative_position_index", "attn_mask", "k_bias")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: SwinTransformerV2
                         ) -> dict[str, torch.Tensor]:
    """Rename an official (microsoft/Swin-Transformer) or timm SwinV2 state dict to ours.

    * ``layers.{i}`` -> ``stages.{i}``; the official layout merges at the END of stage i
      (``layers.0.downsample`` exists), ours and timm's at the START of stage i + 1;
    * derived buffers (``relative_coords_table``, ``relative_position_index``, ``attn_mask``,
      ``k_bias``), the classifier (``head``), the final ``norm`` and ``absolute_pos_embed`` are
      dropped, as are stages the model does not build (``out_indices``);
    * for a 3D model, 2D tensors are reshaped (``_to_3d``): the position-bias MLP input gets a
      zero depth column and the merge reduction is spread over the depth neighbours.
    Keys already in our layout pass through unchanged; the stem conv (``stem_key``) is inflated
    and fitted to ``in_chans`` by ``backbones.pretrained``.
    """
    official = any(k.startswith("layers.0.downsample.") for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        if any(name in key for name in _DERIVED) or key == "absolute_pos_embed" \
                or key.startswith(("head.", "norm.")):
            continue
        match = re.match(r"(?:layers|stages)\.(\d+)\.(.*)", key)
        if match:
            stage, rest = int(match.group(1)), match.group(2)
            if official and rest.startswith("downsample."):
                stage += 1
            if stage >= len(model.stages):
                continue
            key = f"stages.{stage}.{rest}"
        out[key] = value
    return _to_3d(out, model) if model.spatial_dims == 3 else out


def _to_3d(state_dict: dict[str, torch.Tensor], model: SwinTransformerV2
           ) -> dict[str, torch.Tensor]:
    """Reshape 2D SwinV2 tensors whose 3D counterparts differ in shape (others unchanged).

    * ``cpb_mlp.0.weight`` (512, 2) over (h, w) -> (512, 3) over (d, h, w) with a zero d column:
      the bias ignores depth offsets, so identical slices attend as in 2D;
    * ``downsample.reduction.weight`` (O, 4 C) over (w, h) offsets -> (O, 4 f_d C) over
      (w, h, d) offsets: each depth neighbour gets the 2D weight / f_d (no change when f_d = 1).
    """
    ours = model.state_dict()
    out = dict(state_dict)
    for key, value in state_dict.items():
        target = ours.get(key)
        if target is None or target.shape == value.shape:
            continue
        if key.endswith("cpb_mlp.0.weight") and value.shape[1] == 2:
            out[key] = torch.cat([value.new_zeros(value.shape[0], 1), value], dim=1)  # (512, 3)
        elif key.endswith("downsample.reduction.weight"):
            stage = model.stages[int(key.split(".")[1])]
            fd, fh, fw = stage.downsample.factor
            if (fh, fw) != (2, 2) or value.shape[1] * fd != target.shape[1]:
                raise UserError(f"{key}: cannot map a 2x2 merge {tuple(value.shape)} to merge "
                                f"factor {stage.downsample.factor} {tuple(target.shape)}")
            o, c = value.shape[0], value.shape[1] // 4
            w = value.view(o, 2, 2, 1, c).expand(o, 2, 2, fd, c)  # (O, w, h, d, C)
            out[key] = w.reshape(o, 4 * fd * c) / fd  # (O, 4 f_d C)
    return out


# ----------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------


def _create(spatial_dims: int, in_chans: int, defaults: dict[str, Any], kwargs: dict[str, Any]
            ) -> SwinTransformerV2:
    """Build with the variant's defaults, overridden by ``kwargs`` (unknown names: did you mean)."""
    fixed = dict(spatial_dims=spatial_dims, in_chans=in_chans, **defaults)
    return build_checked(SwinTransformerV2, "swinv2", fixed, kwargs)


@BACKBONES.register()
def swinv2_tiny(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> SwinTransformerV2:
    """SwinV2-T: C = 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24)."""
    return _create(spatial_dims, in_chans, dict(embed_dim=96, depths=(2, 2, 6, 2),
                                                num_heads=(3, 6, 12, 24)), kwargs)


@BACKBONES.register()
def swinv2_small(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> SwinTransformerV2:
    """SwinV2-S: C = 96, depths (2, 2, 18, 2), heads (3, 6, 12, 24)."""
    return _create(spatial_dims, in_chans, dict(embed_dim=96, depths=(2, 2, 18, 2),
                                                num_heads=(3, 6, 12, 24)), kwargs)


@BACKBONES.register()
def swinv2_base(spatial_dims: int, in_chans: int = 1, **kwargs: Any) -> SwinTransformerV2:
    """SwinV2-B: C = 128, depths (2, 2, 18, 2), heads (4, 8, 16, 32)."""
    return _create(spatial_dims, in_chans, dict(embed_dim=128, depths=(2, 2, 18, 2),
                                                num_heads=(4, 8, 16, 32)), kwargs)
