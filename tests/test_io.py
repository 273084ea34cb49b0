"""seg.io: voxel order, geometry round trips (checked with SimpleITK directly), dtypes, atomic writes;
cases and their names, reading checks (finiteness, channel grids, label maps), the one tolerance."""
import math
import re

import numpy as np
import pytest
import SimpleITK as sitk

from seg import io
from seg.errors import DataError


def _rotation_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


# LPS in ITK terms is identity-like; a RAS-oriented NIfTI has x and y flipped in ITK's LPS frame.
GEOMETRIES = {
    "lps.nrrd": (_rotation_z(25.0), (0.7, 0.9, 3.5), (-12.5, 30.25, 7.0)),
    "ras.nii.gz": (np.diag([-1.0, -1.0, 1.0]) @ _rotation_z(-40.0), (0.8, 1.25, 4.0), (90.0, -120.5, -60.0)),
    "meta.mha": (_rotation_z(90.0), (1.5, 1.0, 2.0), (1.0, 2.0, 3.0)),
    "detached.mhd": (_rotation_z(10.0), (1.5, 1.0, 2.0), (1.0, 2.0, 3.0)),
}


def _make_sitk(arr_xyz: np.ndarray, direction, spacing, origin) -> sitk.Image:
    img = sitk.GetImageFromArray(arr_xyz.transpose(2, 1, 0))
    img.SetDirection(tuple(np.asarray(direction).ravel()))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometry_round_trip(tmp_path, name):
    direction, spacing, origin = GEOMETRIES[name]
    rng = np.random.default_rng(0)
    raw = rng.integers(-500, 1500, size=(7, 5, 4)).astype(np.int16)  # (X, Y, Z), non-cubic
    src = tmp_path / f"in_{name}"
    sitk.WriteImage(_make_sitk(raw, direction, spacing, origin), str(src))

    arr, meta = io.read_image(src)
    assert arr.shape == (1, 7, 5, 4)
    np.testing.assert_array_equal(arr[0], raw)  # torchio order: arr[x, y, z]
    assert meta.size == (7, 5, 4) and meta.path == str(src)

    labels = (raw > 500).astype(np.int64) + (raw > 1000)
    out = io.write_label(tmp_path / f"out_{name}", labels, meta, num_classes=3)
    back = sitk.ReadImage(str(out))
    assert back.GetPixelID() == sitk.sitkUInt8
    assert back.GetSize() == (7, 5, 4)
    np.testing.assert_allclose(back.GetSpacing(), spacing, rtol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(np.reshape(back.GetDirection(), (3, 3)), direction, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back).transpose(2, 1, 0), labels)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left


def test_png_2d_axis_order_and_rgb(tmp_path):
    yx = np.arange(35, dtype=np.uint8).reshape(5, 7)  # SimpleITK order (Y, X)
    sitk.WriteImage(sitk.GetImageFromArray(yx), str(tmp_path / "g.png"))
    arr, meta = io.read_image(tmp_path / "g.png")
    assert arr.shape == (1, 7, 5) and meta.size == (7, 5)
    np.testing.assert_array_equal(arr[0], yx.T)
    rgb = np.stack([yx, yx + 1, yx + 2], -1)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "c.png"))
    arr, _ = io.read_image(tmp_path / "c.png")
    assert arr.shape == (3, 7, 5)
    np.testing.assert_array_equal(arr[2], yx.T + 2)
    out = io.write_label(tmp_path / "o.png", arr[0] % 3, meta)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), (yx % 3))


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_write_image_probabilities(tmp_path, ext):
    direction, spacing, origin = GEOMETRIES["lps.nrrd"]
    meta = io.ImageMeta(spacing, origin, tuple(direction.ravel()), (6, 5, 3))
    probs = np.random.default_rng(1).random((3, 6, 5, 3)).astype(np.float32)
    io.write_image(tmp_path / f"p{ext}", probs, meta)
    arr, back = io.read_image(tmp_path / f"p{ext}")
    np.testing.assert_allclose(arr, probs, rtol=1e-6)
    np.testing.assert_allclose(back.spacing, spacing, rtol=1e-6)


def test_label_dtype_uint16_above_256_classes(tmp_path):
    meta = io.ImageMeta((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), (4, 3))
    labels = np.arange(12).reshape(4, 3) * 30  # max 330
    out = io.write_label(tmp_path / "l.nrrd", labels, meta)
    assert sitk.ReadImage(str(out)).GetPixelID() == sitk.sitkUInt16
    assert io.label_dtype(labels, num_classes=256) == np.uint8


def test_split_extension():
    assert io.split_extension("p/q.Nii.Gz") == ("q", ".Nii.Gz")
    assert io.split_extension("x.y.nii.gz") == ("x.y", ".nii.gz") and io.split_extension("c.nhdr") == ("c", ".nhdr")
    assert str(io.with_extension("d/b.nii.gz", "nrrd")) == "d/b.nrrd"


def _names(cases):
    return [(c.name, [p.name for p in c.images]) for c in cases]


