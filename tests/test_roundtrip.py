"""Label values round-trip through a real (tiny) trained checkpoint: a data set labelled {0, 1, 4},
trained with ``data.label_remap={4: 2}``, is written back as {0, 1, 4}, and ``--labels`` evaluates
in those values (checked against Dice computed here from the files, not the prediction against
itself)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import infer_seg


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float(np.sum(a & b)) / max(1, float(a.sum() + b.sum()))


def _threshold_predictor(monkeypatch) -> None:
    """Replace the network by a threshold of the synthetic intensities (label * 40 + 10 + noise):
    an imperfect segmentation that is independent of the reference files and predicts every class,
    so what is checked is the mapping, not how well a 4-step model trained."""
    from seg.predict import Predictor

    def predict_array(self, image, spacing=None, return_probabilities=False):
        return np.clip(np.rint((image[0].astype(float) - 10) / 40), 0, 2).astype(np.uint8), None

    monkeypatch.setattr(Predictor, "predict_array", predict_array)


def test_outputs_in_the_training_files_values(trained_checkpoint, tmp_path, monkeypatch) -> None:
    from seg.checkpoint import load_checkpoint, load_for_inference

    data, ckpt = trained_checkpoint
    assert load_checkpoint(ckpt)["label_values"] == [0, 1, 4]
    assert load_for_inference(ckpt).label_values == (0, 1, 4)
    images = sorted((data / "images").iterdir())
    assert infer_seg.main(["-i", *map(str, images), "-o", str(tmp_path / "model"), "-m", str(ckpt)]) == 0
    for img in images:  # the trained model itself: values of the training files only
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "model" / img.name))))) <= {0, 1, 4}
    _threshold_predictor(monkeypatch)
    out = tmp_path / "pred"
    assert infer_seg.main(["-i", *map(str, images), "-o", str(out), "-m", str(ckpt)]) == 0
    for img in images:  # class index 2 is written as the files' value 4
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / img.name)))
        assert set(np.unique(pred).tolist()) == {0, 1, 4}


def test_labels_evaluation_uses_the_same_mapping(trained_checkpoint, tmp_path, monkeypatch) -> None:
    data, ckpt = trained_checkpoint
    _threshold_predictor(monkeypatch)
    out = tmp_path / "pred"
    assert infer_seg.main(["-i", str(data / "images"), "-o", str(out), "-m", str(ckpt),
                           "--labels", str(data / "labels")]) == 0
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert list(summary["classes"]) == ["outer", "inner"]
    with open(out / "evaluation" / "metrics_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    for img in sorted((data / "images").iterdir()):
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / img.name)))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labels" / img.name)))
        name = img.name.split(".")[0]
        for cls, value in (("outer", 1), ("inner", 4)):
            row = next(r for r in rows if r["case"] == name and r["class"] == cls)
            expected = _dice(pred == value, ref == value)
            assert 0.3 < expected < 1.0  # a real, imperfect overlap: not a prediction against itself
            assert float(row["dice"]) == pytest.approx(expected, abs=1e-6)


def test_seg_nrrd_opens_as_named_segments_in_slicerio(trained_checkpoint, tmp_path, monkeypatch) -> None:
    """``--format seg.nrrd``: 3D Slicer's segmentation file, read back with ``slicerio`` (Slicer's
    own reader library): one segment per class with its name and the training files' label value
    (4, not the class index 2), extents that bound the voxels, voxels equal to the plain output's,
    and the geometry of the input (ijkToLPS against SimpleITK's index-to-physical transform)."""
    slicerio = pytest.importorskip("slicerio")
    data, ckpt = trained_checkpoint
    _threshold_predictor(monkeypatch)
    image = sorted((data / "images").iterdir())[0]
    plain, slicer = tmp_path / "plain", tmp_path / "slicer"
    assert infer_seg.main(["-i", str(image), "-o", str(plain), "-m", str(ckpt)]) == 0
    assert infer_seg.main(["-i", str(image), "-o", str(slicer), "-m", str(ckpt),
                           "--format", "seg.nrrd"]) == 0
    name = image.name.split(".")[0]
    seg = slicerio.read_segmentation(str(slicer / f"{name}.seg.nrrd"))
    assert [(s["name"], s["labelValue"], s["layer"]) for s in seg["segments"]] == \
        [("outer", 1, 0), ("inner", 4, 0)]
    ref = sitk.ReadImage(str(plain / image.name))
    ref_xyz = sitk.GetArrayFromImage(ref).transpose(2, 1, 0)  # slicerio's voxels are (i, j, k)
    np.testing.assert_array_equal(seg["voxels"], ref_xyz)
    for s in seg["segments"]:
        idx = np.argwhere(ref_xyz == s["labelValue"])
        assert s["extent"] == [int(v) for lo, hi in zip(idx.min(0), idx.max(0)) for v in (lo, hi)]
    src = sitk.ReadImage(str(image))
    for ijk in [(0, 0, 0), (3, 1, 2), tuple(n - 1 for n in src.GetSize())]:
        lps = seg["ijkToLPS"] @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(lps[:3], src.TransformIndexToPhysicalPoint(ijk), atol=1e-4)


def test_seg_nrrd_of_a_2d_image_is_a_one_line_error(tmp_path) -> None:
    from seg import io
    from seg.errors import UserError

    img = sitk.Image(6, 5, sitk.sitkUInt8)
    sitk.WriteImage(img, str(tmp_path / "a.nrrd"))
    _, meta = io.read_image(tmp_path / "a.nrrd")
    with pytest.raises(UserError, match="3D label map"):
        io.write_label(tmp_path / "a.seg.nrrd", np.zeros((6, 5), np.uint8), meta, 2, segments=[("x", 1)])
    assert not list(tmp_path.glob("*.seg.nrrd"))
