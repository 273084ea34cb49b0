"""DICOM series in, DICOM-SEG out (issue 14, items 2 and 3), on series the tests write.

Series are written slice by slice with pydicom (and, once, with SimpleITK's GDCM writer), with real
geometry: anisotropic spacing, an oblique direction with two flipped axes, a non-zero origin, files
named at random, stored values rescaled to Hounsfield units.  Reading goes through ``seg.io`` only;
the checks use pydicom, SimpleITK and highdicom directly.
"""
from __future__ import annotations

import json
import locale
import logging
import math
import re
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

import infer_seg
from seg import io
from seg.errors import DataError

SHAPE = (24, 20, 12)  # (X, Y, Z)
SPACING = (0.7, 0.9, 2.5)
ORIGIN = (10.5, -20.25, 33.0)


def _rotation(axis: int, deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


#: oblique, x and y flipped (a proper rotation: DICOM's slice normal is row x column)
DIRECTION = np.diag([-1.0, -1.0, 1.0]) @ _rotation(2, -30.0) @ _rotation(0, 20.0)


def _ds(value: float) -> float:
    return round(float(value), 6)  # DICOM decimal strings hold 16 characters


def write_series(folder: Path, hu: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=DIRECTION, *,
                 patient: str | None = "PAT-1", number: int | None = 3, modality: str = "CT",
                 study_uid: str | None = None, slope: float = 1.0, intercept: float = -1024.0,
                 drop: tuple[int, ...] = (), ext: str = "", edit=None, seed: int = 0) -> tuple[str, list[Path]]:
    """Write ``hu`` (X, Y, Z) as one CT file per slice with pydicom: slice k at
    ``origin + k * spacing[2] * direction[:, 2]``, stored as uint16 with ``slope`` / ``intercept``,
    named at random (``ext`` appended); slices in ``drop`` left out; ``edit(k, ds)`` may alter a
    slice before it is saved.  Returns (SeriesInstanceUID, files)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    d = np.asarray(direction, float).reshape(3, 3)
    series_uid, study_uid, frame_uid = generate_uid(), study_uid or generate_uid(), generate_uid()
    files = []
    for k in range(hu.shape[2]):
        if k in drop:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        if patient is not None:
            ds.PatientID = patient
        if number is not None:
            ds.SeriesNumber = number
        ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = \
            "20240101", "120000", "1", "", ""
        ds.Modality, ds.Manufacturer, ds.SeriesDescription = modality, "tests", "phantom"
        ds.InstanceNumber = int(rng.integers(1, 10_000))  # not the slice order
        ds.ImagePositionPatient = [_ds(v) for v in np.asarray(origin) + d[:, 2] * spacing[2] * k]
        ds.ImageOrientationPatient = [_ds(v) for v in (*d[:, 0], *d[:, 1])]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # (between rows = y, between columns = x)
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
        ds.PixelData = np.round((hu[:, :, k].T - intercept) / slope).astype(np.uint16).tobytes()
        if edit is not None:
            edit(k, ds)
        path = folder / f"{rng.integers(16 ** 8):08x}{ext}"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return series_uid, files


def write_nifti(path: Path, arr_xyz: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=DIRECTION) -> Path:
    img = sitk.GetImageFromArray(arr_xyz.transpose(2, 1, 0))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(tuple(np.asarray(direction).ravel()))
    sitk.WriteImage(img, str(path))
    return path


def write_sitk_series(folder: Path, hu: np.ndarray) -> str:
    """The same kind of series written by SimpleITK's GDCM writer, slice by slice (SimpleITK's
    "Dicom Series From Array" example): int16 HU with the rescale tags, random file names."""
    folder.mkdir(parents=True)
    img = sitk.GetImageFromArray(hu.astype(np.int16).transpose(2, 1, 0))
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(tuple(DIRECTION.ravel()))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")
    uid = generate_uid()
    tags = {"0010|0020": "SITK-1", "0020|000d": generate_uid(), "0020|000e": uid, "0020|0011": "7",
            "0008|0060": "CT", "0028|1052": "-1024", "0028|1053": "1", "0018|0050": str(SPACING[2]),
            "0020|0037": "\\".join(f"{v:.8f}" for v in (*DIRECTION[:, 0], *DIRECTION[:, 1]))}
    rng = np.random.default_rng(1)
    ctype = locale.setlocale(locale.LC_CTYPE)
    for k in range(img.GetDepth()):
        piece = img[:, :, k]
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        piece.SetMetaData("0020|0032", "\\".join(f"{v:.8f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))))
        piece.SetMetaData("0020|0013", str(k + 1))
        piece.SetMetaData("0008|0018", generate_uid())
        writer.SetFileName(str(folder / f"slice{rng.integers(10 ** 6)}"))
        writer.Execute(piece)
    locale.setlocale(locale.LC_CTYPE, ctype)  # ITK's GDCM writer leaves LC_CTYPE at "C" (ASCII subprocess text)
    return uid


def random_hu(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 2000, size=SHAPE).astype(np.float64)


def phantom(seed: int = 0) -> np.ndarray:
    """HU like the training cases of ``trained_checkpoint``: a sphere (class 2) in a sphere (class 1),
    label * 40 + 10 + noise, off centre (no axis symmetric, so a flipped axis shows)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    r = np.sqrt(((x - 10) * SPACING[0]) ** 2 + ((y - 8.5) * SPACING[1]) ** 2 + ((z - 4) * SPACING[2]) ** 2)
    label = np.where(r < 4.5, 2, np.where(r < 8.5, 1, 0))
    return np.round(label * 40.0 + rng.normal(0, 6, SHAPE) + 10)


