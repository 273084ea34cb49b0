"""Reading one case as arrays, preprocessed exactly as inference preprocesses its input.

Arrays are channels-first in torchio voxel order: images (C, X, Y, Z) or (C, X, Y), labels (X, Y, Z) or
(X, Y); spacings are per axis in the same order.  Inference (``seg.predict.Predictor``) normalises the
raw image, then resamples it linearly to the target spacing; ``load_case_arrays`` does the same, with
the settings a run stores in its checkpoint (``seg.spec.preprocessing_from``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from seg import io
from seg.spec import preprocessing_from
from seg.errors import DataError
from seg.io import Case
from seg.preprocess import Preprocessing, normalize, resample, target_grid


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


def read_case_image(paths: Sequence[Path]) -> tuple[np.ndarray, io.ImageMeta]:
    """``seg.io.read_case`` of files ``check_case`` has verified: (C, *S) in the files' dtype."""
    return io.read_case(paths, verify=False)


def read_label_raw(path: Path) -> tuple[np.ndarray, io.ImageMeta]:
    """``seg.io.read_label`` of a file ``check_case`` has verified: (*S) integers."""
    return io.read_label(path, verify=False)


def remap_labels(label: np.ndarray, label_remap: Mapping[int, int] | None) -> np.ndarray:
    """Apply ``{old: new}`` to a label array (simultaneously, so {1: 2, 2: 1} swaps); a copy."""
    out = np.array(label, copy=True)
    for old, new in (label_remap or {}).items():
        out[label == old] = new
    return out


def as_class_indices(label: np.ndarray, label_remap: Mapping[int, int] | None) -> np.ndarray:
    """Remapped int64 class indices of an integer label array (``read_label_raw``)."""
    return remap_labels(label, label_remap).astype(np.int64)


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
    raw_label, label_meta = read_label_raw(case.label)
    io.check_geometry(label_meta, meta)
    label = as_class_indices(raw_label, data_cfg.label_remap)
    pp = preprocessing_from(data_cfg)
    x = normalize(image, pp)
    shape, spacing = tuple(label.shape), tuple(float(s) for s in meta.spacing)
    grid = target_grid(shape, spacing, pp.target_spacing, data_cfg.slice_axis)
    if grid != shape:
        x = resample(x, grid, mode="linear")
        label = resample(label[None], grid, mode="nearest")[0]
        spacing = tuple(n * s / g for n, s, g in zip(shape, spacing, grid))
    return CaseArrays(case.name, np.ascontiguousarray(x, dtype=np.float32),
                      np.ascontiguousarray(label, dtype=np.int64), spacing, meta)


def load_validation_case(case: Case, data_cfg: Any) -> CaseArrays:
    """A validation case as inference sees it: the image on the network's grid (normalised and
    resampled as ``load_case_arrays`` does) and the label and spacing of the file's own grid.

    Validation scores where ``infer_seg.py`` writes: logits resampled to the file's grid before the
    argmax (``seg.predict.to_input_grid``), against the label as stored, so ``val_log.csv`` and the
    choice of ``best.pt`` agree with what ``infer_seg.py --labels`` reports.  ``image`` and ``label``
    have different grids when a target spacing resamples the case.
    """
    arrays = load_case_arrays(case, data_cfg)
    if tuple(arrays.label.shape) == tuple(arrays.meta.size):  # not resampled
        return arrays
    raw_label, meta = read_label_raw(case.label)
    label = as_class_indices(raw_label, data_cfg.label_remap)
    return dataclasses.replace(arrays, label=np.ascontiguousarray(label),
                               spacing=tuple(float(s) for s in meta.spacing))
