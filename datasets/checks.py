"""Checks of one case before training: each problem is a one-line ``DataError`` naming the culprit file.

Files are read with ``seg.io`` (the reader inference and evaluation use): readable, complete and
finite, channels on one grid, label maps of integers; the label map must have its image's geometry
within ``seg.io``'s one tolerance.  Then the label values are checked against the classes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from seg import io
from seg.dataset_json import channel_normalization, label_values
from seg.errors import DataError
from seg.preprocess import check_intensities

from datasets.arrays import check_channels, remap_labels


def check_case(case: io.Case, num_classes: int, label_remap: Mapping[int, int] | None = None,
               data_cfg: Any = None) -> None:
    """Read a case and check that it can be trained on.

    Checks: files readable, complete and finite; channels on one grid (``seg.io.read_case``); label
    and image with the same number of spatial axes, size, spacing, origin and direction
    (``seg.io.check_geometry``); integer label values in [0, num_classes) after ``label_remap``
    (0/255 masks get the remap to use).  With ``data_cfg`` also the channel count and
    dimensionality against ``data.in_channels`` / ``data.spatial_dims``, and the intensities against
    the range their normalisation takes (``seg.preprocess.check_intensities``: rgb_to_0_1).

    Raises:
        DataError: the first problem found, naming the file at fault.
    """
    image, meta = io.read_case(case.images)
    label, label_meta = io.read_label(case.label)
    io.check_geometry(label_meta, meta)
    check_label_values(label, num_classes, label_remap, case.label)
    if data_cfg is not None:
        check_channels(image.shape[0], label_meta.spatial_dims, data_cfg, case.image)
        check_intensities(image, _schemes(data_cfg, image.shape[0]), case.image)


def _schemes(data_cfg: Any, channels: int) -> list[str | None]:
    """Each channel's normalisation as far as known before the plan: ``data.normalization``, or
    (when 'auto') the scheme a ``dataset.json`` channel name means."""
    norm = data_cfg.normalization
    if isinstance(norm, str) and norm == "auto":
        return channel_normalization(getattr(data_cfg, "channel_names", None)) or []
    return [norm] * channels if isinstance(norm, str) else list(norm)


def check_label_values(label: np.ndarray, num_classes: int, label_remap: Mapping[int, int] | None,
                       path: str | Path) -> None:
    """Integer label values (``seg.io.read_label``) are in [0, num_classes) after ``label_remap``;
    else a hint how to fix."""
    values = label_values(label)
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
