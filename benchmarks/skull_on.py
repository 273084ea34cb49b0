#!/usr/bin/env python
"""Brain extraction on synthetic skull-on T1 heads with air stored as 0: does the model predict brain
in the air?

    python benchmarks/skull_on.py [--cases 8] [--iterations 200] [--set key=value ...]

Writes ``--cases`` synthetic heads (scalp, dark skull, grey and white matter; air exactly 0; the head
fills most of the field of view, so cropping to the non-zero box removes little and the plan picks
plain z-scoring), trains the default model on them for ``--iterations`` steps with the plan
(``--set`` overrides, e.g. ``data.normalization=zscore_nonzero``), predicts the validation heads and
prints, per case, the voxels predicted as brain where the image is air (exactly 0) and the Dice.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402


def skull_on_heads(root: Path, n: int = 3, shape: tuple[int, int, int] = (40, 52, 44), seed: int = 3
                   ) -> Path:
    """Write ``n`` synthetic heads to ``root/imagesTr`` and ``root/labelsTr`` (label: the brain).

    ``shape`` is the NumPy (z, y, x) shape; 1 mm voxels; the head is an ellipsoid filling 98 % of
    each axis, air outside it exactly 0.
    """
    rng = np.random.default_rng(seed)
    for i in range(n):
        z, y, x = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
        c = [s / 2 + rng.uniform(-1, 1) for s in shape]
        scale = rng.uniform(0.45, 0.49)
        r = np.sqrt(sum(((g - cc) / (s * scale)) ** 2 for g, cc, s in zip((z, y, x), c, shape)))
        brain = r < 0.78
        image = np.where(r < 1.0, 350.0, 0.0)              # scalp
        image[(r >= 0.80) & (r < 0.9)] = 90.0              # skull (dark in T1)
        image[brain] = 500.0 + 80 * (r[brain] < 0.5)       # white matter brighter than grey
        image = np.where(image > 0, image + rng.normal(0, 15, shape), 0).clip(0, None)
        for sub, arr in (("imagesTr", image.astype(np.float32)), ("labelsTr", brain.astype(np.uint8))):
            (root / sub).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(sitk.GetImageFromArray(arr), str(root / sub / f"head{i}.nii.gz"))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--out", default="runs/bench_skull_on")
    ap.add_argument("--set", nargs="*", default=[])
    args = ap.parse_args()
    from seg.config import apply_overrides, load_config
    from seg.predict import Predictor
    from seg.train import train

    print("command: python " + " ".join(sys.argv))
    print(f"cpu: {platform.processor() or platform.machine()}")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    data = skull_on_heads(out / "data", args.cases)
    cfg = apply_overrides(load_config(), [
        f"data.root='{data.resolve()}'", "data.class_names=['background','brain']",
        "data.val_images_dir=None", "data.val_fraction=0.25", f"train.iterations={args.iterations}",
        f"train.val_every={args.iterations}", f"train.output_dir='{out / 'run'}'", *args.set])
    result = train(cfg, progress=False)
    predictor = Predictor.from_checkpoint(result.output_dir / "last.pt")
    from seg.train import find_data
    _, val = find_data(cfg)
    print("| case | air voxels | predicted brain in air | Dice (brain) |\n|---|---|---|---|")
    for case in val:
        image, label = sitk.GetArrayFromImage(sitk.ReadImage(str(case.image))), \
            sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
        pred, _ = predictor.predict_array(image.transpose(2, 1, 0)[None], (1.0, 1.0, 1.0))
        pred = pred.transpose(2, 1, 0)
        air = image == 0
        dice = 2 * np.sum((pred == 1) & (label == 1)) / max(1, np.sum(pred == 1) + np.sum(label == 1))
        print(f"| {case.name} | {int(air.sum())} | {int(np.sum(pred[air] == 1))} | {dice:.4f} |")


if __name__ == "__main__":
    main()
