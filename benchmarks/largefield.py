#!/usr/bin/env python
"""Large field of view: does a model label the target's look-alikes as target?

    python benchmarks/largefield.py --checkpoint runs/atrium_phantom/last.pt [--fold 0] [--tta]
    python benchmarks/largefield.py --checkpoint runs/atrium_phantom/last.pt --test 20
    python benchmarks/largefield.py --generate 12 --iterations 400 [--set key=value ...]
    python benchmarks/largefield.py --single IMAGE LABEL --iterations 600 [--set key=value ...]

The first form segments the validation subjects of ``--fold`` of the atrium phantom
(``data/demo/atrium_phantom``, see ``data/thorax.py``) with the checkpoint, through ``infer_seg.py``'s
``Predictor`` (its preprocessing, sliding window with overlap 0.5, logits resampled to the input grid),
and prints per subject and in summary:

* Dice, Boundary IoU, HD95 and NSD (2 mm) of the atrium, recall and the predicted volume over the
  true one;
* ``far FP``: the share of the false-positive voxels lying more than 10 voxels from the atrium;
* ``look-alikes hit``: the structures of ``anatomyTr/`` (other chambers, great vessels, the rest of the
  pulmonary veins) holding at least ``--hit-mm3`` of predicted atrium more than 10 voxels from the
  true atrium (a boundary error at a join, such as the cut across a vein or the mitral valve, is not
  a hit).  The target for the default: none.

``--test N`` evaluates instead N further subjects of the same generator that no fold holds (seeds
``TEST_SEED`` onwards, written once to ``runs/bench_largefield/test``): a test set, as the 20 test
volumes of the real task.

The second form is the synthetic check: it generates ``--generate`` subjects (coarser and smaller than
the demo so that it runs in minutes), trains the default configuration on all but a quarter of them for
``--iterations`` steps, and evaluates the rest the same way.

The third trains on one real scan (e.g. the whole pyradiomics lung CT, a tumour in a 512x512x61
chest: ``../shared/data/pyradiomics/lung2_image.nrrd``) and segments that same scan: a measure of
fit, not of generalisation, but it shows whether the sampling lets the model see the rest of the
scan: the predicted volume farther than 3 mm from the label, and in how many connected pieces.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from data.thorax import LOOKALIKES, STRUCTURES  # noqa: E402

DEMO = ROOT / "data" / "demo" / "atrium_phantom"
FAR_VOXELS, JOIN_MM = 10, 3.0
TEST_SEED = 30_000  # the demo's subjects are seeds 20,000-20,039 (data/build_demo.py)


def case_figures(pred: np.ndarray, ref: np.ndarray, anatomy: np.ndarray, spacing, hit_mm3: float) -> dict:
    """Figures of one binary prediction against the reference and the anatomy map."""
    from seg.metrics import evaluate_case

    metrics = evaluate_case(pred.astype(np.uint8), ref.astype(np.uint8), spacing, [1],
                            metrics=("dice", "boundary_iou", "hd95", "nsd"), nsd_tolerance_mm=2.0)[1]
    fp = pred & ~ref
    far = fp & (ndimage.distance_transform_edt(~ref) > FAR_VOXELS)
    voxel_mm3 = float(np.prod(spacing))
    hits = {}
    for name in LOOKALIKES:
        mm3 = float(np.count_nonzero(far & (anatomy == STRUCTURES[name]))) * voxel_mm3
        if mm3 >= hit_mm3:
            hits[name] = round(mm3)
    return {**metrics, "recall": float((pred & ref).sum() / max(ref.sum(), 1)),
            "volume_ratio": float(pred.sum() / max(ref.sum(), 1)),
            "far_fp_share": float(far.sum() / max(fp.sum(), 1)),
            "fp_mm3": float(fp.sum()) * voxel_mm3, "hits": hits}


def _bundle(checkpoint: str, monai_unet: bool = False):
    """The checkpoint's inference bundle; ``monai_unet``: a run of ``benchmarks/quality.py``'s MONAI
    UNet (its weights in the checkpoint, our preprocessing and patch)."""
    from seg.checkpoint import load_checkpoint, load_for_inference

    if not monai_unet:
        return load_for_inference(checkpoint)
    from benchmarks.quality import MonaiUNet
    from seg.checkpoint import InferenceBundle
    from seg.spec import InferenceSpec

    ckpt = load_checkpoint(checkpoint)
    spec = InferenceSpec.from_dict(ckpt)
    model = MonaiUNet(spec.spatial_dims, spec.in_channels, len(spec.class_names))
    model.load_state_dict(ckpt["model"])
    return InferenceBundle(model.eval(), spec)


def evaluate(checkpoint: str, root: Path, cases: list[str], tta: bool, hit_mm3: float,
             monai_unet: bool = False) -> list[dict]:
    from seg import io
    from seg.predict import Predictor

    predictor = Predictor(_bundle(checkpoint, monai_unet), tta=tta)
    rows = []
    for case in cases:
        t0 = time.time()
        image, meta = io.read_case([root / "imagesTr" / f"{case}.nii.gz"])
        labels, _ = predictor.predict_array(image, meta.spacing)
        seconds = time.time() - t0
        ref, _ = io.read_label(root / "labelsTr" / f"{case}.nii.gz")
        anatomy, _ = io.read_label(root / "anatomyTr" / f"{case}.nii.gz")
        rows.append({"case": case, "seconds": seconds,
                     **case_figures(labels == 1, ref == 1, anatomy, meta.spacing, hit_mm3)})
    return rows


def report(rows: list[dict]) -> None:
    print("| case | Dice | Boundary IoU | HD95 mm | NSD 2 mm | recall | pred/true volume | far FP | "
          "look-alikes hit (mm3) | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        hits = ", ".join(f"{k} {v}" for k, v in r["hits"].items()) or "none"
        print(f"| {r['case']} | {r['dice']:.4f} | {r['boundary_iou']:.4f} | {r['hd95']:.2f} | {r['nsd']:.3f} | "
              f"{r['recall']:.3f} | {r['volume_ratio']:.2f} | {r['far_fp_share']:.0%} | {hits} | {r['seconds']:.1f} |")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("dice", "boundary_iou", "hd95", "nsd", "recall")}
    n_hits = sum(len(r["hits"]) for r in rows)
    print(f"\nmean Dice {mean['dice']:.4f}, Boundary IoU {mean['boundary_iou']:.4f}, HD95 {mean['hd95']:.2f} mm, "
          f"NSD {mean['nsd']:.3f}, recall {mean['recall']:.3f}; median pred/true volume "
          f"{np.median([r['volume_ratio'] for r in rows]):.2f}, median far-FP share "
          f"{np.median([r['far_fp_share'] for r in rows]):.0%}; look-alikes hit: {n_hits} in "
          f"{sum(bool(r['hits']) for r in rows)} of {len(rows)} subjects")


def generate(root: Path, n: int, spacing: float = 0.8, seed: int = 90_000) -> list[str]:
    """``n`` phantom subjects under ``root`` (imagesTr, labelsTr, anatomyTr, dataset.json); the
    first quarter are the validation cases (returned)."""
    from data.build_demo import PHANTOM_DATASET, write_array
    from data.thorax import make_subject

    names = [f"atrium_{i:03d}" for i in range(n)]
    marker = root / f".generated_{n}_{spacing}_{seed}"
    if marker.exists():
        return names[:max(1, n // 4)]
    shutil.rmtree(root, ignore_errors=True)
    for i, name in enumerate(names):
        s = make_subject(seed + i, spacing=spacing)
        for sub, array in (("imagesTr", s.image), ("labelsTr", s.label), ("anatomyTr", s.anatomy)):
            write_array(array, s.spacing, s.origin, root / sub / f"{name}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({**PHANTOM_DATASET, "numTraining": n}))
    n_val = max(1, n // 4)
    (root / "splits_final.json").write_text(json.dumps([{"train": names[n_val:], "val": names[:n_val]}]))
    marker.touch()
    return names[:n_val]


def single_scan(image: Path, label: Path, out: Path, sets: list[str]) -> None:
    """Train on one scan (validated on itself) and report what it labels away from the label."""
    from seg import io
    from seg.config import apply_overrides, load_config
    from seg.predict import Predictor
    from seg.train import train

    root = out / "data"
    shutil.rmtree(root, ignore_errors=True)
    ext = "".join(image.suffixes)
    for sub in ("imagesTr", "imagesVal"):
        (root / sub).mkdir(parents=True)
        os.symlink(image.resolve(), root / sub / f"scan{ext}")
    for sub in ("labelsTr", "labelsVal"):
        (root / sub).mkdir(parents=True)
        os.symlink(label.resolve(), root / sub / f"scan{ext}")
    cfg = apply_overrides(load_config(), [f"data.root='{root.resolve()}'", f"train.output_dir='{out}/run'",
                                          "data.class_names=['background', 'target']", *sets])
    train(cfg, progress=True, overwrite=True)
    img, meta = io.read_case([image])
    pred, _ = Predictor.from_checkpoint(f"{out}/run/last.pt").predict_array(img, meta.spacing)
    ref, _ = io.read_label(label)
    ref, pred = ref > 0, pred == 1
    away = pred & (ndimage.distance_transform_edt(~ref, sampling=meta.spacing) > JOIN_MM)
    pieces = ndimage.label(away)[1]
    from seg.metrics import dice
    print(f"\nDice {dice(pred, ref):.4f}; predicted farther than {JOIN_MM:g} mm from the label: "
          f"{away.sum() * np.prod(meta.spacing):.0f} mm3 in {pieces} piece(s) (label {ref.sum() * np.prod(meta.spacing):.0f} mm3)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a trained model (evaluate it on the demo's validation fold)")
    ap.add_argument("--root", default=str(DEMO))
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--test", type=int, default=0, help="evaluate N unseen generated subjects instead of the fold")
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--monai-unet", action="store_true", help="the checkpoint is quality.py's MONAI UNet")
    ap.add_argument("--hit-mm3", type=float, default=50.0, help="predicted volume that makes a look-alike hit")
    ap.add_argument("--generate", type=int, default=0, help="synthetic check: generate this many subjects")
    ap.add_argument("--spacing", type=float, default=0.8, help="synthetic check: voxel size (mm)")
    ap.add_argument("--iterations", type=int, default=400)
    ap.add_argument("--out", default="runs/bench_largefield")
    ap.add_argument("--single", nargs=2, metavar=("IMAGE", "LABEL"), help="one real scan: train and check on it")
    ap.add_argument("--set", nargs="*", default=[], help="synthetic check / single scan: config overrides")
    args = ap.parse_args()
    print("command: python " + " ".join(sys.argv))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    if args.single:
        sets = [f"train.iterations={args.iterations}", *args.set]
        return single_scan(Path(args.single[0]), Path(args.single[1]), Path(args.out), sets)
    if args.generate:
        from seg.config import apply_overrides, load_config
        from seg.train import train

        root = Path(args.out) / "data"
        val = generate(root, args.generate, args.spacing)
        cfg = apply_overrides(load_config(), [f"data.root='{root.resolve()}'", f"train.output_dir='{args.out}/run'",
                                              f"train.iterations={args.iterations}", *args.set])
        train(cfg, progress=True, overwrite=True)
        rows = evaluate(f"{args.out}/run/last.pt", root, val, args.tta, args.hit_mm3)
    else:
        if not args.checkpoint:
            ap.error("give --checkpoint, or --generate N")
        if args.test:
            root = Path("runs/bench_largefield/test")
            generate(root, args.test, seed=TEST_SEED)
            val = [f"atrium_{i:03d}" for i in range(args.test)]
        else:
            root = Path(args.root)
            val = json.loads((root / "splits_final.json").read_text())[args.fold]["val"]
        rows = evaluate(args.checkpoint, root, val, args.tta, args.hit_mm3, args.monai_unet)
    report(rows)


if __name__ == "__main__":
    main()
