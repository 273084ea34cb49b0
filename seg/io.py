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

DICOM (``is_dicom_file``, ``read_dicom_series``): the DICOM files of a folder and of the folders
nested in it (any extension or none; a file is DICOM when it has the 'DICM' marker after its 128-byte
preamble, or, without a preamble, when pydicom parses a SOP Class UID from it) form one case per
series (SeriesInstanceUID), named ``dicom_case_name``: ``<PatientID>_<SeriesNumber>_<Modality>``
made filesystem-safe, the SeriesInstanceUID where PatientID or SeriesNumber is missing, and
``<name>_<SeriesInstanceUID>`` for every series whose name another series of the run also gets.
Non-image objects (SEG, RTSTRUCT, SR, ... and files without a series, e.g. DICOMDIR) are skipped.
A series is read by SimpleITK's series reader in GDCM's slice order, with the geometry of its
headers and the rescale slope / intercept applied (Hounsfield units for CT), once its pydicom headers
show every slice with pixel data, one orientation, one size and pixel spacing, and (several slices)
positions a constant step apart along the slice normal; a one-file series is a 2D image.  Its
pydicom headers (pixel data dropped) stay in ``ImageMeta.dicom``, in slice order, for the DICOM-SEG
writer.  The array and geometry convention is the one of every other format: a volume written as a
DICOM series reads back as the same array and geometry as the same volume written as NIfTI.

Reading (``read_image``, ``read_case``, ``read_label``) refuses, in one ``DataError`` line naming the
file: unreadable files, NaN or infinite voxels (any format; NIfTI files are also read with nibabel,
because SimpleITK may read a truncated NIfTI without an error and turns its NaN voxels into 0),
channel files on different grids, label maps with non-integer values or differing vector components.
Finite means finite after the header's scaling and in float32 (the type training and inference
compute in): a NIfTI ``scl_slope`` / ``scl_inter`` or a DICOM rescale slope / intercept that scales the
stored values to infinity is refused naming the fields (and, for DICOM, the slice), float64 voxels
beyond float32's range are refused in every format; NIfTI scalings the readers disagree on
(``_check_nifti``) and DICOM rescale values that are not finite numbers are refused too.

One geometry tolerance (``check_geometry``) for every comparison of two grids (image and label,
channel and channel, prediction and label): headers store floats, often float32, so spacing may
differ by a relative 1e-3, origin by 5 % of the smallest voxel size, direction cosines by 1e-3.

Writes are atomic (``seg.files.write_atomic``): the file is written under its final name inside a
hidden temporary folder next to the destination, then moved into place with ``os.replace``.  A crash
never leaves a half-written output under the final name, and formats with a detached data file
(.mhd/.raw, .nhdr/.raw.gz) keep a header that names the right data file.  A label map written as ``.dcm`` is a DICOM Segmentation
object (``dicom_segmentation``) referencing the series it was read from.
"""
from __future__ import annotations

import collections
import dataclasses
import fnmatch
import json
import logging
import os
import re
import reprlib
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from seg import __version__
from seg.errors import DataError
from seg.files import write_atomic

logger = logging.getLogger(__name__)

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
        path: the file the image was read from ('' when built in memory); the folder of a DICOM
            series of several files.
        dicom: a DICOM series' pydicom headers (pixel data dropped), one per slice in the order of
            the last array axis (one for a 2D image); empty for other formats.
    """

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    size: tuple[int, ...]
    path: str = ""
    dicom: tuple[Any, ...] = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def spatial_dims(self) -> int:
        return len(self.size)

    @classmethod
    def from_sitk(cls, img: sitk.Image, path: str | os.PathLike = "", dicom: Sequence[Any] = ()
                  ) -> "ImageMeta":
        return cls(tuple(img.GetSpacing()), tuple(img.GetOrigin()), tuple(img.GetDirection()),
                   tuple(img.GetSize()), str(path), tuple(dicom))

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
        name: the case name: the file name without extension (and without ``_0000`` for channel
            files); a DICOM series' ``dicom_case_name``.
        images: the image file, or one file per channel in channel order; a DICOM series' files.
        label: its label map, where there is one (training).
        series_uid: the SeriesInstanceUID of a DICOM series ('' when its header is unreadable);
            None for other formats.
    """

    name: str
    images: tuple[Path, ...]
    label: Path | None = None
    series_uid: str | None = None

    @property
    def image(self) -> Path:
        """The first (or only) image file; errors about the image name it."""
        return self.images[0]

    @property
    def is_dicom(self) -> bool:
        """A DICOM series (its outputs can be DICOM-SEG)."""
        return self.series_uid is not None


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
    """The cases of image folders and files, grouped by the rules of the module docstring.

    Args:
        inputs: a folder (the image files directly inside it, the DICOM files inside it and its
            subfolders), an image or DICOM file, or a list of them.
        pattern: glob the file names must match.

    Returns:
        The cases of image files in the order of their first file (a folder's files sorted by
        name), then the DICOM series in the order of their first file (sorted by path).

    Raises:
        DataError: an input does not exist, no image file, channel files with missing suffixes.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files: list[Path] = []
    dicom: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            files += list_images(item)
            dicom += dicom_files(item)
        elif is_dicom_file(item):
            dicom.append(item)
        elif item.exists() or is_image_file(item):  # a missing image file fails as its own case
            files.append(item)
        else:
            raise DataError("no such file or folder", item)
    files = [p for p in files if fnmatch.fnmatch(p.name, pattern)]
    dicom = sorted({p for p in dicom if fnmatch.fnmatch(p.name, pattern)})
    cases = (group_cases(files) if files else []) + dicom_cases(dicom)
    if not cases:
        which = f" matching {pattern!r}" if pattern != "*" else ""
        raise DataError(f"no image files{which} (expected {', '.join(IMAGE_EXTENSIONS)}, or DICOM "
                        "series)", items[0])
    return cases


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


