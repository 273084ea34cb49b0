"""Ensembles: infer_seg.py -m RUN against the mean of its models' own outputs, python -m seg.ensemble
from probability files, refusal of models that do not fit together, and the postprocessing a
cross-validation chose, found and applied."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import infer_seg
from helpers import captured
from seg import ensemble
from seg.errors import UserError

CASES = ("case0", "case3")


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _infer(crossval_run, out: Path, *args: str, cases=CASES) -> tuple[int, list[str], str]:
    images = [str(crossval_run["data"] / "images" / f"{c}.nii.gz") for c in cases]
    with captured("seg") as (messages, err):
        rc = infer_seg.main(["-i", *images, "-o", str(out), *args])
    return rc, messages, err.getvalue()


@pytest.fixture(scope="module")
def outputs(crossval_run, tmp_path_factory):
    """infer_seg.py outputs with probabilities: each fold model alone, and the cross-validation folder
    as an ensemble, without and with its postprocessing."""
    root, run = tmp_path_factory.mktemp("ensemble"), crossval_run["run"]
    out = {}
    for k in range(3):
        out[k] = _infer(crossval_run, root / f"fold{k}", "-m", str(run / f"fold_{k}" / "last.pt"),
                        "--save-probabilities", "--no-postprocessing")
    out["ensemble"] = _infer(crossval_run, root / "ens", "-m", str(run), "--save-probabilities", "--no-postprocessing")
    out["postprocessed"] = _infer(crossval_run, root / "pp", "-m", str(run))
    assert all(rc == 0 for rc, _, _ in out.values()), out
    return root


def test_the_ensemble_is_the_mean_of_its_models(outputs, crossval_run) -> None:
    for case in CASES:
        singles = [_array(outputs / f"fold{k}" / "probabilities" / f"{case}.nii.gz") for k in range(3)]
        mean = _array(outputs / "ens" / "probabilities" / f"{case}.nii.gz")
        np.testing.assert_allclose(mean, np.mean(singles, axis=0), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(_array(outputs / "ens" / f"{case}.nii.gz"), mean.argmax(-1))  # values 0, 1, 2
    classes = json.loads((outputs / "ens" / "probabilities" / "classes.json").read_text())
    assert classes == {"class_names": ["bg", "outer", "inner"], "label_values": [0, 1, 2]}


def test_the_cross_validation_s_postprocessing_is_applied(outputs, crossval_run) -> None:
    from seg.postprocess import read_postprocessing

    path = crossval_run["run"] / "crossval" / "postprocessing.json"
    pp = read_postprocessing(path)
    for case in CASES:
        raw = _array(outputs / "ens" / f"{case}.nii.gz")
        np.testing.assert_array_equal(_array(outputs / "pp" / f"{case}.nii.gz"), pp.apply(raw))


def test_seg_ensemble_from_files_equals_infer_seg(outputs, crossval_run) -> None:
    folders = [str(outputs / f"fold{k}" / "probabilities") for k in range(3)]
    pp = str(crossval_run["run"] / "crossval" / "postprocessing.json")
    for out, extra, expected in (("files", [], "ens"), ("files_pp", ["--postprocessing", pp], "pp")):
        with captured("seg") as (messages, _):
            assert ensemble.main([*folders, "-o", str(outputs / out), "--no-progress", *extra]) == 0
        assert sum("with 3 models" in m for m in messages) == len(CASES)
        for case in CASES:
            np.testing.assert_array_equal(_array(outputs / out / f"{case}.nii.gz"),
                                          _array(outputs / expected / f"{case}.nii.gz"))
    with captured("seg") as (_, err):  # folders of other cases
        assert ensemble.main([folders[0], str(outputs / "ens"), "-o", str(outputs / "x")]) == 2
    assert "cannot ensemble" in err.getvalue()


def test_each_model_mirrors_before_the_mean(crossval_run, tmp_path: Path) -> None:
    run = crossval_run["run"]
    models = [str(run / f"fold_{k}" / "last.pt") for k in (0, 2)]
    singles = []
    for i, model in enumerate(models):
        assert _infer(crossval_run, tmp_path / str(i), "-m", model, "--tta", "--save-probabilities",
                      cases=CASES[:1])[0] == 0
        singles.append(_array(tmp_path / str(i) / "probabilities" / f"{CASES[0]}.nii.gz"))
    rc, messages, _ = _infer(crossval_run, tmp_path / "ens", "-m", *models, "--tta", "--save-probabilities",
                             cases=CASES[:1])
    assert rc == 0 and any(m.startswith(f"{CASES[0]}.nii.gz: ") and "with 2 models" in m for m in messages)
    mean = _array(tmp_path / "ens" / "probabilities" / f"{CASES[0]}.nii.gz")
    np.testing.assert_allclose(mean, np.mean(singles, axis=0), rtol=0, atol=1e-5)


def test_models_that_do_not_fit_together_are_refused(crossval_run, tmp_path: Path, capsys) -> None:
    run = crossval_run["run"]
    other = tmp_path / "other.pt"
    ckpt = torch.load(run / "fold_1" / "last.pt", weights_only=True)
    torch.save({**ckpt, "label_values": [0, 1, 4]}, other)
    assert infer_seg.main(["-i", str(crossval_run["data"] / "images" / "case0.nii.gz"), "-o", str(tmp_path / "o"),
                           "-m", str(run / "fold_0" / "last.pt"), str(other)]) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and str(run / "fold_0" / "last.pt") in lines[0] and str(other) in lines[0]
    assert "label values differ ((0, 1, 2) and (0, 1, 4))" in lines[0] and not (tmp_path / "o").exists()
    base = dict(class_names=["bg", "a"], in_channels=1, label_values=(0, 1), spatial_dims=3)
    for field, value, what in (("class_names", ["bg", "b"], "class names"), ("spatial_dims", 2, "spatial dims"),
                               ("in_channels", 2, "input channels")):
        fake = [SimpleNamespace(bundle=SimpleNamespace(**b), **b) for b in (base, {**base, field: value})]
        with pytest.raises(UserError, match=f"cannot ensemble m0 and m1: their {what} differ"):
            ensemble.check_compatible(fake, ["m0", "m1"])


def test_where_the_postprocessing_is_found(crossval_run, tmp_path: Path, monkeypatch) -> None:
    """RUN/fold_<k>/X.pt takes RUN/crossval/postprocessing.json, DIR/X.pt DIR/crossval/'s; models of two
    cross-validations get none; --no-postprocessing and --postprocessing decide."""
    from seg.postprocess import Postprocessing, postprocessing_file
    from seg.predict import Predictor

    run = crossval_run["run"]
    mine = tmp_path / "cv"
    (mine / "fold_0").mkdir(parents=True)
    shutil.copy(run / "fold_0" / "last.pt", mine / "fold_0" / "last.pt")
    (mine / "crossval").mkdir()
    (mine / "crossval" / "postprocessing.json").write_text(
        '{"keep_largest_foreground": false, "keep_largest_labels": [1, 2]}')
    assert postprocessing_file(mine / "fold_0" / "last.pt") == mine / "crossval" / "postprocessing.json"
    assert postprocessing_file(run / "fold_2" / "best.pt") == run / "crossval" / "postprocessing.json"
    assert postprocessing_file(mine / "fold_0") is None and postprocessing_file(tmp_path / "x.pt") is None

    def noisy_threshold(self, image, spacing=None, return_probabilities=False):  # speckled: many components
        noisy = image[0] + np.random.default_rng(0).normal(0, 12, image.shape[1:])
        return np.clip(np.rint((noisy - 10) / 40), 0, 2).astype(np.uint8), None

    monkeypatch.setattr(Predictor, "predict_array", noisy_threshold)
    rc, messages, _ = _infer(crossval_run, tmp_path / "pp", "-m", str(mine / "fold_0" / "last.pt"), cases=CASES[:1])
    assert rc == 0 and any(m.startswith(f"postprocessing from {mine / 'crossval'}") for m in messages)
    rc, messages, _ = _infer(crossval_run, tmp_path / "raw", "-m", str(mine), "--no-postprocessing", cases=CASES[:1])
    assert rc == 0 and not any("postprocessing" in m for m in messages)
    raw, done = (_array(tmp_path / d / f"{CASES[0]}.nii.gz") for d in ("raw", "pp"))
    assert (raw != done).any()
    np.testing.assert_array_equal(done, Postprocessing(False, (1, 2)).apply(raw))
    rc, messages, _ = _infer(crossval_run, tmp_path / "two", "-m", str(mine / "fold_0" / "last.pt"),
                             str(run / "fold_1" / "last.pt"), cases=CASES[:1])
    assert rc == 0 and any("different cross-validations" in m for m in messages)
    (tmp_path / "bad.json").write_text('{"keep_largest_foreground": true, "keep_largest_labels": [9]}')
    rc, _, err = _infer(crossval_run, tmp_path / "bad", "-m", str(mine), "--postprocessing",
                        str(tmp_path / "bad.json"), cases=CASES[:1])
    assert rc == 2 and f"error: {tmp_path / 'bad.json'}: keeps the largest component of label value(s) [9]" in err
