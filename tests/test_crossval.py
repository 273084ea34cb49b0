"""Cross-validation: data.fold=all, its failures and its continuation, the summary against metrics
recomputed by hand, and the postprocessing rule on hand-made cases."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hparam import Config
from seg.config import apply_overrides
from seg.errors import ConfigError, DataError, UserError


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ----------------------------------------------------------------------------- the configuration
def test_fold_is_an_index_or_all() -> None:
    for text, value in (("all", "all"), ("2", 2)):
        cfg = apply_overrides(Config(), [f"data.fold={text}"])
        assert cfg.data.fold == value
        cfg.validate()
    for bad in ("al", "-1", "True"):
        with pytest.raises(ConfigError, match="data.fold must be an integer >= 0 or 'all'"):
            apply_overrides(Config(), [f"data.fold={bad}"]).validate()


def test_five_seeded_folds_without_a_split_file() -> None:
    from datasets import kfold_split

    names = [f"c{i:02d}" for i in range(12)]
    folds = kfold_split(names, seed=0)
    assert len(folds) == 5 and [len(f["val"]) for f in folds] == [3, 3, 2, 2, 2]
    assert sorted(n for f in folds for n in f["val"]) == names  # every case validated once
    for f in folds:
        assert sorted(f["train"] + f["val"]) == names and not set(f["train"]) & set(f["val"])
    assert kfold_split(names[::-1], seed=0) == folds  # the names decide, not their order
    assert kfold_split(names, seed=1) != folds
    assert len(kfold_split(names[:3], seed=0)) == 3
    with pytest.raises(UserError, match="at least 2"):
        kfold_split(names[:1], seed=0)


def test_fold_all_is_refused_where_there_are_no_folds(tmp_path: Path) -> None:
    from helpers import tiny_config, write_case
    from seg.crossval import fold_split
    from seg.train import find_data

    write_case(tmp_path / "ds", "a", np.random.default_rng(0))
    (tmp_path / "ds" / "imagesVal").mkdir()
    cfg = tiny_config(tmp_path / "ds", tmp_path / "run", 3)
    cfg.data.val_images_dir, cfg.data.fold = "imagesVal", "all"
    with pytest.raises(ConfigError, match="validation folders exist"):
        fold_split(cfg)
    cfg.data.val_images_dir = None
    with pytest.raises(ConfigError, match="this step works on one fold"):  # --plan-only, train(): one fold
        find_data(cfg)


# ----------------------------------------------------------------------------- data.fold=all
def test_a_failing_fold_names_itself_and_the_others_finish(crossval_run) -> None:
    from seg.checkpoint import load_for_inference

    first, run = crossval_run["steps"]["first"], crossval_run["run"]
    assert first["rc"] == 2 and "Traceback" not in first["stderr"]
    failed = [m for m in first["log"] if "failed" in m]
    assert failed[0].startswith("fold 3/3 (fold_2) failed: ") and "bad.nii.gz" in failed[0]
    assert "\n" not in failed[0] and "fold_2" in failed[1] and "no summary" in failed[1]
    assert [m for m in first["log"] if m.startswith("fold ")][:3] == [
        f"fold {k + 1}/3: {run / f'fold_{k}'}" for k in range(3)]
    for k in (0, 1):  # the finished folds are usable
        assert load_for_inference(run / f"fold_{k}" / "last.pt").class_names == ["bg", "outer", "inner"]
    assert not first["summary"]


def test_unfinished_folds_are_named(crossval_run) -> None:
    steps = crossval_run["steps"]
    errors = [l for l in steps["unfinished"]["stderr"].splitlines() if l.startswith("error:")]
    assert steps["unfinished"]["rc"] == 2 and len(errors) == 1
    assert "fold_2: no last.pt" in errors[0] and "--finished-only" in errors[0]
    summary = steps["finished_only"]["summary"]
    assert steps["finished_only"]["rc"] == 0
    assert summary["crossval"]["folds"] == [0, 1] and summary["n_cases"] == 4
    assert summary["crossval"]["unfinished"] == {"fold_2": "no last.pt"}
    assert "only the finished folds (2 of 3)" in summary["crossval"]["note"]


def test_running_again_continues(crossval_run) -> None:
    steps, run = crossval_run["steps"], crossval_run["run"]
    again = steps["again"]
    assert again["rc"] == 0, again["stderr"]
    assert [m for m in again["log"] if "skipped" in m] == [f"fold_{k}: finished (iteration 2), skipped"
                                                           for k in (0, 1)]
    for k in (0, 1):
        assert (run / f"fold_{k}" / "last.pt").stat().st_mtime_ns == steps["first"]["mtimes"][k]
    summary = json.loads((run / "crossval" / "summary.json").read_text())
    assert summary["crossval"]["folds"] == [0, 1, 2] and summary["n_cases"] == 6
    assert summary["crossval"]["note"] == "" and (run / "crossval" / "postprocessing.json").is_file()
    assert (run / "crossval" / "index.html").is_file() and list((run / "crossval" / "cases").glob("*.png"))
    # another request into the folder is refused; the folds stay
    import train_seg
    from helpers import captured

    with captured("seg") as (_, err):
        assert train_seg.main(["--no-progress", "--set", *crossval_run["sets"], "train.lr=0.01"]) == 2
    assert "it differs in train.lr" in err.getvalue() and str(run) in err.getvalue()


def test_a_fold_is_the_run_of_data_fold_k(crossval_run, tmp_path: Path) -> None:
    """fold_1 of data.fold=all has the weights of a data.fold=1 run, and resumes as one."""
    from helpers import tiny_config
    from seg.checkpoint import load_checkpoint, resume_config
    from seg.train import train

    run = crossval_run["run"]
    cfg = tiny_config(crossval_run["data"], tmp_path / "fold1", 3, iterations=2)
    cfg.data.split_file, cfg.data.fold = "splits.json", 1
    alone = load_checkpoint(train(cfg, progress=False).output_dir / "last.pt")
    fold = load_checkpoint(run / "fold_1" / "last.pt")
    assert fold["config"]["data"]["fold"] == 1 and fold["config"]["data"]["split_file"] == "splits.json"
    for k in alone["model"]:
        torch.testing.assert_close(fold["model"][k], alone["model"][k], rtol=0, atol=0, msg=k)
    resumed, _ = resume_config(Config(), str(run / "fold_1" / "last.pt"), ["train.iterations=3"])
    assert resumed.train.output_dir == str(run / "fold_1") and resumed.data.fold == 1


def test_each_fold_is_skipped_resumed_or_trained(crossval_run, tmp_path: Path, monkeypatch) -> None:
    """A fold at its final iteration is skipped, one stopped before (train.max_minutes, an interrupted
    run) resumes from its last.pt with its own configuration, one without last.pt trains."""
    from helpers import tiny_config
    from seg import crossval

    calls = []
    monkeypatch.setattr(crossval, "train", lambda cfg, **kw: calls.append((cfg, kw)))
    ckpt = torch.load(crossval_run["run"] / "fold_0" / "last.pt", weights_only=True)
    for k, iteration in ((0, 2), (1, 1)):
        (tmp_path / f"fold_{k}").mkdir()
        torch.save({**ckpt, "iteration": iteration}, tmp_path / f"fold_{k}" / "last.pt")
    cfg = tiny_config(crossval_run["data"], tmp_path, 3, iterations=2)
    cfg.data.split_file = "splits.json"
    for k in range(3):
        crossval.train_fold(cfg, None, k)
    (resumed, how), (fresh, new) = calls
    assert how["resume"] == str(tmp_path / "fold_1" / "last.pt")
    assert resumed.data.fold == 0  # the checkpoint's own configuration (fold_0's, copied there), not the request
    assert resumed.train.output_dir == str(tmp_path / "fold_1")
    assert (fresh.data.fold, fresh.train.output_dir, new["overwrite"]) == (2, str(tmp_path / "fold_2"), True)
    assert cfg.data.fold == 0 and cfg.train.output_dir == str(tmp_path)  # the request is left alone


# ----------------------------------------------------------------------------- the summary
def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    total = pred.sum() + ref.sum()
    return float("nan") if total == 0 else 2.0 * np.logical_and(pred, ref).sum() / total


def test_summary_equals_metrics_recomputed_by_hand(crossval_run, tmp_path: Path) -> None:
    """Dice by hand (NumPy) and HD95 by MONAI from the summary's own label maps; each fold's maps are
    what infer_seg.py writes with that fold's last.pt."""
    import infer_seg

    data, run, folds = crossval_run["data"], crossval_run["run"], crossval_run["folds"]
    crossval = run / "crossval"
    summary = json.loads((crossval / "summary.json").read_text())
    with open(crossval / "metrics_per_case.csv") as f:
        rows = {(r["case"], r["class"]): r for r in csv.DictReader(f)}
    hand = {}
    for case in summary["cases"]:
        pred, ref = _array(crossval / "predictions" / f"{case}.nii.gz"), _array(data / "labels" / f"{case}.nii.gz")
        for value, name in ((1, "outer"), (2, "inner")):
            hand[case, name] = _dice(pred == value, ref == value)
            assert float(rows[case, name]["dice"]) == pytest.approx(hand[case, name], abs=1e-5)
    for name in ("outer", "inner"):
        values = [hand[c, name] for c in summary["cases"]]
        assert summary["classes"][name]["dice"]["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert summary["classes"][name]["dice"]["std"] == pytest.approx(np.std(values), abs=1e-12)
        for k, fold in enumerate(folds):
            per_fold = summary["groups"][f"fold_{k}"][name]["dice"]
            assert per_fold["mean"] == pytest.approx(np.mean([hand[c, name] for c in fold["val"]]), abs=1e-12)
    monai = pytest.importorskip("monai.metrics")
    pred, ref = _array(crossval / "predictions" / "case4.nii.gz"), _array(data / "labels" / "case4.nii.gz")
    one_hot = [torch.from_numpy(np.stack([a == 1, a == 2]))[None] for a in (pred, ref)]  # (1, 2, Z, Y, X)
    hd95 = monai.compute_hausdorff_distance(*one_hot, include_background=True, percentile=95,
                                           spacing=(1.5, 1.0, 1.2))[0]
    for i, name in enumerate(("outer", "inner")):
        assert float(rows["case4", name]["hd95"]) == pytest.approx(float(hd95[i]), rel=1e-5)
    out = tmp_path / "fold0"
    images = [str(data / "images" / f"{c}.nii.gz") for c in folds[0]["val"]]
    assert infer_seg.main(["-i", *images, "-o", str(out), "-m", str(run / "fold_0" / "last.pt"),
                           "--no-postprocessing"]) == 0
    for case in folds[0]["val"]:
        np.testing.assert_array_equal(_array(out / f"{case}.nii.gz"),
                                      _array(crossval / "predictions" / f"{case}.nii.gz"))


def test_postprocessing_record_follows_the_rule(crossval_run) -> None:
    crossval = crossval_run["run"] / "crossval"
    summary = json.loads((crossval / "summary.json").read_text())
    record = json.loads((crossval / "postprocessing.json").read_text())
    classes = record["classes"]
    for name, entry in classes.items():
        assert entry["dice_before"] == pytest.approx(summary["classes"][name]["dice"]["mean"], abs=1e-12)
    fg = record["foreground"]
    assert fg["mean_dice_before"] == pytest.approx(np.mean([c["dice_before"] for c in classes.values()]))
    assert record["keep_largest_foreground"] == (fg["mean_dice_after"] > fg["mean_dice_before"] and all(
        c["dice_after_foreground_step"] >= c["dice_before"] for c in classes.values()))
    base = "dice_after_foreground_step" if record["keep_largest_foreground"] else "dice_before"
    assert record["keep_largest_labels"] == [c["label"] for c in classes.values()
                                             if c["dice_after_class_step"] > c[base]]
    assert record["folds"] == [0, 1, 2] and record["n_cases"] == 6


# ----------------------------------------------------------------------------- the postprocessing rule
def test_largest_component_has_full_connectivity_in_2d_and_3d() -> None:
    from seg.postprocess import keep_largest, largest_component

    plane = np.zeros((6, 6), bool)
    plane[0, 0] = plane[1, 1] = plane[2, 2] = True  # touching by corners: one component of 3
    plane[4:6, 4] = True                            # 2 apart
    np.testing.assert_array_equal(largest_component(plane), plane & (np.arange(6)[:, None] < 3))
    volume = np.zeros((4, 4, 4), bool)
    volume[0, 0, 0] = volume[1, 1, 1] = True  # corners in 3D
    volume[3, 3, 0] = True
    assert largest_component(volume).sum() == 2 and not largest_component(volume)[3, 3, 0]
    ties = np.zeros((5, 5), bool)
    ties[0, 0] = ties[4, 4] = True
    np.testing.assert_array_equal(largest_component(ties), ties)  # equal, largest sizes: all kept (nnU-Net)
    labels = np.array([[1, 1, 0, 2], [0, 0, 0, 2], [4, 0, 0, 0]])
    np.testing.assert_array_equal(keep_largest(labels), [[1, 1, 0, 2], [0, 0, 0, 2], [0, 0, 0, 0]])
    np.testing.assert_array_equal(keep_largest(labels, (1, 4)), [[1, 1, 0, 2], [0, 0, 0, 2], [0, 0, 0, 0]])
    np.testing.assert_array_equal(keep_largest(labels, (4,)), labels)


def _case(objects: list[tuple[int, slice, slice]], shape=(24, 24)) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    for value, rows, cols in objects:
        out[rows, cols] = value
    return out


def _decided(cases: list[tuple[np.ndarray, np.ndarray]]):
    from seg.postprocess import case_dice, decide

    return decide([case_dice(pred, ref, (1, 2)) for pred, ref in cases], (1, 2), ("a", "b"))


def test_the_rule_adopts_only_what_raises_the_dice() -> None:
    """Hand-made cases (2D, labels 1 and 2), each step adopted where it must and nowhere else."""
    a, b = (1, slice(2, 7), slice(2, 7)), (2, slice(12, 15), slice(12, 15))  # two separate objects
    stray_a, stray_b = (1, slice(20, 22), slice(2, 4)), (2, slice(20, 22), slice(20, 22))
    ref = _case([a, b])
    # a stray blob of class 1: the foreground step would also remove object b (class b falls), so it
    # is refused; class 1's own step removes the stray blob only and is adopted; class 2 ties
    pp, record = _decided([(_case([a, b, stray_a]), ref)])
    assert (pp.foreground, pp.labels) == (False, (1,))
    assert record["classes"]["b"]["dice_after_foreground_step"] == 0 and not record["foreground"]["adopted"]
    np.testing.assert_array_equal(pp.apply(_case([a, b, stray_a])), ref)
    # one object of both classes (touching) and a stray blob of class 2: the foreground step raises
    # class 2 and lowers nothing, so it is adopted; on top of it class 2's own step ties: not adopted
    touching = _case([(1, slice(2, 7), slice(2, 7)), (2, slice(7, 9), slice(2, 7))])
    pred = touching.copy()
    pred[20:22, 20:22] = 2
    pp, record = _decided([(pred, touching)])
    assert (pp.foreground, pp.labels) == (True, ())
    assert record["classes"]["b"]["dice_after"] > record["classes"]["b"]["dice_before"]
    np.testing.assert_array_equal(pp.apply(pred), touching)
    # the reference itself has two objects of class 1: keeping one lowers the Dice: nothing adopted
    two = _case([a, (1, slice(14, 18), slice(2, 6)), b])
    assert _decided([(two, two)])[0] == type(pp)()
    # ties (nothing to remove) adopt nothing, and neither does a step that helps one case and harms
    # another as much
    assert _decided([(ref, ref)])[0] == type(pp)()
    harm = _case([a, (1, slice(20, 23), slice(2, 5)), b])  # a second true object of 9 voxels
    pp, record = _decided([(_case([a, b, (1, slice(20, 23), slice(2, 5))]), ref), (harm, harm)])
    assert record["classes"]["a"]["dice_after_class_step"] == record["classes"]["a"]["dice_before"]
    assert pp == type(pp)()


def test_a_postprocessing_file_is_checked(tmp_path: Path) -> None:
    from seg.postprocess import Postprocessing, read_postprocessing

    path = tmp_path / "postprocessing.json"
    for text in ('{"keep_largest_foreground": 1, "keep_largest_labels": []}',
                 '{"keep_largest_foreground": true, "keep_largest_labels": [0]}', "[]", "{"):
        path.write_text(text)
        with pytest.raises(DataError, match=str(path)):
            read_postprocessing(path)
    path.write_text('{"keep_largest_foreground": false, "keep_largest_labels": [2, 1]}')
    assert read_postprocessing(path) == Postprocessing(False, (2, 1), str(path))


def test_a_fold_with_a_relative_data_root_is_the_same_split(crossval_run, tmp_path: Path) -> None:
    """Runs from before checkpoints stored absolute paths hold data.root relative to the repository:
    the summary resolves it as training does, so such a fold joins folds that store it absolute."""
    import os
    import shutil

    from seg.config import DEFAULT_CONFIG
    from seg.crossval import folds_of
    from seg.files import torch_save_atomic

    run = tmp_path / "run"
    shutil.copytree(crossval_run["run"], run, ignore=shutil.ignore_patterns("crossval", "tensorboard"))
    path = run / "fold_0" / "last.pt"
    ckpt = torch.load(path, weights_only=False)
    absolute = ckpt["config"]["data"]["root"]
    ckpt["config"]["data"]["root"] = os.path.relpath(absolute, DEFAULT_CONFIG.parent)
    torch_save_atomic(ckpt, path)
    folds, split = folds_of(run)
    assert split == (Path(absolute) / "splits.json").resolve()
    assert folds[0].data("labels_dir") == folds[1].data("labels_dir")