def assert_same_geometry(meta: io.ImageMeta, ref: io.ImageMeta) -> None:
    io.check_geometry(meta, ref, "DICOM series", "NIfTI")
    np.testing.assert_allclose(meta.spacing, ref.spacing, rtol=1e-6)
    np.testing.assert_allclose(meta.origin, ref.origin, atol=1e-5)
    np.testing.assert_allclose(meta.direction, ref.direction, atol=1e-5)


# ----------------------------------------------------------------------------- reading
@pytest.mark.parametrize("writer", ["pydicom", "simpleitk"])
def test_series_reads_back_like_the_same_volume_as_nifti(tmp_path, writer) -> None:
    hu = random_hu()
    if writer == "pydicom":
        write_series(tmp_path / "dicom", hu)  # stored uint16, intercept -1024
    else:
        write_sitk_series(tmp_path / "dicom", hu)
    (case,) = io.image_cases(tmp_path / "dicom")
    assert case.is_dicom and len(case.images) == SHAPE[2]
    arr, meta = io.read_case(case.images)
    nii, nii_meta = io.read_image(write_nifti(tmp_path / "same.nii.gz", hu.astype(np.int16)))
    assert arr.shape == nii.shape == (1, *SHAPE)
    np.testing.assert_array_equal(arr, nii)  # Hounsfield units: the rescale applied
    np.testing.assert_array_equal(arr[0], hu)
    assert_same_geometry(meta, nii_meta)
    assert meta.path == str(tmp_path / "dicom") and len(meta.dicom) == SHAPE[2]
    normal = np.cross(*np.reshape(meta.dicom[0].ImageOrientationPatient, (2, 3)))
    positions = [np.dot(ds.ImagePositionPatient, normal) for ds in meta.dicom]
    assert positions == sorted(positions) and "PixelData" not in meta.dicom[0]  # slice order, headers only