# ----------------------------------------------------------------------------- DICOM files and series
#: Modalities of DICOM objects that hold no image to segment (our own DICOM-SEG outputs among them)
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG",
                                  "DOC", "PLAN", "FID", "RWV"})
_DISCOVERY_TAGS = ["SOPClassUID", "SeriesInstanceUID", "PatientID", "SeriesNumber", "Modality"]
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A DICOM file, whatever its extension: 'DICM' after the 128-byte preamble, or (no preamble) a
    first element of group 0002 or 0008 and a SOP Class UID that pydicom's reader parses.  Hidden
    files and files with an extension of ``IMAGE_EXTENSIONS`` are not."""
    path = Path(path)
    if path.name.startswith(".") or is_image_file(path) or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    if head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    try:
        return "SOPClassUID" in _dicom_header(path, tags=["SOPClassUID"])
    except Exception:  # noqa: BLE001 -- anything pydicom cannot parse is not DICOM here
        return False


def dicom_files(folder: str | os.PathLike) -> list[Path]:
    """The DICOM files in ``folder`` and the folders nested in it (hidden ones skipped), sorted."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [p for n in sorted(names) if is_dicom_file(p := Path(root) / n)]
    return found


def dicom_cases(files: Sequence[Path]) -> list[Case]:
    """One case per series (SeriesInstanceUID) of the DICOM ``files``, named by ``dicom_case_name``
    (unique among them), in the order of their first file.  Non-image objects are skipped; a file
    whose header pydicom cannot read is a case of its own (it fails when read, naming the file)."""
    series: dict[str, list[Path]] = {}
    headers: dict[str, Any] = {}
    broken: list[Case] = []
    skipped = 0
    for p in files:
        try:
            ds = _dicom_header(p, tags=_DISCOVERY_TAGS)
        except Exception:  # noqa: BLE001 -- read_dicom_series reports it, naming the file
            broken.append(Case(_safe_name(p.name) or "dicom", (p,), series_uid=""))
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if str(ds.get("Modality", "")).upper() in NON_IMAGE_MODALITIES or _is_dicomdir(ds):
            skipped += 1
            continue
        if not uid:  # read_dicom_series says so, naming the file
            broken.append(Case(_safe_name(p.name) or "dicom", (p,), series_uid=""))
            continue
        series.setdefault(uid, []).append(p)
        headers.setdefault(uid, ds)
    if skipped:
        logger.info("skipped %d DICOM file(s) that hold no image series (SEG, SR, DICOMDIR, ...)", skipped)
    names = {uid: dicom_case_name(ds) for uid, ds in headers.items()}
    taken = collections.Counter(names.values())
    cases = [Case(name if taken[name] == 1 else f"{name}_{_safe_name(uid)}", tuple(series[uid]),
                  series_uid=uid) for uid, name in names.items()]
    return sorted(cases + broken, key=lambda c: c.images[0])


