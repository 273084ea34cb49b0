"""Shared test set-up: no network at albumentations import, repository root importable."""
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    """(data folder, checkpoint) of a real 4-iteration 3D training run (seg.train.train) on synthetic
    cases labelled {0, 1, 4}, trained with ``data.label_remap={4: 2}``: classes bg, outer, inner."""
    import numpy as np
    import SimpleITK as sitk

    from seg.train import train
    from helpers import tiny_config, write_case

    root = tmp_path_factory.mktemp("trained")
    rng = np.random.default_rng(2)
    for i in range(4):
        write_case(root / "ds", f"case{i}", rng)
        path = root / "ds" / "labels" / f"case{i}.nii.gz"
        lab = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(lab)
        arr[arr == 2] = 4
        new = sitk.GetImageFromArray(arr)
        new.CopyInformation(lab)
        sitk.WriteImage(new, str(path))
    cfg = tiny_config(root / "ds", root / "run", 3, iterations=4)
    cfg.data.label_remap = {4: 2}
    result = train(cfg, progress=False)
    return root / "ds", result.output_dir / "last.pt"


@pytest.fixture(scope="session")
def crossval_run(tmp_path_factory):
    """A 3-fold cross-validation of six synthetic 3D cases, trained by ``train_seg.py --set
    data.fold=all`` (2 iterations a fold), whose fold 2 first fails (a bad label map among its training
    cases) and is trained when the command runs again once the file is fixed.

    Returns a dict: ``data``, ``run`` (folders), ``sets`` (the --set items), ``folds`` (the split) and
    ``steps``: for each step (``first``, ``unfinished``: ``seg.crossval`` then, ``finished_only``,
    ``again``) its exit status, log messages of ``seg`` and stderr; and what the files were between.
    """
    import json

    import numpy as np
    import SimpleITK as sitk

    import train_seg
    from helpers import captured, tiny_sets, write_case
    from seg import crossval

    root = tmp_path_factory.mktemp("crossval")
    data, run = root / "ds", root / "run"
    rng = np.random.default_rng(3)
    for name in [f"case{i}" for i in range(6)] + ["bad"]:
        write_case(data, name, rng)
    bad = data / "labels" / "bad.nii.gz"
    good = bad.read_bytes()
    label = sitk.ReadImage(str(bad))
    wrong = sitk.GetImageFromArray(np.where(sitk.GetArrayFromImage(label) == 2, 7, 0).astype(np.uint8))
    wrong.CopyInformation(label)
    sitk.WriteImage(wrong, str(bad))  # a label value no class has: fold 2 stops on it
    val = [["case0", "case1"], ["case2", "case3"], ["case4", "case5"]]
    folds = [{"train": [f"case{i}" for i in range(6) if f"case{i}" not in v] + (["bad"] if k == 2 else []),
              "val": v} for k, v in enumerate(val)]
    (data / "splits.json").write_text(json.dumps(folds))
    sets = [s for s in tiny_sets(data, run, 3, iterations=2) if not s.startswith("data.split_file")]
    sets += ["data.split_file='splits.json'", "data.fold=all"]
    steps = {}

    def step(name, main, *argv):
        with captured("seg") as (messages, err):
            steps[name] = {"rc": main(list(argv)), "log": messages, "stderr": err.getvalue()}

    step("first", train_seg.main, "--no-progress", "--set", *sets)
    steps["first"]["mtimes"] = {k: (run / f"fold_{k}" / "last.pt").stat().st_mtime_ns for k in (0, 1)}
    steps["first"]["summary"] = (run / "crossval" / "summary.json").exists()
    step("unfinished", crossval.main, str(run), "--no-progress")
    step("finished_only", crossval.main, str(run), "--finished-only", "--no-progress")
    steps["finished_only"]["summary"] = json.loads((run / "crossval" / "summary.json").read_text())
    bad.write_bytes(good)
    step("again", train_seg.main, "--no-progress", "--set", *sets)
    return {"data": data, "run": run, "sets": sets, "folds": folds, "steps": steps}
