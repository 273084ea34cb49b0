"""End-to-end folder evaluation on tiny synthetic .nii.gz / .nrrd files."""
from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from seg import metrics as M
from seg.errors import DataError
from seg.evaluate import evaluate_folders, main

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, arr_xyz: np.ndarray, spacing, origin=None, direction=None) -> None:
    img = sitk.GetImageFromArray(arr_xyz.transpose(tuple(range(arr_xyz.ndim))[::-1]))
    img.SetSpacing(spacing)
    if origin is not None:
        img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def _cases():
    """Two 3D cases (X, Y, Z) with labels 1 and 2, and one 2D case with label 1 only."""
    shape = (23, 19, 9)
    ref_a = np.zeros(shape, np.uint8)
    ref_a[4:14, 5:15, 2:7] = 1
    ref_a[15:20, 3:9, 3:6] = 2
    pred_a = np.roll(ref_a, 2, axis=0)
    ref_b = np.zeros(shape, np.uint8)
    ref_b[6:16, 4:12, 1:8] = 1
    pred_b = ref_b.copy()
    pred_b[6:9, 4:12, 1:8] = 0
    ref_c = np.zeros((17, 13), np.uint8)
    ref_c[3:11, 2:9] = 1
    pred_c = np.zeros_like(ref_c)
    pred_c[4:12, 2:10] = 1
    return {"case_a": (pred_a, ref_a, (0.8, 0.9, 2.5), ".nii.gz"),
            "case_b": (pred_b, ref_b, (0.8, 0.9, 2.5), ".nrrd"),
            "case_c": (pred_c, ref_c, (0.7, 1.1), ".nrrd")}


@pytest.fixture()
def folders(tmp_path):
    for name, (pred, ref, spacing, ext) in _cases().items():
        _write(tmp_path / "pred" / f"{name}{ext}", pred, spacing)
        _write(tmp_path / "label" / f"{name}{ext}", ref, spacing)
        _write(tmp_path / "image" / f"{name}_0000{ext}", ref.astype(np.float32) * 100 + 5, spacing)
    return tmp_path


def test_end_to_end(folders):
    out = folders / "report"
    summary = evaluate_folders(folders / "pred", folders / "label", out, image_dir=folders / "image",
                               class_names=["organ", "lesion"], progress=False, tolerance_mm=1.0)
    # CSV: every case x class, values equal to evaluate_case on the arrays
    rows = list(csv.DictReader(open(out / "metrics_per_case.csv")))
    assert [(r["case"], r["class"]) for r in rows] == [
        (c, k) for c in ("case_a", "case_b", "case_c") for k in ("organ", "lesion")]
    expected = {}
    for name, (pred, ref, spacing, _) in _cases().items():
        res = M.evaluate_case(pred, ref, spacing, [1, 2], tolerance_mm=1.0)
        expected[name] = res
        for lab, cls in ((1, "organ"), (2, "lesion")):
            row = next(r for r in rows if r["case"] == name and r["class"] == cls)
            for metric in M.DEFAULT_METRICS:
                np.testing.assert_allclose(float(row[metric]), res[lab][metric], rtol=1e-5)
    assert rows[-1]["dice"] == "nan"  # lesion absent from case_c: both empty
    # JSON: NaN-aware mean / median per class and metric
    loaded = json.loads((out / "summary.json").read_text())
    assert loaded == json.loads(json.dumps(summary))
    assert loaded["n_cases"] == 3 and loaded["options"]["tolerance_mm"] == 1.0
    dices = [expected[c][1]["dice"] for c in expected]
    assert loaded["classes"]["organ"]["dice"]["mean"] == pytest.approx(np.mean(dices))
    assert loaded["classes"]["organ"]["dice"]["median"] == pytest.approx(np.median(dices))
    assert loaded["classes"]["lesion"]["hd95"]["n"] == 1
    # HTML: relative links that resolve, no external assets
    page = (out / "index.html").read_text()
    links = re.findall(r'(?:href|src)="([^"]+)"', page)
    assert {"metrics_per_case.csv", "summary.json", "boxplot_hd95.png", "cases/case_a.png"} <= set(links)
    for link in links:
        assert "://" not in link and not link.startswith("/")
        assert (out / link).is_file(), link
    assert not list(out.rglob("*.tmp"))  # atomic writes left no temporaries


def test_geometry_mismatch(folders, capsys):
    pred, ref, spacing, _ = _cases()["case_b"]
    _write(folders / "pred" / "case_b.nrrd", pred, spacing, origin=(0.0, 0.0, 1.0))
    with pytest.raises(DataError) as e:
        evaluate_folders(folders / "pred", folders / "label", folders / "r", progress=False, pictures=False)
    msg = str(e.value)
    assert "\n" not in msg and "origin" in msg
    assert "pred/case_b.nrrd" in msg and "label/case_b.nrrd" in msg
    rc = main(["--pred", str(folders / "pred"), "--label", str(folders / "label"), "-o", str(folders / "r")])
    assert rc == 2 and "origin" in capsys.readouterr().err