def _is_dicomdir(ds: Any) -> bool:
    """A DICOMDIR (Media Storage Directory): an index of files, no image."""
    meta = getattr(ds, "file_meta", None)
    return meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == "1.2.840.10008.1.3.10"


def dicom_case_name(ds: Any) -> str:
    """``<PatientID>_<SeriesNumber>_<Modality>`` of a DICOM header (``_<Modality>`` left out when it
    is missing), or its SeriesInstanceUID when PatientID or SeriesNumber is missing; characters
    other than letters, digits, '.' and '-' become '_' (``dicom_cases`` adds ``_<UID>`` to names
    that two series share)."""
    pid, number, modality = (str(ds.get(k, "") or "").strip()
                             for k in ("PatientID", "SeriesNumber", "Modality"))
    name = "_".join(v for v in (pid, number, modality) if v) if pid and number else ""
    return _safe_name(name) or _safe_name(str(ds.get("SeriesInstanceUID", "") or "")) or "dicom"


def _safe_name(name: str) -> str:
    """A file-name-safe form of ``name``: runs of other characters than letters, digits, '.' and '-'
    become '_', no leading dot, at most 100 characters."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("._")[:100]


def _dicom_header(path: Path, tags: Sequence[str] | None = None) -> Any:
    """pydicom's header of ``path`` (files without a preamble too): only ``tags``, or everything
    with large values (the pixel data) left unread."""
    import pydicom

    if tags is not None:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(tags), force=True)
    return pydicom.dcmread(path, defer_size=4096, force=True)


# ----------------------------------------------------------------------------- reading
def channel_count(case: Case) -> int:
    """Channels of a case from its headers (no voxels read): channel files x components per pixel
    (a DICOM series' files are its slices: one channel file).

    Raises:
        DataError: a file that cannot be read.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(case.image))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise DataError(f"cannot read image ({_first_line(e)})", case.image) from None
    files = 1 if case.is_dicom else len(case.images)
    return files * int(reader.GetNumberOfComponents())


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
    if verify:  # SimpleITK turns NaN voxels of NIfTI files into 0: check what nibabel reads too
        scaling = _check_nifti(path) if _is_nifti(path) else ""
        _check_finite(arr, path, scaling)
    return _channels_first(img, arr), ImageMeta.from_sitk(img, path)


def _channels_first(img: sitk.Image, arr: np.ndarray) -> np.ndarray:
    """SimpleITK's array of ``img`` ((*S reversed) or (*S reversed, C)) as (C, *S) in torchio order."""
    d = img.GetDimension()
    if img.GetNumberOfComponentsPerPixel() > 1:  # (*S reversed, C) -> (C, *S)
        arr = arr.transpose(d, *range(d - 1, -1, -1))
    else:
        arr = arr.transpose(*range(d - 1, -1, -1))[None]
    return np.ascontiguousarray(arr)


