"""The one reader and writer of images, label maps and cases, for training, inference and evaluation.

Arrays are channels-first in torchio's voxel order: a 3D image is (C, X, Y, Z), a 2D image (C, X, Y),
i.e. ``sitk.GetArrayFromImage(img)`` with its spatial axes reversed.  ``ImageMeta`` keeps the geometry
in SimpleITK's own order (spacing and origin per (x, y, z) axis, direction as the row-major flattened
matrix), so writing a prediction back reproduces the input's size, spacing, origin and direction.

Files and cases (``image_cases``, ``label_files``): every extension of ``IMAGE_EXTENSIONS`` is read
everywhere.  A case is named by its file name without extension; nnU-Net channel files
``name_0000``, ``name_0001``, ... form one multi-channel case ``name`` only when ``name_0000`` exists,
otherwise each file is its own case (``case_0001.nii.gz`` and ``case_0002.nii.gz`` are two
one-channel cases).  A label map (or a prediction) is always one file, named like its case.

Reading (``read_image``, ``read_case``, ``read_label``) refuses, in one ``DataError`` line naming the
file: unreadable files, NaN or infinite voxels (any format; NIfTI files are also read with nibabel,
because SimpleITK may read a truncated NIfTI without an error and turns its NaN voxels into 0),
channel files on different grids, label maps with non-integer values or differing vector components.

One geometry tolerance (``check_geometry``) for every comparison of two grids (image and label,
channel and channel, prediction and label): headers store floats, often float32, so spacing may
differ by a relative 1e-3, origin by 5 % of the smallest voxel size, direction cosines by 1e-3.

Writes are atomic: the file is written under its final name inside a hidden temporary folder next to
the destination, then moved into place with ``os.replace``.  A crash never leaves a half-written
output under the final name, and formats with a detached data file (.mhd/.raw, .nhdr/.raw.gz) keep a
header that names the right data file.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from seg.errors import DataError

#: Extensions we read and write, longest first so '.nii.gz' wins over '.gz'.
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png")
_CHANNEL_SUFFIX = re.compile(r"_(\d{4})$")

#: The geometry tolerance of ``check_geometry`` (see the module docstring).
SPACING_RTOL = 1e-3
ORIGIN_TOL_VOXELS = 0.05
DIRECTION_ATOL = 1e-3


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


@dataclasses.dataclass(frozen=True)
class Case:
    """One case.

    Attributes:
        name: the case name: the file name without extension (and without ``_0000`` for channel files).
        images: the image file, or one file per channel in channel order.
        label: its label map, where there is one (training).
    """

    name: str
    images: tuple[Path, ...]
    label: Path | None = None

    @property
    def image(self) -> Path:
        """The first (or only) image file; errors about the image name it."""
        return self.images[0]


# ----------------------------------------------------------------------------- files and cases
def split_extension(path: str | os.PathLike) -> tuple[str, str]:
    """Split a file name into (stem, extension), knowing double extensions like '.nii.gz'."""
    name = Path(path).name
    lower = name.lower()
    for ext in IMAGE_EXTENSIONS + (".gz",):
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext):]
    return Path(name).stem, Path(name).suffix


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` has one of the extensions we read (hidden files excluded)."""
    name = Path(path).name
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and is_image_file(p))