def test_group_cases_channel_files_only_with_their_0000(tmp_path):
    """One rule for training, inference and evaluation: ``name_0001`` joins a case only when
    ``name_0000`` exists; otherwise each file is its own case, named like the file."""
    paths = [tmp_path / n for n in ("c_0001.nii.gz", "c_0000.nii.gz", "a.nii.gz", "a.nrrd",
                                    "case_0001.nii.gz", "case_0002.nrrd", "la_003_0000.mha")]
    assert _names(io.group_cases(paths)) == [
        ("c", ["c_0000.nii.gz", "c_0001.nii.gz"]), ("a", ["a.nii.gz"]), ("a", ["a.nrrd"]),
        ("case_0001", ["case_0001.nii.gz"]), ("case_0002", ["case_0002.nrrd"]), ("la_003", ["la_003_0000.mha"])]
    with pytest.raises(DataError, match=r"suffixes _0000, _0002; expected _0000 to _0001") as exc:
        io.group_cases([tmp_path / "d_0000.nrrd", tmp_path / "d_0002.nrrd"])
    assert "d_0000.nrrd" in str(exc.value)


def test_image_cases_every_format_and_pattern(tmp_path):
    for name in ("b.png", "a.nhdr", "c_0000.mhd", "notes.txt", ".hidden.nrrd"):
        (tmp_path / name).write_bytes(b"")
    assert _names(io.image_cases(tmp_path)) == [("a", ["a.nhdr"]), ("b", ["b.png"]), ("c", ["c_0000.mhd"])]
    assert _names(io.image_cases([tmp_path / "b.png"])) == [("b", ["b.png"])]
    with pytest.raises(DataError, match=r"no image files matching 'z\*'") as exc:
        io.image_cases(tmp_path, pattern="z*")
    assert str(tmp_path) in str(exc.value)
    with pytest.raises(DataError, match="no such file or folder"):
        io.image_cases(tmp_path / "missing")


def test_corrupt_and_missing_files_raise_data_error(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(DataError, match="broken.nii.gz"):
        io.read_image(bad)
    with pytest.raises(DataError, match="missing.nrrd"):
        io.read_image(tmp_path / "missing.nrrd")


def test_failed_write_leaves_nothing(tmp_path):
    meta = io.ImageMeta((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), (4, 3))
    with pytest.raises(DataError, match="p.png"):  # PNG cannot store float32
        io.write_image(tmp_path / "p.png", np.zeros((1, 4, 3), np.float32), meta)
    with pytest.raises(ValueError):
        io.write_label(tmp_path / "l.nrrd", np.zeros((4, 3, 2)), meta)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- reading checks
def _write(path, arr_xyz, spacing=(0.8, 1.0, 2.0), origin=(1.0, 2.0, 3.0), direction=np.eye(3)):
    sitk.WriteImage(_make_sitk(arr_xyz, direction, spacing, origin), str(path))
    return path


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha", ".nhdr", ".mhd"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_refused_in_every_format(tmp_path, ext, bad):
    arr = np.zeros((5, 4, 3), np.float32)
    arr[1, 2, 1] = bad
    path = _write(tmp_path / f"x{ext}", arr)
    with pytest.raises(DataError, match=r"x\.\w+.*: has 1 NaN or infinite voxel") as exc:
        io.read_case(path)
    assert "\n" not in str(exc.value)


def _nifti(path, stored, slope, inter):
    """A NIfTI file of ``stored`` with the header's scl_slope / scl_inter set as given (written raw)."""
    import nibabel as nib

    img = nib.Nifti1Image(stored, np.eye(4))
    img.header["scl_slope"], img.header["scl_inter"] = slope, inter
    nib.save(img, str(path))
    return path


NIFTI_SCALING = {  # (scl_slope, scl_inter): the message
    (1e38, 0.0): r"scl_slope 1e\+38 \(scl_inter 0\) scales the data to infinity \(20 voxel\(s\) beyond "
                 r"float32's ±3.4e\+38\); fix the header$",
    (1e37, 3e38): r"scl_slope 1e\+37 \(scl_inter 3e\+38\) scales the data to infinity \(19 voxel\(s\) beyond",
    (1.0, np.nan): r"scl_inter nan \(with scl_slope 1\) is not a finite number: the intensity scaling is "
                   r"undefined; fix the header \(a finite scl_inter, or scl_slope 0 for no scaling\)$",
    (2.0, -np.inf): r"scl_inter -inf \(with scl_slope 2\) is not a finite number",
    (np.inf, 0.0): r"scl_slope inf scales the data to infinity; fix the header \(scl_slope 0 means no scaling\)$",
    (0.0, 7.0): r"scl_inter 7 with scl_slope 0: the NIfTI standard ignores the intercept when the slope is 0 or "
                r"NaN, SimpleITK adds it; fix the header \(scl_slope 1 to add it, scl_inter 0 to ignore it\)$",
    (np.nan, -1.0): r"scl_inter -1 with scl_slope nan: the NIfTI standard ignores the intercept",
}


@pytest.mark.parametrize("slope, inter", list(NIFTI_SCALING))
def test_nifti_scaling_to_infinity_or_undefined_is_refused_saying_so(tmp_path, slope, inter):
    stored = np.arange(24, dtype=np.int16).reshape(2, 3, 4)  # 0..23: x 1e38 overflows from 4 on
    path = _nifti(tmp_path / "s.nii.gz", stored, slope, inter)
    for read in (io.read_image, io.read_label, io.read_case):
        with pytest.raises(DataError, match=f"^{re.escape(str(path))}: {NIFTI_SCALING[slope, inter]}"):
            read(path)


@pytest.mark.parametrize("slope, inter, expected", [
    (2.0, -5.0, lambda x: x * 2.0 - 5.0),   # scaling applied
    (np.nan, np.nan, lambda x: x),          # nibabel's "no scaling"
    (0.0, 0.0, lambda x: x),                # the NIfTI standard's "no scaling"
    (np.nan, 0.0, lambda x: x),
])
def test_nifti_scaling_that_is_defined_reads_as_the_standard_says(tmp_path, slope, inter, expected):
    stored = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    arr, _ = io.read_image(_nifti(tmp_path / "s.nii.gz", stored, slope, inter))
    np.testing.assert_array_equal(arr[0], expected(stored))


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha", ".nhdr", ".mhd"])
def test_float64_beyond_float32_is_refused_in_every_format(tmp_path, ext):
    """Training and inference compute in float32: a float64 voxel of 1e300 would become infinite."""
    arr = np.zeros((5, 4, 3), np.float64)
    arr[1, 2, 1], arr[0, 0, 0] = 1e300, -1e39
    path = _write(tmp_path / f"x{ext}", arr)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: has 2 voxel\(s\) beyond float32's range "
                                        r"\(±3.4e\+38, up to 1e\+300\), which training and inference compute "
                                        r"in; rescale the image$"):
        io.read_case(path)
    arr[1, 2, 1], arr[0, 0, 0] = 3e38, -3e38  # within float32: accepted
    _write(tmp_path / f"x{ext}", arr)
    assert np.isfinite(io.read_case(path)[0].astype(np.float32)).all()


