"""Intensity normalisation and resampling shared by training, validation and inference.

The same ``Preprocessing`` travels inside every checkpoint, so inference applies exactly what training
applied.  Arrays are channels-first (C, *spatial) in torchio's voxel order; spacings are per spatial
axis in the same order.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from seg import ops
from seg.errors import DataError

#: intensity schemes (``data.normalization``): z-score per image with the statistics of all voxels, or
#: of the non-zero voxels only (applied to all: zero stays the darkest value), CT (clip to the training set's foreground 0.5-99.5 percentiles and z-score
#: with its foreground mean and std, as nnU-Net), a fixed HU window scaled to [-1, 1], none; nnU-Net's
#: rescale_to_0_1 (per image: minimum to 0, maximum to 1) and rgb_to_0_1 (8-bit values 0..255 divided by 255)
NORMALIZATIONS = ("zscore", "zscore_nonzero", "ct", "window", "none", "rescale_to_0_1", "rgb_to_0_1")
#: the value range ``rgb_to_0_1`` takes (nnU-Net refuses others: "Your images do not seem to be RGB images")
RGB_RANGE = (0.0, 255.0)


@dataclasses.dataclass
class Preprocessing:
    """How raw intensities and grids become network input.

    Attributes:
        normalization: one of ``NORMALIZATIONS`` for every channel, or one per channel.
        intensity_stats: per channel {mean, std, clip_low, clip_high} of the training set's
            foreground ('ct' needs them; the plan fills them in), or None.
        ct_window: (low, high) Hounsfield window for 'window' (the default is set here only;
            ``hparam.DataConfig.ct_window`` equals it, ``tests/test_defaults.py``).
        target_spacing: resample to this spacing (mm, per spatial axis) before the network; None keeps
            the native grid.
    """

    normalization: str | tuple[str, ...] = "zscore"
    intensity_stats: tuple[dict[str, float], ...] | None = None
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    target_spacing: tuple[float, ...] | None = None

    def scheme(self, channel: int) -> str:
        """The normalisation scheme of ``channel``."""
        return self.normalization if isinstance(self.normalization, str) else self.normalization[channel]

    def validate(self) -> None:
        schemes = [self.normalization] if isinstance(self.normalization, str) else list(self.normalization)
        bad = [n for n in schemes if n not in NORMALIZATIONS]
        if bad:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {bad[0]!r}")
        if "ct" in schemes and not self.intensity_stats:
            raise ValueError("normalization 'ct' needs the training set's intensity statistics")
        lo, hi = self.ct_window
        if not lo < hi:
            raise ValueError(f"ct_window must be (low, high) with low < high, got {self.ct_window}")
        if self.target_spacing is not None and any(s <= 0 for s in self.target_spacing):
            raise ValueError(f"target_spacing must be positive, got {self.target_spacing}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        d = dict(d)
        if d.pop("zscore_nonzero", False) and d.get("normalization") == "zscore":  # format 1
            d["normalization"] = "zscore_nonzero"
        if d.get("normalization") == "ct" and not d.get("intensity_stats"):  # format 1: 'ct' was the window
            d["normalization"] = "window"
        norm = d.get("normalization", "zscore")
        d["normalization"] = norm if isinstance(norm, str) else tuple(norm)
        stats = d.get("intensity_stats")
        d["intensity_stats"] = None if stats is None else tuple(dict(x) for x in stats)
        if "ct_window" in d:  # older checkpoints may lack it: the field's default applies
            d["ct_window"] = tuple(d["ct_window"])
        ts = d.get("target_spacing")
        d["target_spacing"] = None if ts is None else tuple(float(s) for s in ts)
        return cls(**d)


def normalize(image: np.ndarray, pp: Preprocessing) -> np.ndarray:
    """Normalise intensities of a channels-first array, channel by channel.

    Args:
        image: (C, *S) array of any numeric dtype.
        pp: the preprocessing settings.

    Returns:
        (C, *S) float32 array.
    """
    x = image.astype(np.float32, copy=True)
    for c in range(x.shape[0]):
        x[c] = normalize_channel(x[c], pp.scheme(c), pp, c)
    return x


def normalize_channel(ch: np.ndarray, scheme: str, pp: Preprocessing, channel: int) -> np.ndarray:
    """One float32 channel (*S) normalised by ``scheme`` (in place where possible)."""
    if scheme == "none":
        return ch
    if scheme == "rescale_to_0_1":
        ch -= ch.min()
        return ch / max(float(ch.max()), 1e-8)
    if scheme == "rgb_to_0_1":
        return ch / RGB_RANGE[1]
    if scheme == "window":
        lo, hi = pp.ct_window
        np.clip(ch, lo, hi, out=ch)
        return (ch - lo) / (hi - lo) * 2.0 - 1.0
    if scheme == "ct":
        st = pp.intensity_stats[channel]
        np.clip(ch, st["clip_low"], st["clip_high"], out=ch)
        return (ch - st["mean"]) / max(st["std"], 1e-8)
    # zscore_nonzero: statistics of the non-zero voxels, applied to every voxel, so zero (air, or
    # the outside of a skull-stripped brain) stays the darkest value instead of the tissue mean
    vals = ch[ch != 0] if scheme == "zscore_nonzero" else ch
    if vals.size == 0:
        return ch
    mean, std = float(vals.mean(dtype=np.float64)), float(vals.std(dtype=np.float64))
    return (ch - mean) / max(std, 1e-8)


def check_intensities(image: np.ndarray, schemes: Sequence[str | None], path: str | Path | None = None) -> None:
    """Refuse a channel outside the value range its scheme takes (``rgb_to_0_1``: 0..255), as nnU-Net
    does, in one DataError line naming ``path``.

    Args:
        image: (C, *S) raw intensities.
        schemes: the scheme of each channel (None: not known yet, nothing to check).
        path: the image file, for the message.
    """
    lo, hi = RGB_RANGE
    for c, scheme in enumerate(schemes):
        if scheme == "rgb_to_0_1" and c < image.shape[0]:
            vmin, vmax = float(image[c].min()), float(image[c].max())
            if vmin < lo or vmax > hi:
                raise DataError(f"channel {c} has values {vmin:g}..{vmax:g}, but its normalisation 'rgb_to_0_1' "
                                f"takes 8-bit values {lo:g}..{hi:g} (rename the channel in dataset.json, e.g. "
                                "'rescale_to_0_1', or set data.normalization)", path)


def target_grid(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float] | None,
                slice_axis: int | None = 2) -> tuple[int, ...]:
    """Grid size at ``target`` spacing (None: ``shape``); a 3-value target on a 2D image (a 2D model
    trained on volumes) drops the ``slice_axis`` value."""
    if target is None:
        return tuple(int(s) for s in shape)
    target = list(target)
    axis = 2 if slice_axis is None else int(slice_axis)
    if len(target) == len(shape) + 1:
        del target[axis]
    elif len(target) == len(shape) - 1:  # in-plane target of a 2D model on a volume: keep the slices
        target.insert(axis, spacing[axis])
    if len(target) != len(shape):
        raise ValueError(f"target spacing {tuple(target)} does not fit an image of shape {tuple(shape)}")
    return resampled_shape(shape, spacing, target)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float],
                    target_spacing: Sequence[float]) -> tuple[int, ...]:
    """Grid size after resampling a grid of ``shape`` at ``spacing`` to ``target_spacing``."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing))


def resample(array: np.ndarray | torch.Tensor, size: Sequence[int], mode: str = "linear"
             ) -> np.ndarray | torch.Tensor:
    """Resample a channels-first (C, *S) array or tensor to spatial ``size``.

    ``mode='linear'`` for images and logits/probabilities, ``'nearest'`` for label maps.  The grid
    extent is preserved (cell-centre aligned, align_corners=False), as SimpleITK's resampling to a
    spacing that tiles the same field of view.
    """
    is_np = isinstance(array, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(array)) if is_np else array
    dtype = t.dtype
    y = ops.resize(t[None].float(), size, mode=mode)[0]
    y = y.to(dtype) if not dtype.is_floating_point else y
    return y.numpy() if is_np else y