def test_bad_input_exit_status(folders, capsys):
    (folders / "pred" / "case_a.nii.gz").unlink()
    args = ["--pred", str(folders / "pred"), "--label", str(folders / "label"), "-o", str(folders / "r")]
    assert main(args) == 2 and "no prediction" in capsys.readouterr().err
    assert main(args[:-2] + ["-o", str(folders / "r"), "--metrics", "hd96"]) == 2
    assert "hd95" in capsys.readouterr().err


def test_cli_module(folders):
    """The real command line (python -m seg.evaluate), spacing read from the files."""
    out = folders / "cli"
    proc = subprocess.run([sys.executable, "-m", "seg.evaluate", "--pred", str(folders / "pred"),
                           "--label", str(folders / "label"), "-o", str(out), "--no-pictures",
                           "--metrics", "dice", "hd95"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"] == ["dice", "hd95"]
    pred, ref, spacing, _ = _cases()["case_a"]
    row = next(csv.DictReader(open(out / "metrics_per_case.csv")))
    assert math.isclose(float(row["hd95"]), M.hd95(pred == 1, ref == 1, spacing), rel_tol=1e-5)


def test_report_opens_in_headless_chromium(folders, tmp_path):
    """The HTML report loads in a real browser with no console errors (skipped without Chromium,
    except in CI, whose .ci/run installs it: there a missing browser fails the test)."""
    import os

    from browser_check import check_page, find_chromium

    if find_chromium() is None and not os.environ.get("CI"):
        pytest.skip("Chromium not installed (apt-get install chromium)")
    out = folders / "report"
    evaluate_folders(folders / "pred", folders / "label", out, image_dir=folders / "image", progress=False)
    shot = tmp_path / "page.png"
    assert check_page(out / "index.html", shot) == []
    assert shot.stat().st_size > 10_000  # a real rendering, not a blank page
    # the check can fail: a page with a missing picture reports it
    broken = out / "broken.html"
    broken.write_text('<html><body><img src="missing.png"><script>undefined_fn()</script></body></html>')
    assert check_page(broken)


def test_png_label_folder(tmp_path, capsys):
    """PNG label maps (and predictions) are read like every other format."""
    pred, ref, _, _ = _cases()["case_c"]
    for sub, arr in (("pred", pred), ("label", ref)):
        _write(tmp_path / sub / "slide1.png", arr, (1.0, 1.0))
    out = tmp_path / "report"
    assert main(["--pred", str(tmp_path / "pred"), "--label", str(tmp_path / "label"), "-o", str(out),
                 "--no-pictures", "--metrics", "dice"]) == 0, capsys.readouterr().err
    row = next(csv.DictReader(open(out / "metrics_per_case.csv")))
    assert row["case"] == "slide1"
    assert float(row["dice"]) == pytest.approx(M.evaluate_case(pred, ref, (1.0, 1.0), [1])[1]["dice"])


def test_a_pair_that_trains_also_evaluates(tmp_path):
    """One geometry tolerance: origin off by 1 % of a voxel and spacing off by a relative 1e-4 pass
    the training check and the evaluation; 10 % of a voxel fails both."""
    import datasets as ds

    pred, ref, spacing, _ = _cases()["case_a"]
    near = tuple(s * (1 + 1e-4) for s in spacing)
    for off, ok in ((0.01, True), (0.1, False)):
        origin = (off * min(spacing), 0.0, 0.0)
        _write(tmp_path / "label" / "a.nrrd", ref, spacing, origin=(0.0, 0.0, 0.0))
        _write(tmp_path / "pred" / "a.nrrd", pred, near, origin=origin)
        _write(tmp_path / "image" / "a.nrrd", ref.astype(np.float32), near, origin=origin)
        case = ds.Case("a", (tmp_path / "image" / "a.nrrd",), tmp_path / "label" / "a.nrrd")
        if ok:
            ds.check_case(case, 3)
            summary = evaluate_folders(tmp_path / "pred", tmp_path / "label", tmp_path / "r", pictures=False,
                                       progress=False)
            assert summary["n_cases"] == 1
            continue
        with pytest.raises(DataError, match="a.nrrd: label map geometry differs from its image .*origin"):
            ds.check_case(case, 3)
        with pytest.raises(DataError, match="pred/a.nrrd: prediction geometry differs from its label map .*origin"):
            evaluate_folders(tmp_path / "pred", tmp_path / "label", tmp_path / "r", pictures=False, progress=False)
