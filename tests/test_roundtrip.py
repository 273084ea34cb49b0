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


def test_outputs_in_the_training_files_values(trained_checkpoint, tmp_path) -> None:
    from seg.checkpoint import load_checkpoint, load_for_inference

    data, ckpt = trained_checkpoint
    assert load_checkpoint(ckpt)["label_values"] == [0, 1, 4]
    assert load_for_inference(ckpt).label_values == (0, 1, 4)
    out = tmp_path / "pred"
    images = sorted((data / "images").iterdir())
    assert infer_seg.main(["-i", *map(str, images), "-o", str(out), "-m", str(ckpt)]) == 0
    values = set()
    for img in images:
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / img.name)))
        values |= set(np.unique(pred).tolist())
    assert values <= {0, 1, 4} and 2 not in values and 4 in values


def test_labels_evaluation_uses_the_same_mapping(trained_checkpoint, tmp_path) -> None:
    data, ckpt = trained_checkpoint
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
            assert float(row["dice"]) == pytest.approx(_dice(pred == value, ref == value), abs=1e-6)
