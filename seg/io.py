"""Reading and writing medical images with their geometry (SimpleITK).

Arrays are channels-first in torchio's voxel order: a 3D image is (C, X, Y, Z), a 2D image (C, X, Y),
i.e. ``sitk.GetArrayFromImage(img)`` with its spatial axes reversed.  ``ImageMeta`` keeps the geometry
in SimpleITK's own order (spacing and origin per (x, y, z) axis, direction as the row-major flattened
matrix), so writing a prediction back reproduces the input's size, spacing, origin and direction.

Writes are atomic: the file is written under its final name inside a hidden temporary folder next to
the destination, then moved into place with ``os.replace``.  A crash never leaves a half-written
output under the final name, and formats with a detached data file (.mhd/.raw, .nhdr/.raw.gz) keep a
header that names the right data file.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from seg.errors import DataError

#: Extensions we read and write, longest first so '.nii.gz' wins over '.gz'.
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png")
_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")


@dataclasses.dataclass(frozen=True)
class ImageMeta:
    """Geometry of an image, in SimpleITK's (x, y, z) axis order.

    Attributes:
        spacing: voxel size in mm per axis.
        origin: physical position of the first voxel's centre.
        direction: direction cosines, row-major flattened (d*d values).
        size: number of voxels per axis (= the array's spatial shape in torchio order).
        path: the file the image was read from ('' when built in memory).
    """

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    size: tuple[int, ...]
    path: str = ""

    @property
    def spatial_dims(self) -> int:
        return len(self.size)

    @classmethod
    def from_sitk(cls, img: sitk.Image, path: str | os.PathLike = "") -> "ImageMeta":
        return cls(tuple(img.GetSpacing()), tuple(img.GetOrigin()), tuple(img.GetDirection()),
                   tuple(img.GetSize()), str(path))

    def apply(self, img: sitk.Image) -> sitk.Image:
        """Copy this geometry onto ``img`` (whose size must match) and return it."""
        if tuple(img.GetSize()) != self.size:
            raise ValueError(f"image size {img.GetSize()} does not match the geometry {self.size}")
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img


def split_extension(path: str | os.PathLike) -> tuple[str, str]:
    """Split a file name into (stem, extension), knowing double extensions like '.nii.gz'."""
    name = Path(path).name
    lower = name.lower()
    for ext in IMAGE_EXTENSIONS + (".gz",):
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext):]
    return Path(name).stem, Path(name).suffix


def case_name(path: str | os.PathLike) -> str:
    """Case identifier of an image file: the name without extension and nnU-Net channel suffix.

    ``'brain1.nrrd' -> 'brain1'``, ``'la_003_0000.nii.gz' -> 'la_003'``.
    """
    return _CHANNEL_SUFFIX.sub("", split_extension(path)[0])


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` has one of the extensions we read (hidden files excluded)."""
    name = Path(path).name
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, ImageMeta]:
    """Read an image file as a channels-first array in torchio voxel order.

    Args:
        path: a .nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd or (2D) .png file.

    Returns:
        (array, meta): array (C, X, Y, Z) for 3D or (C, X, Y) for 2D, in the file's dtype; vector
        (multi-component) pixels become channels.

    Raises:
        DataError: the file is missing, unreadable or corrupt (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("no such image file", path)
    try:
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)
    except RuntimeError as e:  # SimpleITK reports every I/O problem as RuntimeError
        raise DataError(f"cannot read image ({_first_line(e)})", path) from None
    d = img.GetDimension()
    if img.GetNumberOfComponentsPerPixel() > 1:  # (*S reversed, C) -> (C, *S)
        arr = arr.transpose(d, *range(d - 1, -1, -1))
    else:
        arr = arr.transpose(*range(d - 1, -1, -1))[None]
    return np.ascontiguousarray(arr), ImageMeta.from_sitk(img, path)


def verify_nifti(path: str | Path, what: str = "image") -> None:
    """A NIfTI file's data is complete and finite (checks nothing for other formats).

    Raises:
        DataError: truncated or corrupt file, or NaN / infinite voxels.
    """
    if not str(path).lower().endswith((".nii", ".nii.gz")):
        return
    try:
        data = nib.load(str(path)).dataobj.get_unscaled()
    except Exception as exc:  # nibabel raises ImageFileError, EOFError, OSError, zlib.error ...
        detail = str(exc).splitlines()[0].replace(str(path), Path(path).name) if str(exc) else ""
        raise DataError(f"cannot read the {what}: the file is truncated or corrupt "
                        f"({type(exc).__name__}{': ' + detail if detail else ''})", path) from None
    check_finite(data, path, what)


def check_finite(image: np.ndarray, path: str | Path, what: str = "image") -> None:
    """No NaN or infinite values in the array read from ``path``."""
    if image.dtype.kind not in "fc":
        return
    bad = int(image.size - np.count_nonzero(np.isfinite(image)))
    if bad:
        raise DataError(f"{what} has {bad} NaN or infinite voxel(s); fix or mask them before training", path)


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "ERROR" in ln or "rror" in ln] or lines or ["unknown error"]
    return useful[-1][:200]


def label_dtype(labels: np.ndarray, num_classes: int | None = None) -> np.dtype:
    """uint8 when every label fits (at most 256 classes), else uint16."""
    top = (num_classes - 1) if num_classes else (int(labels.max()) if labels.size else 0)
    if top > np.iinfo(np.uint16).max:
        raise ValueError(f"{top + 1} classes do not fit a uint16 label map")
    return np.dtype(np.uint8) if top <= np.iinfo(np.uint8).max else np.dtype(np.uint16)


def write_label(path: str | os.PathLike, labels: np.ndarray, meta: ImageMeta,
                num_classes: int | None = None, compress: bool = True) -> Path:
    """Write a label map with the geometry of ``meta``, atomically.

    Args:
        path: destination; the format follows the extension.
        labels: (X, Y, Z) or (X, Y) integer array, shape equal to ``meta.size``.
        meta: geometry to copy (from ``read_image`` of the input).
        num_classes: number of classes; decides uint8 vs uint16 (default: from the maximum label).
        compress: compress where the format allows.

    Returns:
        The written path.
    """
    labels = np.asarray(labels)
    if labels.ndim != meta.spatial_dims:
        raise ValueError(f"labels of shape {labels.shape} do not match the geometry size {meta.size}")
    arr = labels.astype(label_dtype(labels, num_classes), copy=False)
    img = sitk.GetImageFromArray(arr.transpose(*range(arr.ndim - 1, -1, -1)))
    return _write_atomic(meta.apply(img), path, compress)


def write_image(path: str | os.PathLike, array: np.ndarray, meta: ImageMeta,
                compress: bool = True) -> Path:
    """Write a channels-first float image (e.g. class probabilities) with ``meta``'s geometry.

    Args:
        path: destination; the format follows the extension (not .png).
        array: (C, X, Y, Z) or (C, X, Y); C > 1 is stored as a vector image.
        meta: geometry to copy.
        compress: compress where the format allows.
    """
    array = np.asarray(array)
    if array.ndim != meta.spatial_dims + 1:
        raise ValueError(f"expected a channels-first array with {meta.spatial_dims} spatial axes, "
                         f"got shape {array.shape}")
    d = meta.spatial_dims
    if array.shape[0] == 1:
        img = sitk.GetImageFromArray(array[0].transpose(*range(d - 1, -1, -1)))
    else:  # (C, *S) -> (*S reversed, C)
        img = sitk.GetImageFromArray(array.transpose(*range(d, 0, -1), 0), isVector=True)
    return _write_atomic(meta.apply(img), path, compress)


def _write_atomic(img: sitk.Image, path: str | os.PathLike, compress: bool) -> Path:
    """Write ``img`` under its final name in a temporary sibling folder, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.lower().endswith(".png"):
        compress = False  # PNG is always compressed; SimpleITK rejects the flag for it
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        sitk.WriteImage(img, str(tmp / path.name), compress)
        written = sorted(tmp.iterdir(), key=lambda p: p.name == path.name)  # named file last
        for f in written:
            os.replace(f, path.parent / f.name)
    except RuntimeError as e:
        raise DataError(f"cannot write image ({_first_line(e)})", path) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def with_extension(path: str | os.PathLike, ext: str) -> Path:
    """Replace a (possibly double) image extension: ``with_extension('a/b.nii.gz', '.nrrd')``."""
    path = Path(path)
    ext = ext if ext.startswith(".") else "." + ext
    return path.with_name(split_extension(path)[0] + ext)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and is_image_file(p))


def group_channels(paths: Sequence[Path]) -> dict[str, list[Path]]:
    """Group files into cases: nnU-Net style ``case_0000``, ``case_0001`` files form one case.

    Returns:
        {case key: paths sorted by channel}, in the order of the first file of each case.
    """
    cases: dict[str, list[Path]] = {}
    for p in paths:  # only suffixed files are grouped; 'a.nii.gz' and 'a.nrrd' stay two cases
        stem = split_extension(p)[0]
        cases.setdefault(case_name(p) if _CHANNEL_SUFFIX.search(stem) else p.name, []).append(p)
    return {k: sorted(v, key=lambda p: p.name) for k, v in cases.items()}
