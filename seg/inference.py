"""Sliding-window inference for 2D and 3D networks, with weighted blending and mirror TTA.

The dims come from the tensor: (N, C, H, W) runs 2D windows, (N, C, D, H, W) 3D windows, with the
same code.  The design, and where it follows or departs from MONAI and nnU-Net:

* **Window positions** are pre-computed per axis and spread evenly between the first and the last
  possible start (nnU-Net): ``n = ceil((S - P) / step) + 1`` windows with ``step = int(P * (1 -
  overlap))`` (MONAI's interval, so both use the same number of windows), starts ``round(i * (S - P) /
  (n - 1))`` mirrored about the centre, so the grid is symmetric under flipping (exactly, except a
  middle window when ``n`` and ``S - P`` are both odd: it cannot be centred, it sits half a voxel off).  MONAI instead
  steps by ``step`` and pushes the last window back to the border; where ``S - P`` is a multiple of
  ``step`` the two grids are identical (the tests compare against MONAI there).
* **Blending weights**: ``gaussian`` is MONAI's ``compute_importance_map`` (``exp(-x^2 / 2 sigma^2)``
  centred at ``(P - 1) / 2``, ``sigma = sigma_scale * P`` per axis, peak 1 for odd P), floored at
  ``max(min, 1e-3)`` so no voxel gets zero weight; ``hann`` is ``sin^2(pi (i + 0.5) / P)`` with the
  same floor; ``constant`` is 1.  The map is built once per (patch, mode, device) and cached.
* **What is blended**: raw network outputs (logits) by default, as nnU-Net v2 does; with
  ``activation='softmax'`` (or ``'sigmoid'``) each window is turned into probabilities first and the
  probabilities are blended.  **TTA** mirrors each window over every non-empty combination of the
  chosen spatial axes, flips the predictions back and averages them together with the plain
  prediction *in the same space* (logits by default, probabilities with an activation), i.e. the
  window predictor becomes exactly mirror-equivariant.
* **Inputs smaller than the patch** are padded symmetrically (``diff // 2`` before, the rest after,
  as MONAI) with ``pad_value`` (default 0, the mean of a z-scored image) and cropped back.
* **Memory**: windows are predicted ``batch_size`` at a time on ``device``, multiplied by the weight
  map there, and added into a float32 accumulator on ``output_device`` (CPU by default) together with
  one shared (spatial only) normaliser; no list of windows is ever kept.
"""
from __future__ import annotations

import functools
import itertools
import logging
import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from seg.ops import to_ntuple

logger = logging.getLogger(__name__)