def test_left_handed_volume_reads_back_as_the_same_physical_image(tmp_path) -> None:
    """A DICOM slice normal is row x column, so a left-handed grid comes back with its slice axis
    reversed: the same voxels at the same physical points."""
    hu = random_hu(1)
    flipped = DIRECTION @ np.diag([1.0, 1.0, -1.0])
    write_series(tmp_path / "d", hu, direction=flipped)
    arr, meta = io.read_case(io.image_cases(tmp_path / "d")[0].images)
    np.testing.assert_array_equal(arr[0], hu[:, :, ::-1])
    src = write_nifti(tmp_path / "src.nii.gz", hu.astype(np.int16), direction=flipped)
    src_img = sitk.ReadImage(str(src))
    back = meta.apply(sitk.Image(list(meta.size), sitk.sitkUInt8))
    for x, y, z in [(0, 0, 0), (23, 0, 5), (4, 19, 11)]:
        np.testing.assert_allclose(back.TransformIndexToPhysicalPoint((x, y, SHAPE[2] - 1 - z)),
                                   src_img.TransformIndexToPhysicalPoint((x, y, z)), atol=1e-4)


def test_cases_one_per_series_nested_any_extension_named_by_the_rule(tmp_path) -> None:
    hu = random_hu()[:, :, :4]
    root = tmp_path / "export"
    a, a_files = write_series(root, hu, patient="Doe^John/7", number=3, seed=1)
    b, b_files = write_series(root / "sub" / "deeper", hu, patient="PAT-2", number=12, modality="MR",
                              ext=".dcm", seed=2)
    raw = pydicom.dcmread(b_files[0])  # one file of b without the preamble and file meta
    del raw.file_meta
    raw.preamble = None
    pydicom.dcmwrite(b_files[0], raw, implicit_vr=True, little_endian=True)
    assert b_files[0].read_bytes()[128:132] != b"DICM"
    study = generate_uid()  # two series with one PatientID and SeriesNumber (two studies)
    c, _ = write_series(root / "c", hu, patient="P", number=5, study_uid=study, seed=3)
    d, _ = write_series(root / "d", hu, patient="P", number=5, seed=4)
    e, _ = write_series(root / "e", hu, patient=None, number=9, seed=5)
    write_nifti(root / "other.nii.gz", hu.astype(np.int16))
    (root / "README.txt").write_text("exported by a PACS")
    (root / ".hidden").write_bytes(b"\0" * 128 + b"DICM")
    seg_file = root / "sub" / "old_seg"  # a DICOM-SEG in the export: no image, skipped
    shutil.copy(a_files[0], seg_file)
    ds = pydicom.dcmread(seg_file)
    ds.Modality, ds.SeriesInstanceUID = "SEG", generate_uid()
    ds.save_as(seg_file)

    cases = io.image_cases(root)
    got = {c_.name: (c_.series_uid, len(c_.images)) for c_ in cases}
    assert got == {"other": (None, 1), "Doe_John_7_3_CT": (a, 4), "PAT-2_12_MR": (b, 4),
                   f"P_5_CT_{c}": (c, 4), f"P_5_CT_{d}": (d, 4), e: (e, 4)}
    assert [c_.name for c_ in cases][0] == "other"
    nested = next(c_ for c_ in cases if c_.series_uid == b)
    arr, meta = io.read_case(nested.images)  # the file without a preamble is read too
    np.testing.assert_array_equal(arr[0], hu)
    assert io.dicom_case_name(pydicom.dcmread(a_files[0])) == "Doe_John_7_3_CT"
    assert [c_.name for c_ in io.image_cases(a_files[:2])] == ["Doe_John_7_3_CT"]  # explicit files
    with pytest.raises(DataError, match=r"other.nii.gz: is not a DICOM file, but the other files of its case are"):
        io.read_case([a_files[0], root / "other.nii.gz"])


def test_rescale_slope_and_intercept_per_slice(tmp_path) -> None:
    hu = random_hu(2) / 2

    def vary(k, ds):  # per-slice slopes (as PET writes them)
        ds.RescaleSlope = 0.5 if k % 3 else 0.25
        ds.PixelData = np.round((hu[:, :, k].T + 1024) / ds.RescaleSlope).astype(np.uint16).tobytes()

    _, files = write_series(tmp_path / "d", hu, slope=0.5, edit=vary)
    arr, meta = io.read_case(files)
    assert arr.dtype == np.float32
    np.testing.assert_allclose(arr[0], hu, atol=1e-4)
    by_position = sorted((pydicom.dcmread(f) for f in files), key=lambda ds: ds.ImagePositionPatient @ DIRECTION[:, 2])
    ref = np.stack([pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).T for ds in by_position], -1)
    np.testing.assert_allclose(arr[0], ref, atol=1e-4)  # pydicom's own rescale