def read_case(paths: str | os.PathLike | Sequence[str | os.PathLike], verify: bool = True
              ) -> tuple[np.ndarray, ImageMeta]:
    """Read one case (an image file, one file per channel, or the files of a DICOM series) as
    (C, *S) with the first file's geometry (the series' geometry: ``read_dicom_series``).

    Raises:
        DataError: a file ``read_image`` refuses, a channel whose geometry differs from the first's,
            a series ``read_dicom_series`` refuses, DICOM and other files in one case.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    dicom = [is_dicom_file(p) for p in paths]
    if any(dicom):
        if not all(dicom):
            other = next(p for p, d in zip(paths, dicom) if not d)
            raise DataError("is not a DICOM file, but the other files of its case are", other)
        return read_dicom_series(paths, verify)
    arrays, meta = [], None
    for p in paths:
        arr, m = read_image(p, verify)
        if meta is not None:
            check_geometry(m, meta, "channel", "first channel")
        arrays.append(arr)
        meta = meta or m
    return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays)), meta


def read_dicom_series(files: Sequence[str | os.PathLike], verify: bool = True
                      ) -> tuple[np.ndarray, ImageMeta]:
    """Read the files of one DICOM series as (C, X, Y, Z) (a one-file series: (C, X, Y)).

    The pydicom headers are checked first (``_check_dicom_slices``); SimpleITK's series reader then
    reads the files in GDCM's slice order (``GetGDCMSeriesFileNames``), applying each slice's rescale
    slope and intercept (float32 when they differ between slices), with the geometry of the headers.

    Args:
        files: the series' files (``Case.images`` of a DICOM case), in any order.
        verify: refuse NaN / infinite voxels of floating-point data.

    Returns:
        (array, meta); ``meta.path`` is the series' folder (the file of a one-file series) and
        ``meta.dicom`` holds the headers (pixel data dropped) in slice order.

    Raises:
        DataError: one line naming the folder, the series and the problem: an unreadable file, a
            slice without pixel data, mixed orientations or sizes, missing slices (a gap in the
            positions), slices not stacked along their normal, a multi-frame file.
    """
    files = sorted(Path(f) for f in files)
    where = files[0] if len(files) == 1 else Path(os.path.commonpath([f.parent for f in files]))
    headers = {}
    for f in files:
        try:
            headers[f] = _dicom_header(f)
        except Exception as exc:  # noqa: BLE001 -- pydicom raises many types for a broken file
            raise DataError(f"unreadable DICOM file ({type(exc).__name__}: {_first_line(exc)})", f) from None
    for f, ds in headers.items():
        if not ds.get("SeriesInstanceUID"):
            raise DataError("DICOM file without a SeriesInstanceUID (truncated, or not an image?)", f)
    first = headers[files[0]]
    uid = str(first.SeriesInstanceUID)
    label = f"DICOM series {dicom_case_name(first)} (SeriesInstanceUID {uid}, {len(files)} file(s))"

    def fail(problem: str) -> NoReturn:
        raise DataError(f"{label}: {problem}", where)

    uids = {str(ds.SeriesInstanceUID) for ds in headers.values()}
    if len(uids) > 1:
        fail(f"files of {len(uids)} series in one case")
    _check_dicom_slices(headers, fail)
    order = _gdcm_order(where if len(files) > 1 else files[0].parent, uid, files, fail)
    slices = [headers[f] for f in order]
    if len(slices) > 1:
        _check_dicom_positions(slices, order, fail)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in order])
    rescales = {(str(ds.get("RescaleSlope", "")), str(ds.get("RescaleIntercept", ""))) for ds in slices}
    if len(rescales) > 1:  # the reader would keep the first slice's (integer) type for every slice
        reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        img = reader.Execute()
    except RuntimeError as e:
        fail(f"cannot read it ({_first_line(e)})")
    if img.GetDimension() == 3 and img.GetSize()[2] == 1:  # one slice: 2D (ITK's rule for the direction)
        img = sitk.Extract(img, (*img.GetSize()[:2], 0), (0, 0, 0),
                           sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOGUESS)
    arr = sitk.GetArrayFromImage(img)
    if verify and (bad := _not_finite(arr)) is not None:  # (Z, Y, X): the first slice holding one
        k = int(np.flatnonzero(bad.reshape(len(slices), -1).any(axis=1))[0])
        slope, inter = _rescale(slices[k], order[k], fail)
        fail(f"RescaleSlope {slope:g} (RescaleIntercept {inter:g}) of {order[k].name} scales the data to "
             f"infinity ({int(np.count_nonzero(bad))} voxel(s) beyond float32's ±{FLOAT32_MAX:.3g})")
    for ds in slices:
        for tag in _PIXEL_TAGS:
            if tag in ds:
                del ds[tag]
    return _channels_first(img, arr), ImageMeta.from_sitk(img, where, slices)


def _check_dicom_slices(headers: dict[Path, Any], fail: Callable[[str], NoReturn]) -> None:
    """Every slice single-frame with pixel data; one size, pixel spacing and orientation (within
    the one tolerance); positions and orientations present when there are several slices."""
    for f, ds in headers.items():
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            fail(f"{f.name} is a multi-frame image ({frames} frames); multi-frame (enhanced) DICOM is "
                 "not supported: export the series as single-frame files")
        if not any(tag in ds for tag in _PIXEL_TAGS):
            fail(f"{f.name} has no pixel data (PixelData absent)")
    (f0, ds0), n = next(iter(headers.items())), len(headers)
    for f, ds in headers.items():
        if (ds.get("Rows"), ds.get("Columns")) != (ds0.get("Rows"), ds0.get("Columns")):
            fail(f"slices of different sizes: {ds0.get('Rows')}x{ds0.get('Columns')} in {f0.name}, "
                 f"{ds.get('Rows')}x{ds.get('Columns')} in {f.name}")
        for tag, length in (("ImageOrientationPatient", 6), ("ImagePositionPatient", 3)):
            if n > 1 and len(ds.get(tag) or ()) != length:
                fail(f"{f.name} has no valid {tag}: the slices cannot be ordered")
        iop, iop0 = _floats(ds, "ImageOrientationPatient"), _floats(ds0, "ImageOrientationPatient")
        if n > 1 and not np.allclose(iop, iop0, rtol=0, atol=DIRECTION_ATOL):
            fail(f"mixed orientations: ImageOrientationPatient {_fmt(iop0)} in {f0.name} but {_fmt(iop)} "
                 f"in {f.name}")
        pixel, pixel0 = _floats(ds, "PixelSpacing"), _floats(ds0, "PixelSpacing")
        if pixel.shape != pixel0.shape or not np.allclose(pixel, pixel0, rtol=SPACING_RTOL, atol=0):
            fail(f"mixed pixel spacings: {_fmt(pixel0)} mm in {f0.name}, {_fmt(pixel)} mm in {f.name}")
        _rescale(ds, f, fail)


def _rescale(ds: Any, f: Path, fail: Callable[[str], NoReturn]) -> tuple[float, float]:
    """A slice's (RescaleSlope, RescaleIntercept), (1, 0) where absent; ``fail`` unless finite numbers
    (GDCM would read a NaN intercept as no rescale, leaving raw stored values)."""
    values = []
    for tag, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        raw = ds.get(tag)
        try:
            value = default if raw is None or str(raw).strip() == "" else float(raw)
        except (TypeError, ValueError):
            value = float("nan")
        if not np.isfinite(value):
            fail(f"{f.name} has {tag} {str(raw)!r}: the rescale (stored value x RescaleSlope + "
                 "RescaleIntercept) must be finite numbers")
        values.append(value)
    return values[0], values[1]


def _check_dicom_positions(slices: Sequence[Any], files: Sequence[Path], fail: Callable[[str], NoReturn]
                           ) -> None:
    """Slice positions (ImagePositionPatient along the normal of the orientation) one constant step
    apart (within 5 % of it: the origin tolerance), no two slices at one position, ``files`` (the
    reader's order) sorted by them, and the slices stacked along the normal (no gantry tilt, shear)."""
    iop = _floats(slices[0], "ImageOrientationPatient")
    normal = np.cross(iop[:3], iop[3:])
    ipp = np.array([_floats(ds, "ImagePositionPatient") for ds in slices])
    pos = ipp @ normal
    by_pos = np.argsort(pos, kind="stable")
    steps = np.diff(pos[by_pos])
    step = float(np.median(steps))
    pixel = _floats(slices[0], "PixelSpacing")
    scale = pixel.min() if pixel.size else 1.0
    same = np.flatnonzero(steps <= ORIGIN_TOL_VOXELS * max(step, scale))
    if same.size:
        a, b = by_pos[same[0]], by_pos[same[0] + 1]
        fail(f"{files[a].name} and {files[b].name} are at the same slice position ({pos[a]:.4g} mm "
             f"along the normal; {same.size} such pair(s)): several acquisitions in one series?")
    uneven = np.flatnonzero(np.abs(steps - step) > ORIGIN_TOL_VOXELS * step)
    if uneven.size:
        a, b = by_pos[uneven[0]], by_pos[uneven[0] + 1]
        fail(f"missing slice(s) or uneven slice spacing: the slices are {step:.4g} mm apart, but "
             f"{files[a].name} and {files[b].name} are {steps[uneven[0]]:.4g} mm apart ({uneven.size} "
             f"such gap(s) in {len(slices)} slices)")
    if np.any(np.diff(pos) <= 0):
        fail("SimpleITK's series reader does not order the slices by their positions")
    shift = np.linalg.norm(ipp - ipp[0] - np.outer(pos - pos[0], normal), axis=1).max()
    if shift > ORIGIN_TOL_VOXELS * scale:
        fail(f"the slices are not stacked along their normal (in-plane shift up to {shift:.3g} mm: "
             "gantry tilt or a sheared stack); resample the series first")


def _gdcm_order(folder: Path, uid: str, files: Sequence[Path], fail: Callable[[str], NoReturn]) -> list[Path]:
    """``files`` in the order of SimpleITK's series reader (GDCM sorts by position along the slice
    normal), searched in ``folder`` (and below it when the files are in several folders)."""
    recursive = any(f.parent != folder for f in files)
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid, False, recursive)
    wanted = {f.resolve(): f for f in files}
    order = [wanted[r] for r in (Path(n).resolve() for n in names) if r in wanted]
    if len(order) != len(files):
        lost = sorted(set(files) - set(order))
        more = f" and {len(lost) - 1} other file(s)" if len(lost) > 1 else ""
        fail(f"SimpleITK's series reader cannot read {lost[0].name}{more} (truncated or corrupt?)")
    return order


