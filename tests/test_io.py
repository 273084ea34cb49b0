"""seg.io: voxel order, geometry round trips (checked with SimpleITK directly), dtypes, atomic writes."""
import math

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


def test_case_names():
    assert io.case_name("a/brain1.nrrd") == "brain1"
    assert io.case_name("la_003_0000.nii.gz") == "la_003"
    assert io.case_name("x.y.nii.gz") == "x.y"
    assert io.case_name("c.nhdr") == "c" and io.case_name("b.MHA") == "b"
    assert io.split_extension("p/q.Nii.Gz") == ("q", ".Nii.Gz")
    assert str(io.with_extension("d/b.nii.gz", "nrrd")) == "d/b.nrrd"


def test_group_channels(tmp_path):
    paths = [tmp_path / n for n in ("c_0001.nii.gz", "c_0000.nii.gz", "a.nii.gz", "a.nrrd")]
    groups = io.group_channels(paths)
    assert [p.name for p in groups["c"]] == ["c_0000.nii.gz", "c_0001.nii.gz"]
    assert len(groups) == 3


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