def _rescale(tag, value, only=None):
    def edit(k, ds):
        if only is None or k == only:
            setattr(ds, tag, value)
    return edit


BAD_RESCALE = {  # edit: the problem as the message says it
    "slope to infinity": (_rescale("RescaleSlope", "1e38"),
                          r"RescaleSlope 1e\+38 \(RescaleIntercept -1024\) of \w+ scales the data to infinity "
                          r"\(60 voxel\(s\) beyond float32's ±3.4e\+38\)$"),
    "one slice to infinity": (_rescale("RescaleSlope", "1e38", only=1),
                              r"RescaleSlope 1e\+38 \(RescaleIntercept -1024\) of \w+ scales the data to "
                              r"infinity \(20 voxel\(s\) beyond"),
    "intercept to infinity": (_rescale("RescaleIntercept", "1e39"),
                              r"RescaleSlope 1 \(RescaleIntercept 1e\+39\) of \w+ scales the data to infinity"),
    "NaN intercept": (_rescale("RescaleIntercept", "NaN"),
                      r"\w+ has RescaleIntercept 'NaN': the rescale \(stored value x RescaleSlope \+ "
                      r"RescaleIntercept\) must be finite numbers$"),
    "NaN slope": (_rescale("RescaleSlope", "NaN", only=2), r"\w+ has RescaleSlope 'NaN': the rescale"),
}


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize("kind", list(BAD_RESCALE))
def test_rescale_to_infinity_or_undefined_is_refused_saying_so(tmp_path, kind) -> None:
    """GDCM reads a NaN intercept as no rescale (raw stored values) and a huge slope as float64 that
    float32 holds as infinity: both refused, one line naming the series and the slice."""
    edit, problem = BAD_RESCALE[kind]
    uid, files = write_series(tmp_path / "r", np.full((5, 4, 3), 100.0), patient="R", number=2, edit=edit)
    with pytest.raises(DataError, match=problem) as exc:
        io.read_case(files)
    assert str(exc.value).startswith(f"{tmp_path / 'r'}: DICOM series R_2_CT (SeriesInstanceUID {uid}, 3 file(s)): ")


def _tilt(k, ds):
    ds.ImagePositionPatient = [_ds(v + 0.4 * k * a) for v, a in zip(ds.ImagePositionPatient, DIRECTION[:, 1])]


def _other_orientation(k, ds):
    if k == 5:
        r = DIRECTION @ _rotation(2, 10.0)
        ds.ImageOrientationPatient = [_ds(v) for v in (*r[:, 0], *r[:, 1])]


def _no_pixels(k, ds):
    if k == 3:
        del ds.PixelData


def _duplicate(k, ds):
    if k == 7:
        ds.ImagePositionPatient = [_ds(v - 2.5 * a) for v, a in zip(ds.ImagePositionPatient, DIRECTION[:, 2])]


BAD_SERIES = {  # kind: (write_series options, the problem as the message says it)
    "missing slice": (dict(drop=(6,)), r"missing slice\(s\) or uneven slice spacing: the slices are 2.5 mm apart, "
                                       r"but \w+ and \w+ are 5 mm apart"),
    "mixed orientation": (dict(edit=_other_orientation), r"mixed orientations: ImageOrientationPatient"),
    "no pixel data": (dict(edit=_no_pixels), r"\w+ has no pixel data \(PixelData absent\)"),
    "duplicate position": (dict(edit=_duplicate), r"are at the same slice position"),
    "gantry tilt": (dict(edit=_tilt), r"not stacked along their normal"),
}


