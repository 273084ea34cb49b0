"""Intensity normalisation and resampling shared by training, validation and inference.

The same ``Preprocessing`` travels inside every checkpoint, so inference applies exactly what training
applied.  Arrays are channels-first (C, *spatial) in torchio's voxel order; spacings are per spatial
axis in the same order.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch

from seg import ops

NORMALIZATIONS = ("zscore", "ct", "none")


@dataclasses.dataclass
class Preprocessing:
    """How raw intensities and grids become network input.

    Attributes:
        normalization: 'zscore' (per image and channel), 'ct' (clip to ``ct_window`` then scale to
            [-1, 1]... see ``normalize``) or 'none'.
        zscore_nonzero: compute z-score statistics over non-zero voxels only (skull-stripped MRI)
            and leave the zero background at the normalised value of 0 intensity.
        ct_window: (low, high) Hounsfield window for 'ct'.
        target_spacing: resample to this spacing (mm, per spatial axis) before the network; None keeps
            the native grid.
    """

    normalization: str = "zscore"
    zscore_nonzero: bool = False
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    target_spacing: tuple[float, ...] | None = None

    def validate(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
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
        d["ct_window"] = tuple(d.get("ct_window", (-1000.0, 1000.0)))
        ts = d.get("target_spacing")
        d["target_spacing"] = None if ts is None else tuple(float(s) for s in ts)
        return cls(**d)


def normalize(image: np.ndarray, pp: Preprocessing) -> np.ndarray:
    """Normalise intensities of a channels-first array.

    Args:
        image: (C, *S) array of any numeric dtype.
        pp: the preprocessing settings.

    Returns:
        (C, *S) float32 array.
    """
    x = image.astype(np.float32, copy=True)
    if pp.normalization == "ct":
        lo, hi = pp.ct_window
        np.clip(x, lo, hi, out=x)
        return ((x - lo) / (hi - lo) * 2.0 - 1.0).astype(np.float32)
    if pp.normalization == "none":
        return x
    for c in range(x.shape[0]):
        ch = x[c]
        mask = ch != 0 if pp.zscore_nonzero else np.ones(ch.shape, bool)
        vals = ch[mask]
        if vals.size == 0:
            continue
        mean, std = float(vals.mean()), float(vals.std())
        ch[mask] = (vals - mean) / max(std, 1e-8)
        if pp.zscore_nonzero:
            ch[~mask] = 0.0
    return x


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
