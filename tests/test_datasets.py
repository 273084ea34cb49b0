"""Training data: pairing by name, case checks naming the culprit file, preprocessing, 2D/3D loaders."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import datasets as ds
from hparam import DataConfig
from seg.errors import DataError, UserError
from seg.preprocess import resampled_shape

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo" / "mni152"
SPACING = (1.2, 1.0, 1.5)


# ----------------------------------------------------------------------------- helpers
def write(path: Path, arr: np.ndarray, spacing=SPACING, origin=None, direction=None) -> Path:
    """Write a (Z, Y, X) / (Y, X) numpy array (SimpleITK order) with the given geometry."""
    img = sitk.GetImageFromArray(arr)
    if arr.ndim == 3:
        img.SetSpacing(spacing)
        img.SetOrigin(origin or (-10.0, 5.0, 2.5))
        if direction is not None:
            img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def spheres(shape=(20, 26, 30), centre=None, radii=(5, 9)) -> np.ndarray:
    """(Z, Y, X) uint8 label: class 2 inside class 1, background 0."""
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    c = centre or [s / 2 for s in shape]
    r = np.sqrt(sum((g - ci) ** 2 for g, ci in zip(grids, c)))
    return np.where(r < radii[0], 2, np.where(r < radii[1], 1, 0)).astype(np.uint8)


def make_case(folder: Path, name: str, ext: str = ".nii.gz", label: np.ndarray | None = None,
              seed: int = 0, **geometry) -> ds.Case:
    """A synthetic case: intensity 40 * label + 10 + noise; returns it as found by ``find_cases``."""
    label = spheres() if label is None else label
    rng = np.random.default_rng(seed)
    image = (label * 40.0 + 10.0 + rng.normal(0, 4, label.shape)).astype(np.float32)
    img = write(folder / "images" / f"{name}{ext}", image, **geometry)
    lab = write(folder / "labels" / f"{name}{ext}", label, **geometry)
    return ds.Case(name, (img,), lab)


def data_cfg(dims: int = 3, **kw) -> DataConfig:
    base = dict(spatial_dims=dims, class_names=["bg", "outer", "inner"], in_channels=1,
                patch_size=(16, 20, 12) if dims == 3 else (24, 20), samples_per_volume=2, queue_length=4,
                normalization="zscore", target_spacing=None, slice_axis=2,
                mirror_axes=tuple(range(dims)), rotation_axes=(0, 1, 2), augment_elastic=False)
    base.update(kw)
    return DataConfig(**base)


def first_batches(cases, cfg, seed, n=2, batch_size=3):
    it = iter(ds.build_train_loader(cases, cfg, batch_size, seed))
    return [next(it) for _ in range(n)]


def one_line_error(exc: pytest.ExceptionInfo, culprit: Path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    assert culprit.name in msg, msg
    return msg


# ----------------------------------------------------------------------------- finding cases
def test_find_cases_pairs_by_name_not_by_order(tmp_path: Path, caplog) -> None:
    for i, (name, ext) in enumerate([("b", ".nii.gz"), ("a", ".nrrd"), ("c", ".mha")]):
        make_case(tmp_path, name, ext, seed=i)
    # labels with other extensions, and an orphan label that sorts first: zip-by-order would misalign
    for name, ext in [("a", ".nii.gz"), ("b", ".mha"), ("c", ".nrrd")]:
        src = next((tmp_path / "labels").glob(f"{name}.*"))
        (tmp_path / "labels2").mkdir(exist_ok=True)
        sitk.WriteImage(sitk.ReadImage(str(src)), str(tmp_path / "labels2" / f"{name}{ext}"))
    write(tmp_path / "labels2" / "0_orphan.nii.gz", spheres())
    with caplog.at_level(logging.WARNING):
        cases = ds.find_cases(tmp_path / "images", tmp_path / "labels2")
    assert [c.name for c in cases] == ["a", "b", "c"]
    assert [c.image.name for c in cases] == ["a.nrrd", "b.nii.gz", "c.mha"]
    assert [c.label.name for c in cases] == ["a.nii.gz", "b.mha", "c.nrrd"]
    assert "0_orphan.nii.gz" in caplog.text


def test_find_cases_nnunet_channels_and_four_digit_names(tmp_path: Path) -> None:
    lab = spheres()
    for case in ("la_003", "la_004"):
        for ch in (1, 0):  # written out of order on purpose
            write(tmp_path / "imagesTr" / f"{case}_{ch:04d}.nii.gz", (lab * (10 + ch)).astype(np.float32))
        write(tmp_path / "labelsTr" / f"{case}.nii.gz", lab)
    cases = ds.find_cases(tmp_path / "imagesTr", tmp_path / "labelsTr")
    assert [c.name for c in cases] == ["la_003", "la_004"]
    assert [p.name for p in cases[0].images] == ["la_003_0000.nii.gz", "la_003_0001.nii.gz"]
    arrays = ds.load_case_arrays(cases[0], data_cfg(in_channels=2, normalization="none"))
    assert arrays.image.shape == (2, 30, 26, 20)
    np.testing.assert_array_equal(arrays.image[1], arrays.label * 11)  # channel order kept
    # single-channel cases whose names end in 4 digits are not mistaken for channels
    for name in ("case_0001", "case_0002"):
        make_case(tmp_path / "plain", name)
    cases = ds.find_cases(tmp_path / "plain" / "images", tmp_path / "plain" / "labels")
    assert [(c.name, len(c.images)) for c in cases] == [("case_0001", 1), ("case_0002", 1)]


def test_find_cases_errors_name_the_culprit(tmp_path: Path) -> None:
    make_case(tmp_path, "a")
    make_case(tmp_path, "b")
    (tmp_path / "labels" / "b.nii.gz").unlink()
    with pytest.raises(DataError) as exc:
        ds.find_cases(tmp_path / "images", tmp_path / "labels")
    one_line_error(exc, tmp_path / "images" / "b.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files") as exc:
        ds.find_cases(tmp_path / "empty", tmp_path / "labels")
    one_line_error(exc, tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        ds.find_cases(tmp_path / "images", tmp_path / "missing")
    write(tmp_path / "images" / "c_0000.nii.gz", spheres())
    write(tmp_path / "images" / "c_0002.nii.gz", spheres())
    write(tmp_path / "labels" / "c.nii.gz", spheres())
    with pytest.raises(DataError, match="_0001") as exc:
        ds.find_cases(tmp_path / "images", tmp_path / "labels", pattern="c_*")
    one_line_error(exc, tmp_path / "images" / "c_0000.nii.gz")


def test_find_cases_same_grouping_rule_as_inference(tmp_path: Path) -> None:
    """With ``case_0000`` present, ``case_0000``, ``case_0001`` are one case's channels in training as
    at inference; the error says so and how to name one-channel cases."""
    from seg import io
    for name in ("case_0000", "case_0001"):
        make_case(tmp_path, name)
    assert [c.name for c in io.image_cases(tmp_path / "images")] == ["case"]
    with pytest.raises(DataError, match="no label map named 'case'") as exc:
        ds.find_cases(tmp_path / "images", tmp_path / "labels")
    msg = one_line_error(exc, tmp_path / "images" / "case_0000.nii.gz")
    assert "channels of one case 'case'" in msg and "case_0000_0000.nii.gz" in msg
    make_case(tmp_path, "a", ".nrrd")
    write(tmp_path / "images" / "a.mha", spheres().astype(np.float32))
    with pytest.raises(DataError, match="several image files for case 'a'"):
        ds.find_cases(tmp_path / "images", tmp_path / "labels", pattern="a.*")


def test_split_cases_seeded_case_level() -> None:
    cases = [ds.Case(f"c{i}", (Path(f"c{i}.nii.gz"),), Path(f"l{i}.nii.gz")) for i in range(10)]
    train, val = ds.split_cases(cases, 0.2, seed=3)
    assert len(val) == 2 and len(train) == 8 and not {c.name for c in train} & {c.name for c in val}
    assert ds.split_cases(cases[::-1], 0.2, seed=3) == (train, val)  # input order does not matter
    assert any(ds.split_cases(cases, 0.2, seed=s)[1] != val for s in range(4, 10))
    train, val = ds.split_cases(cases[:2], 0.01, seed=0)
    assert len(train) == len(val) == 1
    with pytest.raises(UserError):
        ds.split_cases(cases[:1], 0.2, seed=0)


def test_split_from_file_nnunet_format(tmp_path: Path) -> None:
    import json
    cases = [ds.Case(f"c{i}", (Path(f"c{i}.nii.gz"),), Path(f"l{i}.nii.gz")) for i in range(5)]
    split = tmp_path / "splits_final.json"
    split.write_text(json.dumps([{"train": ["c3", "c0", "c1"], "val": ["c4", "c2"]},
                                 {"train": ["c2", "c4"], "val": ["c0", "c1", "c3"]}]))
    train, val = ds.split_from_file(cases, split, 0)
    assert [c.name for c in train] == ["c0", "c1", "c3"] and [c.name for c in val] == ["c2", "c4"]
    assert [c.name for c in ds.split_from_file(cases, split, 1)[1]] == ["c0", "c1", "c3"]
    with pytest.raises(DataError, match="no fold 2") as exc:
        ds.split_from_file(cases, split, 2)
    one_line_error(exc, split)
    split.write_text(json.dumps([{"train": ["c0", "c9"], "val": ["c1"]}]))
    with pytest.raises(DataError, match="'c9'"):
        ds.split_from_file(cases, split, 0)
    split.write_text(json.dumps([{"train": ["c0", "c1"], "val": ["c1"]}]))
    with pytest.raises(DataError, match="in both"):
        ds.split_from_file(cases, split, 0)


BAD_SPLITS = {  # content of splits_final.json: the message after "<file>: "
    "nested": ("[" * 100_000 + "]" * 100_000, "cannot read the split file: its JSON is nested too deeply"),
    "names are lists": ('[{"train": [["c0"], ["c1"]], "val": ["c2"]}]',
                        "fold 0 'train' holds ['c0']: case names must be strings"),
    "name is a number": ('[{"train": ["c0"], "val": [2]}]', "fold 0 'val' holds 2: case names must be strings"),
    "duplicate in train": ('[{"train": ["c0", "c1", "c0"], "val": ["c2"]}]',
                           "fold 0 lists case 'c0' twice in 'train': each case once per fold"),
    "duplicate in val": ('[{"train": ["c0"], "val": ["c2", "c2"]}]',
                         "fold 0 lists case 'c2' twice in 'val': each case once per fold"),
    "in both": ('[{"train": ["c0", "c1"], "val": ["c1"]}]',
                "fold 0 lists case 'c1' in both 'train' and 'val': each case once per fold"),
    "not found": ('[{"train": ["c0"], "val": ["c1", "x9", "x8"]}]',
                  "fold 0 'val' names 2 case(s) that are not among the 5 cases found (images with labels), "
                  "e.g. 'x9'"),
    "empty val": ('[{"train": ["c0"], "val": []}]', "fold 0 needs a non-empty 'val' list of case names, got []"),
    "val a string": ('[{"train": ["c0"], "val": "c1"}]',
                     "fold 0 needs a non-empty 'val' list of case names, got 'c1'"),
    "no train": ('[{"val": ["c1"]}]', "fold 0 needs a non-empty 'train' list of case names, got None"),
    "fold not an object": ('[["c0"]]', "has no fold 0 with 'train' and 'val' lists (1 fold(s); set data.fold)"),
    "not a list": ('{"train": ["c0"], "val": ["c1"]}',
                   'must hold a JSON list of folds, each {"train": [case names], "val": [case names]}'),
    "duplicate key": ('[{"train": ["c0"], "val": ["c1"], "val": ["c2"]}]',
                      "cannot read the split file (ValueError: key 'val' appears twice)"),
}


@pytest.mark.parametrize("kind", list(BAD_SPLITS))
def test_bad_split_file_is_one_line_naming_it(tmp_path: Path, kind: str) -> None:
    cases = [ds.Case(f"c{i}", (Path(f"c{i}.nii.gz"),), Path(f"l{i}.nii.gz")) for i in range(5)]
    content, problem = BAD_SPLITS[kind]
    split = tmp_path / "splits_final.json"
    split.write_text(content)
    with pytest.raises(DataError) as exc:
        ds.split_from_file(cases, split, 0)
    assert str(exc.value) == f"{split}: {problem}"


def test_demo_hippocampus_split_file() -> None:
    import json
    root = ROOT / "data" / "demo" / "hippocampus"
    cases = ds.find_cases(root / "imagesTr", root / "labelsTr")
    folds = json.loads((root / "splits_final.json").read_text())
    assert len(cases) == 200 and len(folds) == 5
    vals = [set(f["val"]) for f in folds]
    assert all(len(v) == 40 for v in vals) and set().union(*vals) == {c.name for c in cases}
    train, val = ds.split_from_file(cases, root / "splits_final.json", 0)
    assert len(train) == 160 and len(val) == 40 and not {c.name for c in train} & {c.name for c in val}


# ----------------------------------------------------------------------------- checks
def _corrupt(case: ds.Case, problem: str) -> Path:
    """Break one file of ``case`` in the way ``problem`` says; return the file that is at fault."""
    img, lab = case.image, case.label
    image = sitk.ReadImage(str(img))
    label = sitk.ReadImage(str(lab))
    arr = sitk.GetArrayFromImage(label)
    if problem == "spacing":
        label.SetSpacing((2.0, 2.0, 2.0))
    elif problem == "origin":
        label.SetOrigin((0.0, 0.0, 0.0))
    elif problem == "direction":
        label.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    elif problem == "size":
        label = sitk.GetImageFromArray(arr[:-2])
        label.CopyInformation(image[:, :, :-2])
    elif problem == "dims":
        label = sitk.GetImageFromArray(arr[5])
    elif problem in ("range", "255", "fraction"):
        values = {"range": {2: 7}, "255": {1: 255, 2: 255}, "fraction": {}}[problem]
        new = arr.astype(np.float32) if problem == "fraction" else arr.copy()
        for old, v in values.items():
            new[arr == old] = v
        if problem == "fraction":
            new[arr == 1] = 0.5
        label = sitk.GetImageFromArray(new)
        label.CopyInformation(image)
    elif problem in ("nan", "inf"):
        a = sitk.GetArrayFromImage(image)
        a[3, 3, 3] = np.nan if problem == "nan" else np.inf
        new = sitk.GetImageFromArray(a)
        new.CopyInformation(image)
        sitk.WriteImage(new, str(img))
        return img
    elif problem in ("truncated_image", "truncated_label"):
        path = img if problem == "truncated_image" else lab
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path
    sitk.WriteImage(label, str(lab))
    return lab


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("problem", ["spacing", "origin", "direction", "size", "dims", "range", "255",
                                     "fraction", "nan", "inf", "truncated_image", "truncated_label"])
def test_check_case_errors_name_the_culprit_file(tmp_path: Path, problem: str, ext: str) -> None:
    case = make_case(tmp_path, "bad", ext)
    ds.check_case(case, 3)  # fine before it is broken
    culprit = _corrupt(case, problem)
    with pytest.raises(DataError) as exc:
        ds.check_case(case, 3)
    msg = one_line_error(exc, culprit)
    if problem in ("spacing", "origin", "direction", "size"):
        assert problem in msg and str(case.image) in msg  # both files named
    if problem == "255":
        assert "255" in msg and "label_remap" in msg
        ds.check_case(case, 3, label_remap={255: 1})  # the suggested remap makes it pass
        arrays = ds.load_case_arrays(case, data_cfg(label_remap={255: 1}))
        assert set(np.unique(arrays.label)) == {0, 1}


def test_check_case_tolerates_float_header_noise(tmp_path: Path) -> None:
    case = make_case(tmp_path, "ok")
    label = sitk.ReadImage(str(case.label))
    label.SetSpacing(tuple(s * (1 + 1e-6) for s in SPACING))
    label.SetOrigin(tuple(o + 1e-4 for o in label.GetOrigin()))
    sitk.WriteImage(label, str(case.label))
    ds.check_case(case, 3)


def test_check_case_channels_against_config(tmp_path: Path) -> None:
    case = make_case(tmp_path, "one")
    with pytest.raises(DataError, match="in_channels=2") as exc:
        ds.check_case(case, 3, data_cfg=data_cfg(in_channels=2))
    one_line_error(exc, case.image)


def test_remap_is_simultaneous() -> None:
    lab = np.array([0, 1, 2, 2])
    np.testing.assert_array_equal(ds.remap_labels(lab, {1: 2, 2: 1}), [0, 2, 1, 1])


# ----------------------------------------------------------------------------- case arrays
def test_load_case_arrays_zscore_spacing_and_order(tmp_path: Path) -> None:
    label = spheres((20, 26, 30))
    case = make_case(tmp_path, "c", label=label)
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(case.image)))
    image[label == 0] = 0  # skull-stripped-like: zero background
    write(case.image, image)
    arr = ds.load_case_arrays(case, data_cfg(normalization="zscore_nonzero"))
    assert arr.image.shape == (1, 30, 26, 20) and arr.image.dtype == np.float32  # (C, X, Y, Z)
    assert arr.label.shape == (30, 26, 20) and arr.label.dtype == np.int64
    assert arr.spacing == pytest.approx(SPACING)
    np.testing.assert_array_equal(arr.label, label.transpose(2, 1, 0))
    fg = arr.image[0][arr.label > 0]
    assert abs(fg.mean()) < 1e-4 and abs(fg.std() - 1) < 1e-3
    # statistics of the non-zero voxels, applied to all: the zero background is the darkest value
    nonzero = image[image != 0].astype(np.float64)
    expected = (0 - nonzero.mean()) / nonzero.std()
    np.testing.assert_allclose(arr.image[0][arr.label == 0], expected, rtol=1e-4)
    assert expected < arr.image[0][arr.label > 0].min()
    arr = ds.load_case_arrays(case, data_cfg(normalization="zscore"))
    assert abs(arr.image.mean()) < 1e-4 and abs(arr.image.std() - 1) < 1e-3


def test_load_case_arrays_target_spacing(tmp_path: Path) -> None:
    case = make_case(tmp_path, "c", label=spheres((20, 26, 30)))
    target = (2.4, 0.5, 3.0)
    arr = ds.load_case_arrays(case, data_cfg(target_spacing=target))
    expected = resampled_shape((30, 26, 20), SPACING, target)
    assert expected == (15, 52, 10)
    assert arr.image.shape == (1, *expected) and arr.label.shape == expected
    assert arr.spacing == pytest.approx(target)
    assert set(np.unique(arr.label)) == {0, 1, 2}


# ----------------------------------------------------------------------------- 3D loader
@pytest.fixture
def cases3d(tmp_path: Path) -> list[ds.Case]:
    return [make_case(tmp_path, f"c{i}", ext, seed=i, label=spheres(centre=(10 + i, 12, 14)))
            for i, ext in enumerate([".nii.gz", ".nrrd", ".mha"])]


def assert_batch(batch, shape, channels=1, num_classes=3) -> None:
    assert batch["image"].shape == (len(batch["label"]), channels, *shape)
    assert batch["image"].dtype == torch.float32 and torch.isfinite(batch["image"]).all()
    assert batch["label"].shape == (len(batch["label"]), *shape) and batch["label"].dtype == torch.int64
    assert batch["label"].min() >= 0 and batch["label"].max() < num_classes


def test_3d_loader_shapes_and_determinism(cases3d) -> None:
    cfg = data_cfg(3)
    a = first_batches(cases3d, cfg, seed=5)
    for b in a:
        assert_batch(b, (16, 20, 12))
    # same seed, with the caller drawing from the global generators in between: same batches
    it = iter(ds.build_train_loader(cases3d, cfg, 3, 5))
    b = []
    for _ in range(2):
        b.append(next(it))
        torch.rand(7), np.random.rand(3)
    for x, y in zip(a, b):
        torch.testing.assert_close(x["image"], y["image"], rtol=0, atol=0)
        assert torch.equal(x["label"], y["label"])
    c = first_batches(cases3d, cfg, seed=6)
    assert not torch.equal(a[0]["image"], c[0]["image"])


def test_3d_loader_worker_processes_deterministic(cases3d) -> None:
    cfg = data_cfg(3, num_workers=1)
    a, b = first_batches(cases3d, cfg, seed=5), first_batches(cases3d, cfg, seed=5)
    for x, y in zip(a, b):
        assert_batch(x, (16, 20, 12))
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])


def test_3d_loader_all_augmentations(cases3d) -> None:
    cfg = data_cfg(3, augment_elastic=True, augment_affine=True, augment_intensity=True)
    for b in first_batches(cases3d, cfg, seed=0, n=3):
        assert_batch(b, (16, 20, 12))


def test_3d_loader_foreground_ratio(tmp_path: Path) -> None:
    label = np.zeros((20, 26, 30), np.uint8)
    label[0:2, 0:2, 27:30] = 1  # tiny foreground in a corner, next to the border
    label[19, 25, 0] = 2
    cases = [make_case(tmp_path, "corner", label=label)]
    for b in first_batches(cases, data_cfg(3, foreground_ratio=1.0, augment_affine=False), seed=1, n=4):
        assert all((lab > 0).any() for lab in b["label"])
        assert {1, 2} >= set(b["label"].unique().tolist()) - {0}
    seen = torch.cat([b["label"].flatten(1).gt(0).any(1)
                      for b in first_batches(cases, data_cfg(3, foreground_ratio=0.0), seed=1, n=4)])
    assert not seen.all()  # uniform patches mostly miss a tiny corner


def test_lookalike_patches_centre_on_unlabelled_voxels_of_the_targets_intensity() -> None:
    import torchio as tio

    image = torch.zeros(1, 40, 40, 40)
    label = torch.zeros(1, 40, 40, 40, dtype=torch.uint8)
    image[0, 4:10, 4:10, 4:10] = torch.linspace(4.0, 6.0, 216).reshape(6, 6, 6)  # the target
    label[0, 4:10, 4:10, 4:10] = 1
    image[0, 28:34, 26:32, 30:36] = 5.2  # a look-alike far from it, unlabelled
    image[0, 18:22, 30:34, 4:8] = 9.0    # bright, but not the target's intensity
    subject = tio.Subject(image=tio.ScalarImage(tensor=image), label=tio.LabelMap(tensor=label))
    sampler = ds.ForegroundSampler((8, 8, 8), foreground_ratio=0.0, lookalike_ratio=1.0)
    torch.manual_seed(0)
    for patch in sampler(subject, 20):
        centre = patch["image"].data[0, 4, 4, 4]
        assert centre == pytest.approx(5.2) and patch["label"].data[0, 4, 4, 4] == 0
    # the ratio splits the non-foreground patches; without foreground there are no look-alikes
    sampler = ds.ForegroundSampler((8, 8, 8), foreground_ratio=0.5, lookalike_ratio=0.5)
    kinds = [("fg" if p["label"].data[0, 4, 4, 4] else "look" if p["image"].data[0, 4, 4, 4] == pytest.approx(5.2)
              else "other") for p in sampler(subject, 400)]
    assert 0.4 < kinds.count("fg") / 400 < 0.6 and 0.17 < kinds.count("look") / 400 < 0.33
    empty = tio.Subject(image=tio.ScalarImage(tensor=image), label=tio.LabelMap(tensor=torch.zeros_like(label)))
    assert all(p["image"].data.shape == (1, 8, 8, 8) for p in sampler(empty, 5))


def test_3d_loader_volume_smaller_than_patch(tmp_path: Path) -> None:
    cases = [make_case(tmp_path, "small", label=spheres((6, 9, 7), radii=(2, 3)))]
    for b in first_batches(cases, data_cfg(3, patch_size=(16, 20, 12)), seed=0):
        assert_batch(b, (16, 20, 12))
        assert (b["label"] > 0).any()


# ----------------------------------------------------------------------------- 2D loader
@pytest.mark.parametrize("slice_axis", [0, 2])
def test_2d_loader_slices_shapes_and_determinism(cases3d, slice_axis: int) -> None:
    cfg = data_cfg(2, slice_axis=slice_axis, patch_size=(24, 20))
    a = first_batches(cases3d, cfg, seed=2)
    for b in a:
        assert_batch(b, (24, 20))
    b = first_batches(cases3d, cfg, seed=2)
    assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
               for x, y in zip(a, b))
    c = first_batches(cases3d, cfg, seed=3)
    assert not torch.equal(a[0]["image"], c[0]["image"])
    for b in first_batches(cases3d, dataclasses.replace(cfg, foreground_ratio=1.0), seed=4):
        assert all((lab > 0).any() for lab in b["label"])


def test_2d_augmentation_keeps_image_and_label_aligned(cases3d, tmp_path: Path) -> None:
    for case in cases3d:  # image = 100 * label exactly
        lab = sitk.ReadImage(str(case.label))
        img = sitk.Cast(lab, sitk.sitkFloat32) * 100.0
        sitk.WriteImage(img, str(case.image))
    cfg = data_cfg(2, normalization="none", augment_affine=True, augment_elastic=False,
                   augment_intensity=False, foreground_ratio=1.0, patch_size=(28, 24))
    agree = []
    for b in first_batches(cases3d, cfg, seed=0, n=6, batch_size=4):
        agree.append(((b["image"][:, 0] > 50) == (b["label"] > 0)).float().mean())
    assert float(torch.stack(agree).mean()) >= 0.98


def test_2d_intensity_augmentation_is_finite(cases3d) -> None:
    cfg = data_cfg(2, augment_intensity=True, augment_elastic=True)
    for b in first_batches(cases3d, cfg, seed=0, n=3):
        assert_batch(b, (24, 20))


def test_native_2d_png_cases(tmp_path: Path) -> None:
    for i in range(2):
        label = spheres((40, 34), centre=(20 + i, 15), radii=(6, 11))  # (Y, X)
        write(tmp_path / "images" / f"p{i}.png", (label * 100 + 20).astype(np.uint8))
        write(tmp_path / "labels" / f"p{i}.png", label)
    cases = ds.find_cases(tmp_path / "images", tmp_path / "labels")
    for c in cases:
        ds.check_case(c, 3)
    cfg = data_cfg(2, patch_size=(32, 48))
    arr = ds.load_case_arrays(cases[0], cfg)
    assert arr.image.shape == (1, 34, 40) and arr.label.shape == (34, 40) and len(arr.spacing) == 2
    for b in first_batches(cases, cfg, seed=0):
        assert_batch(b, (32, 48))
    with pytest.raises(DataError, match="spatial_dims=3"):
        ds.load_case_arrays(cases[0], data_cfg(3))


# ----------------------------------------------------------------------------- demo data
def test_demo_mni152_slabs() -> None:
    from hparam import Config
    from seg.train import planned_run
    from seg.config import load_request
    request, provenance = load_request(str(DEMO / "config.py"))
    cfg = planned_run(request, provenance=provenance)[0].config.data  # planned from the training slabs
    assert cfg.normalization == "zscore_nonzero" and cfg.patch_size == (64, 64, 32)
    cases = ds.find_cases(DEMO / "imagesTr", DEMO / "labelsTr")
    assert [c.name for c in cases] == ["mni152_slab00", "mni152_slab02", "mni152_slab04"]
    for c in cases:
        ds.check_case(c, cfg.num_classes, label_remap=cfg.label_remap)
    arr = ds.load_case_arrays(cases[1], cfg)
    assert arr.image.shape[0] == 1 and arr.image.shape[-1] == 32 and arr.spacing == pytest.approx((1, 1, 1))
    assert set(np.unique(arr.label)) == {0, 1, 2}
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(cases[1].image))).transpose(2, 1, 0)
    brain = arr.image[0][raw != 0]
    assert abs(brain.mean()) < 1e-3 and abs(brain.std() - 1) < 1e-3
    assert np.all(arr.image[0][raw == 0] < brain.min())
    batch = first_batches(cases, cfg, seed=0, n=1, batch_size=2)[0]
    assert_batch(batch, cfg.patch_size)