@pytest.mark.parametrize("kind", list(BAD_SERIES))
def test_bad_series_is_a_one_line_error_naming_it(tmp_path, kind) -> None:
    options, problem = BAD_SERIES[kind]
    uid, files = write_series(tmp_path / "bad", random_hu(), patient="BAD", number=4, **options)
    (case,) = io.image_cases(tmp_path / "bad")
    with pytest.raises(DataError, match=problem) as exc:
        io.read_case(case.images)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'bad'}: DICOM series BAD_4_CT (SeriesInstanceUID {uid}")


def test_truncated_dicom_files_fail_naming_the_file(tmp_path) -> None:
    """A file cut short in its header is a case of its own; one cut short in its pixel data fails
    its series: one line each, naming the folder and the file or the series."""
    uid, files = write_series(tmp_path / "d", random_hu()[:, :, :3], patient="T", number=1)
    raw = files[0].read_bytes()
    (tmp_path / "d" / "cut_header").write_bytes(raw[:300])
    cases = io.image_cases(tmp_path / "d")
    assert [(c.name, len(c.images)) for c in cases] == [(cases[0].name, 3), ("cut_header", 1)]
    with pytest.raises(DataError, match=r"/d/cut_header: DICOM file without a SeriesInstanceUID \(truncated"):
        io.read_case(cases[1].images)
    files[1].write_bytes(files[1].read_bytes()[:-100])
    with pytest.raises(DataError, match=rf"/d: DICOM series T_1_CT \(SeriesInstanceUID {uid}, 3 file\(s\)\): "
                                        rf"SimpleITK's series reader cannot read {files[1].name} \(truncated") as exc:
        io.read_case(cases[0].images)
    assert "\n" not in str(exc.value)


def test_single_file_is_a_2d_image(tmp_path) -> None:
    hu = random_hu()
    write_series(tmp_path / "one", hu[:, :, :1])
    (case,) = io.image_cases(tmp_path / "one")
    arr, meta = io.read_case(case.images)
    assert arr.shape == (1, 24, 20) and meta.spacing == SPACING[:2] and len(meta.dicom) == 1
    np.testing.assert_array_equal(arr[0], hu[:, :, 0])
    assert meta.path == str(case.image)
    labels = (arr[0] > 500).astype(np.uint8) * 4  # a 2D model's output: one frame over the one slice
    seg = hd.seg.segread(io.write_label(tmp_path / "out" / "one.dcm", labels, meta, segments=[("x", 4)]))
    source = pydicom.dcmread(case.image)
    mask = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])
    np.testing.assert_array_equal(mask[0, :, :, 0], labels.T == 4)


def test_dicom_seg_needs_a_dicom_source(tmp_path) -> None:
    _, meta = io.read_image(write_nifti(tmp_path / "a.nii.gz", random_hu().astype(np.int16)))
    with pytest.raises(DataError, match=r"out/a.dcm: a DICOM-SEG output needs a DICOM series as input"):
        io.write_label(tmp_path / "out" / "a.dcm", np.zeros(SHAPE, np.uint8), meta, segments=[("x", 1)])
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------- end to end
def _threshold_predictor(monkeypatch) -> None:
    """The network replaced by a threshold of the phantom's intensities (label * 40 + 10): every
    class is predicted, so the masks compared below are not empty."""
    from seg.predict import Predictor

    def predict_array(self, image, spacing=None, return_probabilities=False):
        return np.clip(np.rint((image[0].astype(float) - 10) / 40), 0, 2).astype(np.uint8), None

    monkeypatch.setattr(Predictor, "predict_array", predict_array)