@pytest.mark.parametrize("problem", ["origin", "direction", "spacing", "size"])
def test_channel_on_another_grid_is_refused(tmp_path, problem):
    arr = np.arange(60, dtype=np.int16).reshape(5, 4, 3)
    first = _write(tmp_path / "c_0000.nrrd", arr)
    geometry = {"origin": dict(origin=(1.0, 2.0, 3.5)), "spacing": dict(spacing=(0.8, 1.0, 2.2)),
                "direction": dict(direction=_rotation_z(10.0)), "size": {}}[problem]
    second = _write(tmp_path / "c_0001.nrrd", arr[:, :, :2] if problem == "size" else arr, **geometry)
    with pytest.raises(DataError) as exc:
        io.read_case([first, second])
    msg = str(exc.value)
    assert msg.startswith(str(second)) and str(first) in msg and problem in msg and "\n" not in msg


def test_one_tolerance_accepts_float_header_noise_and_refuses_more(tmp_path):
    """Origin off by 1 % of a voxel and spacing off by a relative 1e-4 pass (as in training);
    10 % of a voxel does not."""
    ref = io.ImageMeta((0.8, 1.0, 2.0), (1.0, 2.0, 3.0), tuple(np.eye(3).ravel()), (5, 4, 3), "ref.nrrd")
    near = io.ImageMeta((0.8 * (1 + 1e-4), 1.0, 2.0), (1.008, 2.0, 3.0), ref.direction, ref.size, "near.nrrd")
    io.check_geometry(near, ref)
    far = io.ImageMeta(ref.spacing, (1.08, 2.0, 3.0), ref.direction, ref.size, "far.nrrd")
    with pytest.raises(DataError, match=r"^far\.nrrd: label map geometry differs from its image ref\.nrrd: origin"):
        io.check_geometry(far, ref)


def test_read_label_integers_and_components(tmp_path):
    lab = np.array([[0, 1], [2, 1]], np.uint8)  # (X, Y)
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([lab.T] * 3, -1), isVector=True), str(tmp_path / "rgb.png"))
    arr, meta = io.read_label(tmp_path / "rgb.png")
    np.testing.assert_array_equal(arr, lab)
    assert meta.size == (2, 2)
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([lab.T, lab.T * 0], -1), isVector=True),
                    str(tmp_path / "two.mha"))
    with pytest.raises(DataError, match="two.mha: label map has 2 different components"):
        io.read_label(tmp_path / "two.mha")
    floats = _write(tmp_path / "f.nrrd", np.full((2, 2, 2), 2.0, np.float32))
    assert io.read_label(floats)[0].dtype == np.int64
    _write(tmp_path / "f.nrrd", np.full((2, 2, 2), 0.5, np.float32))
    with pytest.raises(DataError, match=r"f\.nrrd: label map has non-integer values \(e\.g\. 0\.5\)"):
        io.read_label(floats)