BLEND_MODES = ("gaussian", "constant", "hann")
#: the defaults of ``sliding_window_inference``, ``seg.predict.Predictor`` and ``infer_seg.py`` (set
#: here only): overlap of neighbouring windows, windows per network call, blending
DEFAULT_OVERLAP, DEFAULT_BATCH_SIZE, DEFAULT_BLEND = 0.5, 4, "gaussian"
ACTIVATIONS = (None, "softmax", "sigmoid")
Predictor = Callable[[torch.Tensor], torch.Tensor]


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis, evenly spread and mirror-symmetric.

    Args:
        size: length of the (padded) axis, ``size >= patch``.
        patch: window length.
        overlap: fraction of the window shared by neighbours, in [0, 1).
    """
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    n = math.ceil((size - patch) / step) + 1
    span = size - patch
    half = [(2 * i * span + (n - 1)) // (2 * (n - 1)) for i in range((n + 1) // 2)]  # round(i*span/(n-1))
    return half + [span - s for s in reversed(half[: n // 2])]


def window_slices(size: Sequence[int], patch: Sequence[int], overlap: Sequence[float]
                  ) -> list[tuple[slice, ...]]:
    """All window positions of an N-D grid as tuples of slices (cartesian product of the axes)."""
    per_axis = [window_starts(s, p, o) for s, p, o in zip(size, patch, overlap)]
    return [tuple(slice(s, s + p) for s, p in zip(starts, patch))
            for starts in itertools.product(*per_axis)]


@functools.lru_cache(maxsize=16)
def _weight_cpu(patch: tuple[int, ...], blend: str, sigma_scale: tuple[float, ...]) -> torch.Tensor:
    w = torch.ones(())
    for p, sc in zip(patch, sigma_scale):
        i = torch.arange(p, dtype=torch.float64)
        if blend == "gaussian":
            prof = torch.exp(-((i - (p - 1) / 2.0) ** 2) / (2.0 * (sc * p) ** 2))
        elif blend == "hann":
            prof = torch.sin(math.pi * (i + 0.5) / p) ** 2
        else:
            prof = torch.ones(p, dtype=torch.float64)
        w = w[..., None] * prof  # outer product, axis by axis
    w = w.float()
    return w.clamp_(min=max(float(w.min()), 1e-3))


def blend_weight(patch_size: Sequence[int], blend: str = DEFAULT_BLEND, sigma_scale: float | Sequence[float] = 0.125,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """The (*patch_size) float32 weight map used to blend overlapping windows (cached).

    Args:
        patch_size: window size per spatial axis.
        blend: 'gaussian', 'hann' or 'constant'.
        sigma_scale: Gaussian sigma as a fraction of the window size (per axis or one value).
        device: where the map lives.
    """
    if blend not in BLEND_MODES:
        raise ValueError(f"blend must be one of {BLEND_MODES}, got {blend!r}")
    patch = tuple(int(p) for p in patch_size)
    return _weight_cpu(patch, blend, tuple(float(s) for s in to_ntuple(sigma_scale, len(patch)))).to(device)


def mirror_axes(spatial_dims: int, tta: bool | Sequence[int]) -> list[tuple[int, ...]]:
    """Tensor axes to flip for each TTA variant: every non-empty subset of the chosen spatial axes.

    Args:
        spatial_dims: number of spatial axes.
        tta: False (none), True (all spatial axes) or the spatial axes (0-based) to mirror.
    """
    if tta is False or tta is None:
        return []
    axes = range(spatial_dims) if tta is True else tuple(tta)
    if any(not 0 <= a < spatial_dims for a in axes):
        raise ValueError(f"TTA axes must be spatial axes in [0, {spatial_dims}), got {tuple(axes)}")
    dims = [a + 2 for a in axes]
    return [c for r in range(1, len(dims) + 1) for c in itertools.combinations(dims, r)]


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation == "softmax":
        return torch.softmax(y.float(), dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(y.float())
    return y.float()


def _predict_window_batch(x: torch.Tensor, predictor: Predictor, flips: list[tuple[int, ...]],
                          activation: str | None) -> torch.Tensor:
    """Predict (B, C, *P) windows, averaging over the mirrored variants; returns (B, K, *P) float32."""
    y = _activate(predictor(x), activation)
    if y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
        raise ValueError(f"the predictor must return (N, K, *spatial) at the input's resolution: "
                         f"input {tuple(x.shape)}, output {tuple(y.shape)}")
    for axes in flips:
        y += _activate(predictor(torch.flip(x, axes)), activation).flip(axes)
    if flips:
        y /= len(flips) + 1
    return y


def _pad_to_patch(x: torch.Tensor, patch: tuple[int, ...], value: float
                  ) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad spatial axes shorter than the patch (symmetrically); return the tensor and the crop back."""
    diffs = [max(p - s, 0) for s, p in zip(x.shape[2:], patch)]
    if not any(diffs):
        return x, tuple(slice(None) for _ in patch)
    pads = []
    for d in reversed(diffs):  # F.pad wants the last axis first
        pads += [d // 2, d - d // 2]
    crop = tuple(slice(d // 2, d // 2 + s) for d, s in zip(diffs, x.shape[2:]))
    return F.pad(x, pads, mode="constant", value=value), crop


def _default_device(predictor: Predictor, inputs: torch.Tensor) -> torch.device:
    if isinstance(predictor, torch.nn.Module):
        for p in itertools.chain(predictor.parameters(), predictor.buffers()):
            return p.device
    return inputs.device


def sliding_window_inference(
        inputs: torch.Tensor, predictor: Predictor, patch_size: Sequence[int] | int,
        overlap: float | Sequence[float] = DEFAULT_OVERLAP, blend: str = DEFAULT_BLEND,
        sigma_scale: float | Sequence[float] = 0.125, batch_size: int = DEFAULT_BATCH_SIZE,
        tta: bool | Sequence[int] = False, activation: str | None = None,
        device: torch.device | str | None = None, output_device: torch.device | str = "cpu",
        pad_value: float = 0.0, progress: bool = False) -> torch.Tensor:
    """Run ``predictor`` over overlapping windows of ``inputs`` and blend the outputs.

    Args:
        inputs: (N, C, *S) tensor, 2 or 3 spatial axes (any device).
        predictor: callable mapping (B, C, *P) to (B, K, *P) (logits); e.g. a model in eval mode.
        patch_size: window size per spatial axis (or one int for all).
        overlap: fraction of overlap between neighbouring windows, per axis or one value, in [0, 1).
        blend: 'gaussian', 'hann' or 'constant' weighting of each window.
        sigma_scale: Gaussian sigma as a fraction of the patch size.
        batch_size: windows per predictor call (windows of all N images are batched together).
        tta: mirror test-time augmentation: False, True (all spatial axes) or the axes to mirror.
        activation: None blends logits; 'softmax' / 'sigmoid' blends probabilities.
        device: where the predictor runs (default: the predictor's parameters, else the input's).
        output_device: where the float32 result is accumulated (default CPU).
        pad_value: value used to pad inputs smaller than the patch.
        progress: show a tqdm bar over window batches.

    Returns:
        (N, K, *S) float32 tensor on ``output_device``: blended logits (or probabilities).
    """
    sd = inputs.ndim - 2
    if sd not in (2, 3):
        raise ValueError(f"inputs must be (N, C, H, W) or (N, C, D, H, W), got shape {tuple(inputs.shape)}")
    patch = tuple(int(p) for p in to_ntuple(patch_size, sd))
    overlaps = tuple(float(o) for o in to_ntuple(overlap, sd))
    if any(not 0.0 <= o < 1.0 for o in overlaps) or any(p < 1 for p in patch) or batch_size < 1:
        raise ValueError(f"need 0 <= overlap < 1, patch >= 1, batch_size >= 1; got overlap={overlap}, "
                         f"patch_size={patch}, batch_size={batch_size}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    device = torch.device(device) if device is not None else _default_device(predictor, inputs)
    x, crop = _pad_to_patch(inputs, patch, pad_value)
    slices = window_slices(x.shape[2:], patch, overlaps)
    flips = mirror_axes(sd, tta)
    w_dev = blend_weight(patch, blend, sigma_scale, device)
    norm = _normaliser(x.shape[2:], slices, blend_weight(patch, blend, sigma_scale, output_device))
    jobs = [(n, sl) for n in range(x.shape[0]) for sl in slices]
    out = None
    with torch.no_grad():
        for b0 in _progress(range(0, len(jobs), batch_size), progress, len(jobs), batch_size):
            batch = jobs[b0:b0 + batch_size]
            win = torch.stack([x[(n, slice(None)) + sl] for n, sl in batch]).to(device, non_blocking=True)
            with torch.inference_mode():  # the result only feeds the (no-grad) accumulator below
                pred = _predict_window_batch(win, predictor, flips, activation).mul_(w_dev)
                pred = pred.to(output_device, torch.float32)
            if out is None:
                out = torch.zeros((x.shape[0], pred.shape[1], *x.shape[2:]), dtype=torch.float32,
                                  device=output_device)
            for j, (n, sl) in enumerate(batch):
                out[(n, slice(None)) + sl] += pred[j]
    out /= norm
    return out if x is inputs else out[(slice(None), slice(None)) + crop].contiguous()


def _normaliser(size: Sequence[int], slices: list[tuple[slice, ...]], weight: torch.Tensor) -> torch.Tensor:
    """Sum of the window weights at every voxel, (*size) float32."""
    norm = torch.zeros(tuple(size), dtype=torch.float32, device=weight.device)
    for sl in slices:
        norm[sl] += weight
    return norm


def _progress(it: range, enabled: bool, n_jobs: int, batch_size: int):
    if not enabled:
        return it
    from tqdm import tqdm
    return tqdm(it, desc=f"{n_jobs} windows", unit="batch", leave=False)


def predict_volume_2d(volume: torch.Tensor | np.ndarray, predictor: Predictor, slice_axis: int,
                      patch_size: Sequence[int] | int, slices_per_call: int = 32,
                      output_device: torch.device | str = "cpu", **kwargs) -> torch.Tensor:
    """Apply a 2D predictor slice by slice to a (C, X, Y, Z) volume.

    The volume is viewed as a stack of 2D images along ``slice_axis``; chunks of ``slices_per_call``
    slices go through ``sliding_window_inference`` together (their windows are batched across
    slices) and are written straight into the (K, X, Y, Z) result.

    Args:
        volume: (C, X, Y, Z) tensor or array.
        predictor: 2D callable (B, C, h, w) -> (B, K, h, w).
        slice_axis: spatial axis (0, 1 or 2) along which the volume is sliced.
        patch_size: 2D window size in the order of the remaining two spatial axes.
        slices_per_call: slices per ``sliding_window_inference`` call (bounds memory).
        output_device: where the result is accumulated.
        **kwargs: passed on to ``sliding_window_inference`` (overlap, blend, batch_size, tta, ...).

    Returns:
        (K, X, Y, Z) float32 tensor on ``output_device``.
    """
    vol = torch.as_tensor(volume)
    if vol.ndim != 4 or not 0 <= slice_axis < 3:
        raise ValueError(f"expected a (C, X, Y, Z) volume and slice_axis in 0..2, got shape "
                         f"{tuple(vol.shape)} and slice_axis={slice_axis}")
    stack = vol.movedim(slice_axis + 1, 0)  # (n_slices, C, a, b), a view
    out = out_stack = None
    for s0 in range(0, stack.shape[0], slices_per_call):
        res = sliding_window_inference(stack[s0:s0 + slices_per_call], predictor, patch_size,
                                       output_device=output_device, **kwargs)
        if out is None:
            out = torch.empty((res.shape[1], *vol.shape[1:]), dtype=torch.float32, device=output_device)
            out_stack = out.movedim(slice_axis + 1, 0)  # (n_slices, K, a, b) view of the result
        out_stack[s0:s0 + res.shape[0]] = res
    return out


def slicing_axis(image_dims: int, spatial_dims: int, slice_axis: int | None) -> int | None:
    """The spatial axis a ``spatial_dims``-D model runs slice by slice along on an image with
    ``image_dims`` spatial axes: ``slice_axis`` (default 2) for a 2D model on a volume, else None
    (windows over the whole image).  ``predict_image`` and ``count_windows`` decide by it."""
    if spatial_dims == 2 and image_dims == 3:
        return 2 if slice_axis is None else int(slice_axis)
    return None


def predict_image(image: torch.Tensor | np.ndarray, predictor: Predictor, spatial_dims: int,
                  patch_size: Sequence[int], slice_axis: int | None = None, **kwargs) -> torch.Tensor:
    """Blended outputs of one (C, *S) image: (K, *S) float32, windows over the image, or over its
    slices along ``slicing_axis`` (``predict_volume_2d``) for a 2D model on a volume.

    Args:
        image: (C, X, Y) or (C, X, Y, Z), normalised.
        predictor: a ``spatial_dims``-D callable (B, C, *P) -> (B, K, *P).
        spatial_dims: the predictor's spatial dims (2 or 3).
        patch_size: window size per spatial axis of the predictor.
        slice_axis: the axis a 2D predictor slices a volume along (None: 2).
        **kwargs: passed on to ``sliding_window_inference`` (overlap, blend, batch_size, tta, ...).
    """
    x = torch.as_tensor(image, dtype=torch.float32)
    axis = slicing_axis(x.ndim - 1, spatial_dims, slice_axis)
    if axis is not None:
        return predict_volume_2d(x, predictor, axis, patch_size, **kwargs)
    return sliding_window_inference(x[None], predictor, patch_size, **kwargs)[0]


def count_windows(shape: Sequence[int], spatial_dims: int, patch_size: Sequence[int], overlap: float,
                  slice_axis: int | None = None) -> int:
    """How many windows ``predict_image`` runs (without TTA) over an image of spatial ``shape``."""
    axis = slicing_axis(len(shape), spatial_dims, slice_axis)
    if axis is None:
        return len(window_slices(shape, patch_size, [overlap] * len(shape)))
    plane = [g for a, g in enumerate(shape) if a != axis]
    return shape[axis] * len(window_slices(plane, patch_size, [overlap] * 2))