def _floats(ds: Any, tag: str) -> np.ndarray:
    """A multi-valued numeric DICOM attribute as floats (empty when absent)."""
    return np.array([float(v) for v in (ds.get(tag) or ())])


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


def _check_nifti(path: Path) -> str:
    """Check a NIfTI file with nibabel: its intensity scaling and its stored voxels (finite, the
    file complete); return the scaling SimpleITK applied ('' when none) for ``_check_finite``.

    ``scl_slope`` 0 or NaN means no scaling (the NIfTI standard; nibabel writes NaN).  Refused, as
    headers the readers disagree on: an infinite ``scl_slope``; a non-finite ``scl_inter`` beside a
    slope that scales (nibabel refuses it, SimpleITK ignores the scaling); a non-zero ``scl_inter``
    beside a slope that does not scale (the standard and nibabel ignore it, SimpleITK adds it).
    """
    slope, inter = _nifti_scaling(path)
    if np.isinf(slope):
        raise DataError(f"scl_slope {slope:g} scales the data to infinity; fix the header (scl_slope 0 "
                        "means no scaling)", path)
    scales = bool(np.isfinite(slope) and slope != 0)
    if scales and not np.isfinite(inter):
        raise DataError(f"scl_inter {inter:g} (with scl_slope {slope:g}) is not a finite number: the "
                        "intensity scaling is undefined; fix the header (a finite scl_inter, or scl_slope "
                        "0 for no scaling)", path)
    if not scales and np.isfinite(inter) and inter != 0:
        raise DataError(f"scl_inter {inter:g} with scl_slope {slope:g}: the NIfTI standard ignores the "
                        "intercept when the slope is 0 or NaN, SimpleITK adds it; fix the header (scl_slope "
                        "1 to add it, scl_inter 0 to ignore it)", path)
    _check_finite(_nifti_data(path), path)
    return f"scl_slope {slope:g} (scl_inter {inter:g})" if scales else ""