def image_cases(inputs: str | os.PathLike | Sequence[str | os.PathLike], pattern: str = "*") -> list[Case]:
    """The cases of image folders and files, grouped by the rule of the module docstring.

    Args:
        inputs: a folder (the image files directly inside it), an image file, or a list of both.
        pattern: glob the file names must match.

    Returns:
        The cases in the order of their first file (a folder's files sorted by name).

    Raises:
        DataError: an input does not exist, no image file, channel files with missing suffixes.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            files += list_images(item)
        elif item.exists() or is_image_file(item):  # a missing image file fails as its own case
            files.append(item)
        else:
            raise DataError("no such file or folder", item)
    files = [p for p in files if fnmatch.fnmatch(p.name, pattern)]
    if not files:
        which = f" matching {pattern!r}" if pattern != "*" else ""
        raise DataError(f"no image files{which} (expected {', '.join(IMAGE_EXTENSIONS)})", items[0])
    return group_cases(files)


def group_cases(files: Sequence[Path]) -> list[Case]:
    """Cases of ``files``: ``name_0000``, ``name_0001``, ... form one case when ``name_0000`` is
    among them; any other file is a case of its own (``a.nii.gz`` and ``a.nrrd`` are two)."""
    stems = {split_extension(p)[0] for p in files}
    groups: dict[tuple[str, Path | None], list[Path]] = {}  # (name, the file of a one-file case)
    for p in map(Path, files):
        stem = split_extension(p)[0]
        base = _CHANNEL_SUFFIX.sub("", stem)
        key = (base, None) if base != stem and f"{base}_0000" in stems else (stem, p)
        groups.setdefault(key, []).append(p)
    return [Case(name, tuple(paths) if file else _channel_order(name, paths))
            for (name, file), paths in groups.items()]


def _channel_order(name: str, paths: list[Path]) -> tuple[Path, ...]:
    """The channel files of case ``name`` ordered _0000, _0001, ...; a DataError unless complete."""
    index = {p: int(_CHANNEL_SUFFIX.search(split_extension(p)[0]).group(1)) for p in paths}
    order = sorted(paths, key=lambda p: (index[p], p.name))
    if [index[p] for p in order] != list(range(len(order))):
        found = ", ".join(f"_{index[p]:04d}" for p in order)
        raise DataError(f"channel files of case {name!r} have suffixes {found}; expected _0000 to "
                        f"_{len(order) - 1:04d}", order[0])
    return tuple(order)


def label_files(folder: str | os.PathLike) -> dict[str, Path]:
    """{case name: file} of the label maps (or predictions) in ``folder``, each one file named like
    its case (no channel grouping).

    Raises:
        DataError: no such folder, or two files for one name (``a.nii.gz`` and ``a.nrrd``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("folder not found", folder)
    files: dict[str, Path] = {}
    for p in list_images(folder):
        name = split_extension(p)[0]
        if name in files:
            raise DataError(f"two files for case {name!r}: {files[name].name} and {p.name}", folder)
        files[name] = p
    return files


# ----------------------------------------------------------------------------- reading
def channel_count(case: Case) -> int:
    """Channels of a case from its headers (no voxels read): files x components per pixel.

    Raises:
        DataError: a file that cannot be read.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(case.image))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise DataError(f"cannot read image ({_first_line(e)})", case.image) from None
    return len(case.images) * int(reader.GetNumberOfComponents())


def read_image(path: str | os.PathLike, verify: bool = True) -> tuple[np.ndarray, ImageMeta]:
    """Read an image file as a channels-first array in torchio voxel order.

    Args:
        path: a .nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd or (2D) .png file.
        verify: refuse NaN / infinite voxels and truncated NIfTI files (False: the file was
            verified before, e.g. by ``datasets.check_case``).

    Returns:
        (array, meta): array (C, X, Y, Z) for 3D or (C, X, Y) for 2D, in the file's dtype; vector
        (multi-component) pixels become channels.

    Raises:
        DataError: the file is missing, unreadable, corrupt or not finite (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("no such image file", path)
    try:
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)
    except RuntimeError as e:  # SimpleITK reports every I/O problem as RuntimeError
        raise DataError(f"cannot read image ({_first_line(e)})", path) from None
    if verify:  # SimpleITK turns NaN voxels of NIfTI files into 0: check what nibabel reads
        _check_finite(_nifti_data(path) if _is_nifti(path) else arr, path)
    d = img.GetDimension()
    if img.GetNumberOfComponentsPerPixel() > 1:  # (*S reversed, C) -> (C, *S)
        arr = arr.transpose(d, *range(d - 1, -1, -1))
    else:
        arr = arr.transpose(*range(d - 1, -1, -1))[None]
    return np.ascontiguousarray(arr), ImageMeta.from_sitk(img, path)


def read_case(paths: str | os.PathLike | Sequence[str | os.PathLike], verify: bool = True
              ) -> tuple[np.ndarray, ImageMeta]:
    """Read one case (an image file, or one file per channel) as (C, *S) with the first file's geometry.

    Raises:
        DataError: a file ``read_image`` refuses, or a channel whose geometry differs from the first's.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    arrays, meta = [], None
    for p in paths:
        arr, m = read_image(p, verify)
        if meta is not None:
            check_geometry(m, meta, "channel", "first channel")
        arrays.append(arr)
        meta = meta or m
    return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays)), meta


def read_label(path: str | os.PathLike, verify: bool = True) -> tuple[np.ndarray, ImageMeta]:
    """Read a label map (or a prediction) as (*S) integers: the file's dtype, int64 for float files.

    Identical vector components (e.g. RGB masks) are merged.

    Raises:
        DataError: a file ``read_image`` refuses, components that differ, non-integer values.
    """
    arr, meta = read_image(path, verify)
    if arr.shape[0] > 1 and not all(np.array_equal(arr[0], a) for a in arr[1:]):
        raise DataError(f"label map has {arr.shape[0]} different components per voxel; save it as a "
                        "single-channel integer image", path)
    label = arr[0]
    if label.dtype.kind == "f":
        fractional = label[label != np.round(label)]
        if fractional.size:
            raise DataError(f"label map has non-integer values (e.g. {fractional[0]:g}); labels must "
                            "be integers", path)
        label = label.astype(np.int64)
    return label, meta


def check_geometry(meta: ImageMeta, ref: ImageMeta, what: str = "label map", ref_what: str = "image"
                   ) -> None:
    """``meta`` has the dims, size, spacing, origin and direction of ``ref`` within the one
    tolerance (module docstring); else a DataError naming ``meta``'s file, then ``ref``'s."""
    other = f"its {ref_what} {ref.path}" if ref.path else f"its {ref_what}"
    if meta.spatial_dims != ref.spatial_dims:
        raise DataError(f"{what} is {meta.spatial_dims}D (size {meta.size}) but {other} is "
                        f"{ref.spatial_dims}D (size {ref.size})", meta.path)
    problems = []
    if meta.size != ref.size:
        problems.append(f"size {meta.size} vs {ref.size}")
    if not np.allclose(meta.spacing, ref.spacing, rtol=SPACING_RTOL, atol=0):
        problems.append(f"spacing {_fmt(meta.spacing)} vs {_fmt(ref.spacing)} mm")
    if np.max(np.abs(np.subtract(meta.origin, ref.origin))) > ORIGIN_TOL_VOXELS * min(ref.spacing):
        problems.append(f"origin {_fmt(meta.origin)} vs {_fmt(ref.origin)}")
    if not np.allclose(meta.direction, ref.direction, rtol=0, atol=DIRECTION_ATOL):
        problems.append(f"direction {_fmt(meta.direction)} vs {_fmt(ref.direction)}")
    if problems:
        raise DataError(f"{what} geometry differs from {other}: {'; '.join(problems)} "
                        f"({what} vs {ref_what})", meta.path)


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _nifti_data(path: Path) -> np.ndarray:
    """The stored voxels of a NIfTI file read with nibabel (DataError when truncated or corrupt)."""
    try:
        return nib.load(str(path)).dataobj.get_unscaled()
    except Exception as exc:  # nibabel raises ImageFileError, EOFError, OSError, zlib.error ...
        detail = str(exc).splitlines()[0].replace(str(path), path.name) if str(exc) else ""
        raise DataError(f"the file is truncated or corrupt ({type(exc).__name__}"
                        f"{': ' + detail if detail else ''})", path) from None


def _check_finite(data: np.ndarray, path: Path) -> None:
    """No NaN or infinite values in the voxels read from ``path``."""
    if data.dtype.kind in "fc":
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise DataError(f"has {bad} NaN or infinite voxel(s); fix or mask them", path)


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "ERROR" in ln or "rror" in ln] or lines or ["unknown error"]
    return useful[-1][:200]


# ----------------------------------------------------------------------------- writing
def label_dtype(labels: np.ndarray, num_classes: int | None = None) -> np.dtype:
    """uint8 when every label fits (at most 256 classes), else uint16."""
    top = (num_classes - 1) if num_classes else (int(labels.max()) if labels.size else 0)
    if top > np.iinfo(np.uint16).max:
        raise ValueError(f"{top + 1} classes do not fit a uint16 label map")
    return np.dtype(np.uint8) if top <= np.iinfo(np.uint8).max else np.dtype(np.uint16)


#: segment colours of ``.seg.nrrd`` outputs (RGB in [0, 1], cycled): distinct, readable on grey
SEGMENT_COLOURS = ((0.90, 0.30, 0.24), (0.18, 0.55, 0.83), (0.30, 0.72, 0.38), (0.95, 0.75, 0.15),
                   (0.60, 0.35, 0.75), (0.10, 0.75, 0.75), (0.95, 0.50, 0.70), (0.55, 0.40, 0.25))


def is_seg_nrrd(path: str | os.PathLike) -> bool:
    """3D Slicer's segmentation file: a name ending in ``.seg.nrrd``."""
    return str(path).lower().endswith(".seg.nrrd")


def slicer_segment_fields(labels: np.ndarray, segments: Sequence[tuple[str, int]]) -> dict[str, str]:
    """NRRD header fields with which 3D Slicer (and ``slicerio``) open a label map as named segments.

    One segment per (name, label value), background excluded by the caller; all in layer 0 (the
    labels do not overlap); ``Extent`` is the segment's voxel bounding box (Slicer's convention:
    first and last index per axis, an empty segment ``0 -1`` per axis).

    Args:
        labels: (X, Y, Z) label map in the values of ``segments``.
        segments: foreground (name, value) pairs, in the order to list them.
    """
    fields = {"Segmentation_MasterRepresentation": "Binary labelmap",
              "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
              "Segmentation_ReferenceImageExtentOffset": " ".join("0" for _ in labels.shape)}
    for i, (name, value) in enumerate(segments):
        mask = labels == value
        where = [np.flatnonzero(mask.any(axis=tuple(b for b in range(labels.ndim) if b != a)))
                 for a in range(labels.ndim)]
        extent = " ".join(f"{w[0]} {w[-1]}" if w.size else "0 -1" for w in where)
        colour = SEGMENT_COLOURS[i % len(SEGMENT_COLOURS)]
        fields.update({f"Segment{i}_ID": f"Segment_{value}", f"Segment{i}_Name": str(name),
                       f"Segment{i}_Color": " ".join(f"{c:g}" for c in colour),
                       f"Segment{i}_ColorAutoGenerated": "0", f"Segment{i}_NameAutoGenerated": "0",
                       f"Segment{i}_LabelValue": str(int(value)), f"Segment{i}_Layer": "0",
                       f"Segment{i}_Extent": extent, f"Segment{i}_Tags": "|"})
    return fields


def write_label(path: str | os.PathLike, labels: np.ndarray, meta: ImageMeta,
                num_classes: int | None = None, compress: bool = True,
                segments: Sequence[tuple[str, int]] | None = None) -> Path:
    """Write a label map with the geometry of ``meta``, atomically.

    Args:
        path: destination; the format follows the extension (``.seg.nrrd``: 3D Slicer's
            segmentation NRRD, with ``segments`` in its header).
        labels: (X, Y, Z) or (X, Y) integer array, shape equal to ``meta.size``.
        meta: geometry to copy (from ``read_image`` of the input).
        num_classes: number of classes; decides uint8 vs uint16 (default: from the maximum label).
        compress: compress where the format allows.
        segments: foreground (name, label value) pairs; needed for ``.seg.nrrd``.

    Returns:
        The written path.
    """
    labels = np.asarray(labels)
    if labels.ndim != meta.spatial_dims:
        raise ValueError(f"labels of shape {labels.shape} do not match the geometry size {meta.size}")
    arr = labels.astype(label_dtype(labels, num_classes), copy=False)
    img = meta.apply(sitk.GetImageFromArray(arr.transpose(*range(arr.ndim - 1, -1, -1))))
    if is_seg_nrrd(path):
        if labels.ndim != 3 or segments is None:
            raise DataError("a .seg.nrrd output needs a 3D label map and its segment names", path)
        for key, value in slicer_segment_fields(arr, segments).items():
            img.SetMetaData(key, value)
    return _write_atomic(img, path, compress)


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
