"""Reading one case as arrays, preprocessed exactly as inference preprocesses its input.

Arrays are channels-first in torchio voxel order: images (C, X, Y, Z) or (C, X, Y), labels (X, Y, Z) or
(X, Y); spacings are per axis in the same order.  Inference (``seg.predict.Predictor``) normalises the
raw image, then resamples it linearly to the target spacing; ``load_case_arrays`` does the same, with
the settings ``seg.checkpoint.preprocessing_from`` stores in the checkpoint.
"""
from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from seg import io
from seg.checkpoint import preprocessing_from
from seg.errors import DataError
from seg.preprocess import Preprocessing, normalize, resample, target_grid

from datasets.cases import Case


@dataclasses.dataclass
class CaseArrays:
    """One preprocessed case.

    Attributes:
        name: case name.
        image: (C, *S) float32, normalised (and resampled when a target spacing is set).
        label: (*S) int64 class indices, remapped.
        spacing: voxel size (mm) of the arrays per spatial axis, in the arrays' (X, Y[, Z]) order.
        meta: geometry of the original image file.
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, ...]
    meta: io.ImageMeta


def read_channels(paths: Sequence[Path]) -> list[tuple[np.ndarray, io.ImageMeta]]:
    """Read a case's channel files: [(array (c, *S), meta)] per file, all on the first file's grid.

    Raises:
        DataError: a file is unreadable, or its grid differs from the first channel's.
    """
    out: list[tuple[np.ndarray, io.ImageMeta]] = []
    for p in paths:
        arr, meta = io.read_image(p)
        first = out[0][1] if out else meta
        if meta.size != first.size or not np.allclose(meta.spacing, first.spacing, rtol=1e-3):
            raise DataError(f"channel grid {meta.size} @ {meta.spacing} mm differs from "
                            f"{Path(first.path).name} ({first.size} @ {first.spacing} mm)", p)
        out.append((arr, meta))
    return out


def read_case_image(paths: Sequence[Path]) -> tuple[np.ndarray, io.ImageMeta]:
    """Read a case's channel files stacked: (C, *S) in the files' dtype, with the first file's geometry."""
    channels = read_channels(paths)
    if len(channels) == 1:
        return channels[0]
    return np.concatenate([a for a, _ in channels]), channels[0][1]


def read_label_raw(path: Path) -> tuple[np.ndarray, io.ImageMeta]:
    """Read a label map as (*S) in its file dtype (identical vector components, e.g. RGB masks, merged).

    Raises:
        DataError: unreadable, or components that differ (not a label map).
    """
    arr, meta = io.read_image(path)
    if arr.shape[0] > 1 and not all(np.array_equal(arr[0], a) for a in arr[1:]):
        raise DataError(f"label map has {arr.shape[0]} different components per voxel; save it as a "
                        "single-channel integer image", path)
    return arr[0], meta


def remap_labels(label: np.ndarray, label_remap: Mapping[int, int] | None) -> np.ndarray:
    """Apply ``{old: new}`` to a label array (simultaneously, so {1: 2, 2: 1} swaps); a copy."""
    out = np.array(label, copy=True)
    for old, new in (label_remap or {}).items():
        out[label == old] = new
    return out


def as_class_indices(label: np.ndarray, label_remap: Mapping[int, int] | None) -> np.ndarray:
    """Remapped int64 class indices of a label array of any numeric dtype (floats are rounded)."""
    if label.dtype.kind == "f":
        label = np.rint(label)
    return remap_labels(label, label_remap).astype(np.int64)


def preprocessing_for(data_cfg: Any) -> Preprocessing:
    """The ``Preprocessing`` a checkpoint of this data config stores (so inference matches training)."""
    return preprocessing_from(types.SimpleNamespace(data=data_cfg))


def check_channels(channels: int, dims: int, data_cfg: Any, path: Path) -> None:
    """An image of ``channels`` channels and ``dims`` spatial axes fits ``data.in_channels`` and
    ``data.spatial_dims`` (2D training also takes 3D volumes, sliced)."""
    if channels != data_cfg.in_channels:
        raise DataError(f"has {channels} channel(s) but data.in_channels={data_cfg.in_channels}", path)
    if dims < data_cfg.spatial_dims:
        raise DataError(f"is a {dims}D image but data.spatial_dims={data_cfg.spatial_dims}", path)


def load_case_arrays(case: Case, data_cfg: Any) -> CaseArrays:
    """Read, normalise and (optionally) resample one case.

    Args:
        case: the case.
        data_cfg: ``hparam.DataConfig`` (normalisation, target spacing, label remap, channels).

    Returns:
        ``CaseArrays``: 3D files give (C, X, Y, Z) / (X, Y, Z) arrays also for 2D configs (validation
        slices whole volumes), native 2D images (C, X, Y) / (X, Y).

    Raises:
        DataError: unreadable files, channel count or dimensionality that does not fit the config, or
            a label grid unlike the image's (``check_case`` reports the rest).
    """
    image, meta = read_case_image(case.images)
    check_channels(image.shape[0], image.ndim - 1, data_cfg, case.image)
    raw_label, _ = read_label_raw(case.label)
    label = as_class_indices(raw_label, data_cfg.label_remap)
    if label.shape != image.shape[1:]:
        raise DataError(f"label shape {label.shape} differs from the image's {image.shape[1:]}", case.label)
    pp = preprocessing_for(data_cfg)
    x = normalize(image, pp)
    shape, spacing = tuple(label.shape), tuple(float(s) for s in meta.spacing)
    grid = target_grid(shape, spacing, pp.target_spacing, data_cfg.slice_axis)
    if grid != shape:
        x = resample(x, grid, mode="linear")
        label = resample(label[None], grid, mode="nearest")[0]
        spacing = tuple(n * s / g for n, s, g in zip(shape, spacing, grid))
    return CaseArrays(case.name, np.ascontiguousarray(x, dtype=np.float32),
                      np.ascontiguousarray(label, dtype=np.int64), spacing, meta)