def _nifti_scaling(path: Path) -> tuple[float, float]:
    """(scl_slope, scl_inter) as stored in a NIfTI-1 or NIfTI-2 header (DataError when unreadable)."""
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        try:
            with nib.openers.ImageOpener(str(path)) as f:
                header = klass.from_fileobj(f, check=False)
        except Exception:  # noqa: BLE001 -- a wrong size field, a cut-short file: _nifti_data says which
            continue
        if int(header["sizeof_hdr"]) == klass.sizeof_hdr:
            return float(header["scl_slope"]), float(header["scl_inter"])
    _nifti_data(path)  # raises its DataError
    raise DataError("the file is truncated or corrupt (no NIfTI header)", path)


def _nifti_data(path: Path) -> np.ndarray:
    """The stored voxels of a NIfTI file read with nibabel (DataError when truncated or corrupt)."""
    try:
        return nib.load(str(path)).dataobj.get_unscaled()
    except Exception as exc:  # nibabel raises ImageFileError, EOFError, OSError, zlib.error ...
        detail = str(exc).splitlines()[0].replace(str(path), path.name) if str(exc) else ""
        raise DataError(f"the file is truncated or corrupt ({type(exc).__name__}"
                        f"{': ' + detail if detail else ''})", path) from None


#: the largest finite float32: training and inference compute in float32, so a voxel beyond it is infinite
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _not_finite(data: np.ndarray) -> np.ndarray | None:
    """Mask of the voxels that are NaN, infinite or beyond float32's range; None when there are none."""
    if data.dtype.kind not in "fc":
        return None  # integers up to 2**64 are finite in float32
    bad = ~np.isfinite(data)
    if data.dtype.itemsize > 4 or data.dtype.kind == "c":
        bad |= np.abs(data) > FLOAT32_MAX
    return bad if bad.any() else None


