"""Checks of one case before training: each problem is a one-line ``DataError`` naming the culprit file.

SimpleITK may read a truncated NIfTI file (.nii or .nii.gz) without an error and silently turns NaN and
infinite voxels of NIfTI files into 0, so NIfTI files are also read once with nibabel to catch both
(``seg.io.verify_nifti``, which inference uses too).

Tolerances for image/label geometry (headers store floats, often float32): spacing within a relative
1e-3, origin within 5 % of the smallest voxel size, direction cosines within 1e-3.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from seg import io
from seg.io import check_finite, verify_nifti
from seg.errors import DataError

from datasets.arrays import check_channels, read_channels, read_label_raw, remap_labels
from datasets.cases import Case

SPACING_RTOL = 1e-3
ORIGIN_TOL_VOXELS = 0.05
DIRECTION_ATOL = 1e-3


def check_case(case: Case, num_classes: int, label_remap: Mapping[int, int] | None = None,
               data_cfg: Any = None) -> None:
    """Read a case and check that it can be trained on.

    Checks: files readable; label and image with the same number of spatial axes, size, spacing, origin
    and direction; finite image intensities; integer label values in [0, num_classes) after
    ``label_remap`` (0/255 masks get the remap to use).  With ``data_cfg`` also the channel count and
    dimensionality against ``data.in_channels`` / ``data.spatial_dims``.

    Raises:
        DataError: the first problem found, naming the file at fault.
    """
    for path in case.images:
        verify_nifti(path, "image")
    verify_nifti(case.label, "label map")
    channels = read_channels(case.images)
    label, lab_meta = read_label_raw(case.label)
    check_geometry(channels[0][1], lab_meta)
    for arr, meta in channels:
        check_finite(arr, meta.path)
    check_label_values(label, num_classes, label_remap, case.label)
    if data_cfg is not None:
        check_channels(sum(a.shape[0] for a, _ in channels), lab_meta.spatial_dims, data_cfg,
                       case.image)


def check_geometry(img: io.ImageMeta, lab: io.ImageMeta) -> None:
    """Label and image share dims, size, spacing, origin and direction (within tolerances)."""
    image_name = img.path or "the image"
    if lab.spatial_dims != img.spatial_dims:
        raise DataError(f"label map is {lab.spatial_dims}D (size {lab.size}) but its image {image_name} "
                        f"is {img.spatial_dims}D (size {img.size})", lab.path)
    problems = []
    if lab.size != img.size:
        problems.append(f"size {lab.size} vs {img.size}")
    if not np.allclose(lab.spacing, img.spacing, rtol=SPACING_RTOL, atol=0):
        problems.append(f"spacing {_fmt(lab.spacing)} vs {_fmt(img.spacing)} mm")
    tol = ORIGIN_TOL_VOXELS * min(img.spacing)
    if np.max(np.abs(np.subtract(lab.origin, img.origin))) > tol:
        problems.append(f"origin {_fmt(lab.origin)} vs {_fmt(img.origin)}")
    if not np.allclose(lab.direction, img.direction, rtol=0, atol=DIRECTION_ATOL):
        problems.append(f"direction {_fmt(lab.direction)} vs {_fmt(img.direction)}")
    if problems:
        raise DataError(f"label geometry differs from its image {image_name}: {'; '.join(problems)} "
                        "(label vs image)", lab.path)


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def label_values(label: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a label array (a bincount for compact integer ranges)."""
    if label.dtype.kind in "iub" and label.size:
        lo, hi = int(label.min()), int(label.max())
        if hi - lo < 1 << 20:
            counts = np.bincount((label.ravel().astype(np.int64) - lo))
            return np.flatnonzero(counts) + lo
    return np.unique(label)


def check_label_values(label: np.ndarray, num_classes: int, label_remap: Mapping[int, int] | None,
                       path: str | Path) -> None:
    """Label values are integers in [0, num_classes) after ``label_remap``; else a hint how to fix."""
    values = label_values(label)
    if label.dtype.kind == "f":
        fractional = values[~np.isfinite(values) | (values != np.round(values))]
        if fractional.size:
            raise DataError(f"label map has non-integer values (e.g. {fractional[0]:g}); labels must be "
                            "class indices 0.." f"{num_classes - 1}", path)
    mapped = label_values(remap_labels(values.astype(np.int64), label_remap))
    bad = mapped[(mapped < 0) | (mapped >= num_classes)]
    if bad.size:
        raise DataError(_range_message(mapped, bad, num_classes, label_remap), path)


def _range_message(values: np.ndarray, bad: np.ndarray, num_classes: int,
                   label_remap: Mapping[int, int] | None) -> str:
    """One line saying which label values are out of range, and the remap that would fix them."""
    shown = ", ".join(str(int(v)) for v in values[:8]) + (", ..." if len(values) > 8 else "")
    msg = (f"label values {{{shown}}} include {', '.join(str(int(v)) for v in bad[:5])} outside "
           f"0..{num_classes - 1} ({num_classes} classes in data.class_names"
           f"{', after data.label_remap' if label_remap else ''})")
    nonzero = [int(v) for v in values if v != 0]
    if 255 in bad and len(nonzero) == 1:
        return (msg + "; this looks like a binary mask stored as 0/255: map it with "
                '--set "data.label_remap={255: 1}"')
    if len(values) <= num_classes and values.min() >= 0:
        remap = ", ".join(f"{v}: {i + 1}" for i, v in enumerate(nonzero) if v != i + 1)
        return msg + f'; if the values are classes in this order, map them with --set "data.label_remap={{{remap}}}"'
    return msg + "; fix the label files, add class names (data.class_names) or map values with data.label_remap"
