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
