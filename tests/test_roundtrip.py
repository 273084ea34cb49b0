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
