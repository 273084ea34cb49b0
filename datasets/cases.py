"""Finding training cases on disk: images paired with label maps BY NAME, and seeded splits.

Pairing rule (never by sort order):

* an image whose name without extension equals a label's name without extension is a one-channel case
  (``images/brain1.nrrd`` + ``labels/brain1.nii.gz``; extensions may differ);
* otherwise the nnU-Net channel suffix is stripped and files sharing the rest form one multi-channel
  case, channels ordered ``_0000``, ``_0001``, ... (``la_003_0000.nii.gz`` + ``la_003_0001.nii.gz`` +
  ``labels/la_003.nii.gz``).

The first rule keeps datasets whose case names merely end in four digits (``case_0001.nii.gz`` in both
folders) from being mistaken for channel files.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from seg import io
from seg.errors import DataError, UserError

log = logging.getLogger(__name__)

_CHANNEL = re.compile(r"_(\d{4})$")


@dataclasses.dataclass(frozen=True)
class Case:
    """One training case.

    Attributes:
        name: the case name shared by its image and label files.
        images: the image file, or one file per channel in channel order.
        label: the label map file.
    """

    name: str
    images: tuple[Path, ...]
    label: Path

    @property
    def image(self) -> Path:
        """The first (or only) image file; errors about the image name it."""
        return self.images[0]


def _stem(path: Path) -> str:
    return io.split_extension(path)[0]


def _image_files(folder: Path, pattern: str) -> list[Path]:
    """Image files of ``folder`` whose names match ``pattern``; a DataError when there are none."""
    if not folder.is_dir():
        raise DataError("image folder not found", folder)
    files = [p for p in io.list_images(folder) if fnmatch.fnmatch(p.name, pattern)]
    if not files:
        which = f" matching {pattern!r}" if pattern != "*" else ""
        raise DataError(f"no image files{which} in this folder (expected {', '.join(io.IMAGE_EXTENSIONS)})",
                        folder)
    return files


def _label_files(folder: Path) -> dict[str, Path]:
    """{name without extension: label file} of ``folder``; two files for one name is an error."""
    if not folder.is_dir():
        raise DataError("label folder not found", folder)
    labels: dict[str, Path] = {}
    for p in io.list_images(folder):
        if _stem(p) in labels:
            raise DataError(f"two label files for case {_stem(p)!r}: {labels[_stem(p)].name} and {p.name}",
                            folder)
        labels[_stem(p)] = p
    return labels


def _group_images(files: Sequence[Path], label_stems: set[str]) -> dict[str, list[Path]]:
    """Group image files into cases by the pairing rule of this module's docstring."""
    groups: dict[str, list[Path]] = {}
    for p in files:
        stem = _stem(p)
        key = stem if stem in label_stems else io.case_name(p)
        groups.setdefault(key, []).append(p)
    return {key: _channel_order(key, paths) for key, paths in groups.items()}


def _channel_order(key: str, paths: list[Path]) -> list[Path]:
    """Check that the files of one case are its channels _0000.._{n-1}; return them in that order."""
    if len(paths) == 1:
        return paths
    indices = []
    for p in paths:
        m = _CHANNEL.search(_stem(p))
        if m is None or _stem(p)[: m.start()] != key:
            names = ", ".join(q.name for q in paths)
            raise DataError(f"several image files for case {key!r} ({names}): keep one, or name channel "
                            f"files {key}_0000, {key}_0001, ...", p)
        indices.append(int(m.group(1)))
    order = sorted(range(len(paths)), key=indices.__getitem__)
    if sorted(indices) != list(range(len(paths))):
        raise DataError(f"channel files of case {key!r} have suffixes "
                        f"{', '.join(f'_{i:04d}' for i in sorted(indices))}; expected _0000 to "
                        f"_{len(paths) - 1:04d}", paths[order[0]])
    return [paths[i] for i in order]


def find_cases(images_dir: str | Path, labels_dir: str | Path, pattern: str = "*") -> list[Case]:
    """Pair the images of ``images_dir`` with the label maps of ``labels_dir`` by name.

    Args:
        images_dir: folder of images (.nii.gz .nii .nrrd .nhdr .mha .mhd .png); nnU-Net ``_0000``
            channel files are grouped into one case.
        labels_dir: folder of label maps, one per case, named like the case.
        pattern: glob applied to image file names.

    Returns:
        The cases sorted by name.

    Raises:
        DataError: a folder is missing or has no images, an image has no label, names are ambiguous.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    files = _image_files(images_dir, pattern)
    labels = _label_files(labels_dir)
    groups = _group_images(files, set(labels))
    cases = []
    for name, paths in sorted(groups.items()):
        if name not in labels:
            raise DataError(f"no label map named {name!r} (any image extension) in {labels_dir}; "
                            "labels are paired with images by name", paths[0])
        cases.append(Case(name, tuple(paths), labels[name]))
    orphans = sorted(set(labels) - set(groups))
    if orphans:
        log.warning("%d label file(s) in %s have no image and are ignored: %s", len(orphans), labels_dir,
                    ", ".join(labels[n].name for n in orphans[:5]) + (" ..." if len(orphans) > 5 else ""))
    return cases


def split_cases(cases: Sequence[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Seeded case-level split into (train, validation), at least one case in each.

    The split depends only on the case names, ``val_fraction`` and ``seed`` (not on the input order).

    Raises:
        UserError: fewer than two cases.
    """
    ordered = sorted(cases, key=lambda c: c.name)
    n = len(ordered)
    if n < 2:
        raise UserError(f"{n} case(s) found: a validation split needs at least 2 (or set "
                        "data.val_images_dir and data.val_labels_dir)")
    n_val = min(n - 1, max(1, int(round(n * val_fraction))))
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[:n_val].tolist())
    train = [c for i, c in enumerate(ordered) if i not in val_idx]
    val = [c for i, c in enumerate(ordered) if i in val_idx]
    return train, val