def _check_finite(data: np.ndarray, path: Path, scaling: str = "") -> None:
    """No NaN or infinite voxels in ``data`` (read from ``path``), and none beyond float32's range.

    Args:
        data: the voxels as read (after the header's scaling).
        path: the file, for the message.
        scaling: the header's intensity scaling applied to finite stored voxels (e.g. ``'scl_slope 1e+38
            (scl_inter 0)'``), blamed for the voxels it made infinite; '' when there is none.
    """
    bad = _not_finite(data)
    if bad is None:
        return
    count, big = int(np.count_nonzero(bad)), data[bad & np.isfinite(data)]
    if scaling:
        raise DataError(f"{scaling} scales the data to infinity ({count} voxel(s) beyond float32's "
                        f"±{FLOAT32_MAX:.3g}); fix the header", path)
    if big.size == count:
        raise DataError(f"has {count} voxel(s) beyond float32's range (±{FLOAT32_MAX:.3g}, up to "
                        f"{np.abs(big).max():.3g}), which training and inference compute in; rescale the "
                        "image", path)
    raise DataError(f"has {count - big.size} NaN or infinite voxel(s); fix or mask them", path)


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "ERROR" in ln or "rror" in ln] or lines or ["unknown error"]
    return useful[-1][:200]


# ----------------------------------------------------------------------------- JSON files
def read_json(path: str | os.PathLike, what: str) -> Any:
    """The content of a JSON file the user gives (``dataset.json``, a split file), or one DataError
    line naming the file: unreadable, not UTF-8, invalid JSON, a key twice in one object, nested too
    deeply for Python's JSON reader.

    Args:
        path: the file.
        what: what the file is, for the message ('dataset.json', 'the split file').
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise DataError(f"cannot read {what}: its JSON is nested too deeply", path) from None
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"cannot read {what} ({type(exc).__name__}: {exc})", path) from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise ValueError(f"key {dup!r} appears twice")
    return dict(pairs)


def short_repr(value: Any) -> str:
    """``repr`` of a value read from a file, cut short (depth, length) for a one-line message."""
    return _SHORT.repr(value)


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 60, 60


# ----------------------------------------------------------------------------- writing
#: the largest label value a label map output holds: every format is written as uint8 or uint16
MAX_LABEL_VALUE = int(np.iinfo(np.uint16).max)


def label_dtype(labels: np.ndarray, num_classes: int | None = None) -> np.dtype:
    """uint8 when every label fits (at most 256 classes), else uint16."""
    top = (num_classes - 1) if num_classes else (int(labels.max()) if labels.size else 0)
    if top > MAX_LABEL_VALUE:
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
        segments: foreground (name, label value) pairs; needed for ``.seg.nrrd`` and ``.dcm``.

    Returns:
        The written path.

    A ``.dcm`` destination is a DICOM Segmentation object (``dicom_segmentation``) over the DICOM
    series ``meta`` was read from.
    """
    labels = np.asarray(labels)
    if labels.ndim != meta.spatial_dims:
        raise ValueError(f"labels of shape {labels.shape} do not match the geometry size {meta.size}")
    if is_dicom_seg(path):
        if segments is None:
            raise ValueError("a DICOM-SEG output needs its segments (name, label value)")
        seg = dicom_segmentation(labels, meta, segments, path)
        return write_atomic(path, lambda tmp: seg.save_as(tmp))
    arr = labels.astype(label_dtype(labels, num_classes), copy=False)
    img = meta.apply(sitk.GetImageFromArray(arr.transpose(*range(arr.ndim - 1, -1, -1))))
    if is_seg_nrrd(path):
        if labels.ndim != 3 or segments is None:
            raise DataError("a .seg.nrrd output needs a 3D label map and its segment names", path)
        for key, value in slicer_segment_fields(arr, segments).items():
            img.SetMetaData(key, value)
    return _write_sitk_atomic(img, path, compress)


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
    return _write_sitk_atomic(meta.apply(img), path, compress)


def _write_sitk_atomic(img: sitk.Image, path: str | os.PathLike, compress: bool) -> Path:
    """Write ``img`` with SimpleITK, atomically (``seg.files.write_atomic``)."""
    path = Path(path)
    if path.name.lower().endswith(".png"):
        compress = False  # PNG is always compressed; SimpleITK rejects the flag for it
    try:
        return write_atomic(path, lambda tmp: sitk.WriteImage(img, str(tmp), compress))
    except RuntimeError as e:
        raise DataError(f"cannot write image ({_first_line(e)})", path) from None