def _check_dicom_seg(seg_path: Path, nii_path: Path, series_uid: str, files: list[Path]) -> None:
    """``seg_path`` read with highdicom: segments named like the classes (values 1 and 4 in the
    tracking IDs), references to every source slice, the source's plane positions, orientation and
    pixel spacing, and per class the masks of the NIfTI label map ``nii_path``."""
    seg = hd.seg.segread(seg_path)
    sources = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, files)}
    first = next(iter(sources.values()))
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID, seg.PatientID) == \
        (first.StudyInstanceUID, first.FrameOfReferenceUID, first.PatientID)
    assert seg.get_segment_numbers() == [1, 2]
    described = [seg.get_segment_description(i) for i in (1, 2)]
    assert [d.segment_label for d in described] == ["outer", "inner"]
    assert [d.tracking_id for d in described] == ["outer (label value 1)", "inner (label value 4)"]
    assert all(d.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC for d in described)
    assert all(d.segmented_property_type.value == "85756007" for d in described)
    (ref_series,) = seg.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == series_uid
    assert {i.ReferencedSOPInstanceUID for i in ref_series.ReferencedInstanceSequence} == set(sources)
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(shared.PlaneOrientationSequence[0].ImageOrientationPatient,
                               first.ImageOrientationPatient, atol=1e-6)
    np.testing.assert_allclose(shared.PixelMeasuresSequence[0].PixelSpacing, first.PixelSpacing)
    assert len(seg.PerFrameFunctionalGroupsSequence) > 0
    for frame in seg.PerFrameFunctionalGroupsSequence:
        src = sources[frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose(frame.PlanePositionSequence[0].ImagePositionPatient,
                                   src.ImagePositionPatient, atol=1e-6)
    normal = np.cross(*np.reshape(first.ImageOrientationPatient, (2, 3)))
    order = sorted(sources, key=lambda uid: np.dot(sources[uid].ImagePositionPatient, normal))
    masks = seg.get_pixels_by_source_instance(order, segment_numbers=[1, 2],
                                              assert_missing_frames_are_empty=True)  # (Z, rows, cols, 2)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(nii_path)))  # (Z, Y, X)
    assert masks.shape == (*label.shape, 2)
    for k, value in enumerate((1, 4)):
        np.testing.assert_array_equal(masks[..., k], label == value)


@pytest.mark.parametrize("network", ["trained", "threshold"])
def test_infer_dicom_folder_writes_dicom_seg_over_the_source(trained_checkpoint, tmp_path, monkeypatch,
                                                            network) -> None:
    _, ckpt = trained_checkpoint
    if network == "threshold":
        _threshold_predictor(monkeypatch)
    uid, files = write_series(tmp_path / "in" / "patient" / "ct", phantom(), patient="PAT-1", number=3)
    dcm, nii = tmp_path / "dcm", tmp_path / "nii"
    probabilities = ["--save-probabilities"] if network == "trained" else []  # the threshold has none
    assert infer_seg.main(["-i", str(tmp_path / "in"), "-o", str(dcm), "-m", str(ckpt), "--suffix", "_seg",
                           *probabilities]) == 0
    assert infer_seg.main(["-i", str(tmp_path / "in"), "-o", str(nii), "-m", str(ckpt), "--format", "nii.gz"]) == 0
    assert sorted(p.name for p in dcm.iterdir()) == ["PAT-1_3_CT_seg.dcm"] + ["probabilities"] * len(probabilities)
    if probabilities:  # as NIfTI, on the series' grid
        probs, probs_meta = io.read_image(dcm / "probabilities" / "PAT-1_3_CT_seg.nii.gz")
        assert probs.shape == (3, *SHAPE)
        assert_same_geometry(probs_meta, io.read_case(files)[1])
    label, label_meta = io.read_label(nii / "PAT-1_3_CT.nii.gz")
    assert_same_geometry(label_meta, io.read_case(files)[1])
    if network == "threshold":
        assert set(np.unique(label)) == {0, 1, 4}
    _check_dicom_seg(dcm / "PAT-1_3_CT_seg.dcm", nii / "PAT-1_3_CT.nii.gz", uid, files)
    seg = hd.seg.segread(dcm / "PAT-1_3_CT_seg.dcm")
    assert seg.SeriesNumber == 1003 and seg.SeriesInstanceUID != uid
    assert io.dicom_files(dcm) == [dcm / "PAT-1_3_CT_seg.dcm"] and io.dicom_cases(io.dicom_files(dcm)) == []
    # a DICOM-SEG is DICOM, but no image series: an output folder is no input


def test_bad_series_fail_one_line_each_and_the_good_one_is_written(trained_checkpoint, tmp_path, caplog) -> None:
    _, ckpt = trained_checkpoint
    folder = tmp_path / "in"
    good, good_files = write_series(folder, phantom(), patient="GOOD", number=1, seed=10)
    for i, kind in enumerate(["missing slice", "mixed orientation", "no pixel data"]):  # all in one folder
        write_series(folder, random_hu(i), patient="BAD", number=i + 2, seed=i, **BAD_SERIES[kind][0])
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        assert infer_seg.main(["-i", str(folder), "-o", str(out), "-m", str(ckpt)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["GOOD_1_CT.dcm"]  # no half-written output, no temp
    assert hd.seg.segread(out / "GOOD_1_CT.dcm").ReferencedSeriesSequence[0].SeriesInstanceUID == good
    errors = sorted({r.getMessage().strip() for r in caplog.records if "DICOM series" in r.getMessage()})
    assert len(errors) == 3
    for msg, (kind, number) in zip(errors, [("missing slice", 2), ("mixed orientation", 3), ("no pixel data", 4)]):
        assert "\n" not in msg and msg.startswith(f"{folder}: DICOM series BAD_{number}_CT (")
        assert re.search(BAD_SERIES[kind][1], msg), msg


def test_single_file_with_a_3d_model_is_refused_with_the_existing_message(trained_checkpoint, tmp_path,
                                                                          caplog) -> None:
    _, ckpt = trained_checkpoint
    _, (file,) = write_series(tmp_path / "in", phantom()[:, :, :1])
    with caplog.at_level(logging.ERROR):
        assert infer_seg.main(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", str(ckpt)]) == 2
    assert any(r.getMessage() == f"{file}: has 2 spatial axes (shape (24, 20)) but the model is 3D"
               for r in caplog.records)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_dicom_seg_of_a_nifti_input_is_refused_before_the_model(tmp_path, capsys) -> None:
    image = write_nifti(tmp_path / "a.nii.gz", phantom().astype(np.int16))
    missing = tmp_path / "no_such_checkpoint.pt"  # never opened: the error comes first
    assert infer_seg.main(["-i", str(image), "-o", str(tmp_path / "out"), "-m", str(missing),
                           "--format", "dicom-seg"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {image}: is not a DICOM series: --format dicom-seg writes DICOM Segmentation "
                   "objects over DICOM inputs only; choose another format"]
    write_series(tmp_path / "dicom", phantom())
    assert infer_seg.main(["-i", str(tmp_path / "dicom"), "-o", str(tmp_path / "out"), "-m", str(missing),
                           "--labels", str(tmp_path)]) == 2
    assert "--labels evaluates label maps, not DICOM-SEG outputs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_labels_evaluate_nifti_outputs_of_dicom_inputs(trained_checkpoint, tmp_path, monkeypatch) -> None:
    _, ckpt = trained_checkpoint
    _threshold_predictor(monkeypatch)
    hu = phantom()
    write_series(tmp_path / "in", hu, patient="PAT-1", number=3)
    reference = np.clip(np.rint((hu - 10) / 40), 0, 2).astype(np.uint8)
    reference[reference == 2] = 4
    reference[:3] = 0  # an imperfect reference: the Dice is below 1
    (tmp_path / "labels").mkdir()
    write_nifti(tmp_path / "labels" / "PAT-1_3_CT.nii.gz", reference)
    out = tmp_path / "out"
    assert infer_seg.main(["-i", str(tmp_path / "in"), "-o", str(out), "-m", str(ckpt), "--format", "nii.gz",
                           "--labels", str(tmp_path / "labels")]) == 0
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert list(summary["classes"]) == ["outer", "inner"]
    assert (out / "evaluation" / "cases" / "PAT-1_3_CT.png").is_file()