# ----------------------------------------------------------------------------- DICOM-SEG
#: SNOMED CT code (value, scheme, meaning) of every segment's property category and type: "Tissue",
#: 3D Slicer's default for a segment without a terminology (a model's classes have names, no codes)
SEGMENT_CATEGORY = SEGMENT_TYPE = ("85756007", "SCT", "Tissue")
#: the algorithm family in the segment descriptions (DICOM code 123110)
ALGORITHM_FAMILY = ("123110", "DCM", "Artificial Intelligence")
#: a DICOM-SEG's series number: its source's plus this
SEG_SERIES_OFFSET = 1000


def is_dicom_seg(path: str | os.PathLike) -> bool:
    """A DICOM Segmentation output: a name ending in ``.dcm``."""
    return str(path).lower().endswith(".dcm")


def dicom_segmentation(labels: np.ndarray, meta: ImageMeta, segments: Sequence[tuple[str, int]],
                       path: str | os.PathLike = "") -> Any:
    """A DICOM Segmentation object (highdicom, BINARY) of ``labels`` over the series ``meta`` was
    read from, so viewers (3D Slicer, OHIF) show it on the source images.

    Segment ``i`` (1..n, in the order of ``segments``) is the mask ``labels == value`` of the i-th
    (name, value) pair, labelled with the name; its tracking ID is ``"<name> (label value <v>)"``;
    category and type SNOMED CT "Tissue" (``SEGMENT_CATEGORY``); algorithm: this toolkit, AUTOMATIC.
    Frame ``z`` is derived from source slice ``z`` (``meta.dicom``), with its position and
    orientation; frames without foreground are left out (highdicom's default).

    Args:
        labels: (X, Y, Z) or (X, Y) label map in the values of ``segments``, on ``meta``'s grid.
        meta: from ``read_dicom_series`` (its headers in ``meta.dicom``).
        segments: foreground (name, label value) pairs.
        path: the destination, for error messages.

    Raises:
        DataError: ``meta`` is not a DICOM series', no segment, or highdicom refuses the source headers.
    """
    import highdicom as hd

    if not meta.dicom:
        raise DataError("a DICOM-SEG output needs a DICOM series as input (the series it refers to)", path)
    if not segments:
        raise DataError("a DICOM-SEG output needs at least one foreground class", path)
    frames = labels.T if labels.ndim == 3 else labels.T[None]  # (X, Y, Z) -> (Z, rows = Y, columns = X)
    if len(frames) != len(meta.dicom):
        raise ValueError(f"{len(frames)} slices of labels for a series of {len(meta.dicom)}")
    masks = np.stack([frames == value for _, value in segments], axis=-1).astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(name="seg", family=hd.sr.CodedConcept(*ALGORITHM_FAMILY),
                                                   version=__version__)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i, segment_label=str(name)[:64],
        segmented_property_category=hd.sr.CodedConcept(*SEGMENT_CATEGORY),
        segmented_property_type=hd.sr.CodedConcept(*SEGMENT_TYPE),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        tracking_id=f"{name} (label value {int(value)})"[:64], tracking_uid=hd.UID())
        for i, (name, value) in enumerate(segments, start=1)]
    src = meta.dicom[0]
    number = int(src.get("SeriesNumber", 0) or 0) + SEG_SERIES_OFFSET
    described = str(src.get("SeriesDescription", "") or "").strip()
    try:
        return hd.seg.Segmentation(
            source_images=list(meta.dicom), pixel_array=masks,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=hd.UID(), series_number=number, sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer="seg", manufacturer_model_name="seg", software_versions=__version__,
            device_serial_number="0", content_label="SEGMENTATION", content_description="automatic segmentation",
            series_description=f"Segmentation of {described}"[:64] if described else "Segmentation")
    except (ValueError, AttributeError) as exc:  # highdicom's refusals of the source headers
        raise DataError(f"cannot write a DICOM-SEG over its source series ({type(exc).__name__}: "
                        f"{_first_line(exc)})", path) from None


def with_extension(path: str | os.PathLike, ext: str) -> Path:
    """Replace a (possibly double) image extension: ``with_extension('a/b.nii.gz', '.nrrd')``."""
    path = Path(path)
    ext = ext if ext.startswith(".") else "." + ext
    return path.with_name(split_extension(path)[0] + ext)
