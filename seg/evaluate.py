"""Evaluate predicted label maps against references: ``python -m seg.evaluate --pred P --label L -o OUT``.

Cases are paired by file name without extension (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd). Size,
spacing, origin and direction must match (checked with SimpleITK); spacing comes from the files.
Arrays follow the project's (X, Y, Z) voxel order (``GetArrayFromImage(img).transpose(2, 1, 0)``), with
spacing in the same order. Axes of size 1 are dropped (a one-slice volume is evaluated as 2D).
Writes ``metrics_per_case.csv``, ``summary.json``, box plots, a picture per case of the slices with the
worst boundary error and ``index.html`` into the report folder. Bad input exits with status 2.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from seg import report
from seg.errors import ConfigError, DataError, UserError
from seg.metrics import (DEFAULT_METRICS, DEFAULT_OPTIONS, MetricAccumulator, evaluate_case_with_distances,
                         validate_options)

log = logging.getLogger(__name__)

EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class Volume:
    """An image read with SimpleITK: ``array`` (*spatial) in (X, Y[, Z]) order and its geometry."""

    path: Path
    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]


def case_name(path: Path) -> str | None:
    """File name without a supported extension, or None for other files."""
    low = path.name.lower()
    for ext in EXTENSIONS:
        if low.endswith(ext) and len(low) > len(ext):
            return path.name[: -len(ext)]
    return None


def list_cases(folder: str | Path) -> dict[str, Path]:
    """{case name: path} of the image files in ``folder`` (DataError on duplicates or no folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("not a folder", folder)
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        name = case_name(path)
        if name is None or not path.is_file():
            continue
        if name in cases:
            raise DataError(f"two files for case {name!r}: {cases[name].name} and {path.name}", folder)
        cases[name] = path
    return cases


def read_volume(path: Path) -> Volume:
    """Reads one file; DataError (one line naming the file) if SimpleITK cannot."""
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DataError(f"cannot read: {str(e).strip().splitlines()[-1]}", path) from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DataError("expected a single-component image", path)
    arr = sitk.GetArrayFromImage(img)
    arr = arr.transpose(tuple(range(arr.ndim))[::-1])  # (Z, Y, X) -> (X, Y, Z)
    return Volume(path, arr, img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def check_geometry(a: Volume, b: Volume) -> None:
    """DataError naming both files if size, spacing, origin or direction differ."""
    checks = [("size", a.array.shape, b.array.shape, 0), ("spacing", a.spacing, b.spacing, 1e-5),
              ("origin", a.origin, b.origin, 1e-3), ("direction", a.direction, b.direction, 1e-4)]
    for what, x, y, tol in checks:
        if len(x) != len(y) or not np.allclose(x, y, rtol=0, atol=tol):
            fmt = lambda v: "(" + ", ".join(f"{float(t):g}" for t in v) + ")"  # noqa: E731
            raise DataError(f"{what} {fmt(x)} differs from {b.path}: {fmt(y)}", a.path)


def as_labels(vol: Volume) -> np.ndarray:
    """The label map as integers (DataError if it holds non-integer values)."""
    arr = vol.array
    if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != bool:
        if not np.all(np.mod(arr, 1) == 0):
            raise DataError("label map holds non-integer values", vol.path)
        arr = arr.astype(np.int64)
    return arr


def squeeze_singletons(arrays: Sequence[np.ndarray], spacing: Sequence[float]
                       ) -> tuple[list[np.ndarray], tuple[float, ...]]:
    """Drops axes of size 1 (and their spacing) from arrays that share a shape."""
    keep = [i for i, n in enumerate(arrays[0].shape) if n > 1] or [0]
    squeezed = [a.reshape([a.shape[i] for i in keep]) for a in arrays]
    return squeezed, tuple(float(spacing[i]) for i in keep)


def _pair_cases(pred_dir: Path, label_dir: Path) -> list[tuple[str, Path, Path]]:
    preds, refs = list_cases(pred_dir), list_cases(label_dir)
    if not refs:
        raise DataError("no label files (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd)", label_dir)
    missing = sorted(set(refs) - set(preds))
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise DataError(f"no prediction for {len(missing)} labelled case(s): {shown}", pred_dir)
    extra = sorted(set(preds) - set(refs))
    if extra:
        log.warning("%s: %d prediction(s) without a label are ignored: %s", pred_dir, len(extra), extra[:5])
    return [(name, preds[name], refs[name]) for name in sorted(refs)]


def _image_lookup(image_dir: Path | None) -> dict[str, Path]:
    """{case name: image path}, accepting both ``case`` and nnU-Net's ``case_0000``."""
    if image_dir is None:
        return {}
    images = list_cases(image_dir)
    out = {re.sub(r"_0000$", "", name): path for name, path in images.items()}
    out.update(images)
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _case_labels(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int] | None) -> list[int]:
    if labels is not None:
        return list(labels)
    return [int(v) for v in np.union1d(np.unique(pred), np.unique(ref)) if v != 0]


def evaluate_folders(pred_dir: str | Path, label_dir: str | Path, out_dir: str | Path,
                     image_dir: str | Path | None = None, class_names: Sequence[str] | None = None,
                     labels: Sequence[int] | None = None, metrics: Sequence[str] = DEFAULT_METRICS,
                     num_slices: int = 3, pictures: bool = True, progress: bool = True,
                     **options: float) -> dict[str, Any]:
    """Evaluates every labelled case and writes the report; returns the summary (as in summary.json).

    Args:
        pred_dir: folder of predicted label maps.
        label_dir: folder of reference label maps (one per case; each needs a prediction).
        out_dir: report folder (created).
        image_dir: optional folder of images (``case`` or ``case_0000``) drawn under the contours.
        class_names: names of the foreground labels 1, 2, … (sets ``labels`` to 1..len if not given).
        labels: label values to evaluate; default: every nonzero value found in the files.
        metrics: metric names (``seg.metrics.DEFAULT_METRICS``).
        num_slices: slices per case picture (3D).
        pictures: write the per-case pictures.
        progress: show a tqdm bar.
        **options: metric options (``seg.metrics.DEFAULT_OPTIONS``).

    Raises:
        DataError: unreadable files, missing predictions, geometry mismatch (one line, both files).
    """
    out_dir = Path(out_dir)
    try:
        opts = validate_options(metrics, options)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if class_names is not None and labels is None:
        labels = list(range(1, len(class_names) + 1))
    names = {lab: n for lab, n in zip(labels or [], class_names or [])}
    images = _image_lookup(None if image_dir is None else Path(image_dir))
    per_case, case_pictures = [], {}
    pairs = _pair_cases(Path(pred_dir), Path(label_dir))
    for name, pred_path, ref_path in tqdm(pairs, desc="evaluate", unit="case", disable=not progress):
        if image_dir is not None and name not in images:
            raise DataError(f"no image for case {name!r} (tried {name} and {name}_0000)", image_dir)
        results, pic = _evaluate_one(name, pred_path, ref_path, images.get(name), out_dir, labels,
                                     metrics, num_slices if pictures else 0, opts)
        per_case.append((name, results))
        if pic:
            case_pictures[name] = pic
    acc = _accumulate(per_case, metrics)
    summary = report.build_summary(acc, names, opts)
    report.write_case_csv(out_dir / report.CASE_CSV, acc, names)
    report.write_summary_json(out_dir / report.SUMMARY_JSON, summary)
    boxplots = report.box_plots(out_dir, acc, names)
    report.write_index_html(out_dir, summary, acc, names, boxplots, case_pictures)
    log.info("wrote %s", out_dir / report.INDEX_HTML)
    return summary


def _evaluate_one(name: str, pred_path: Path, ref_path: Path, image_path: Path | None, out_dir: Path,
                  labels: Sequence[int] | None, metrics: Sequence[str], num_slices: int,
                  options: dict[str, float]) -> tuple[dict[int, dict[str, float]], str | None]:
    """Metrics of one case and the relative path of its picture (None without pictures)."""
    pred_vol, ref_vol = read_volume(pred_path), read_volume(ref_path)
    check_geometry(pred_vol, ref_vol)
    arrays = [as_labels(pred_vol), as_labels(ref_vol)]
    if image_path is not None:
        image_vol = read_volume(image_path)
        check_geometry(image_vol, ref_vol)
        arrays.append(image_vol.array.astype(np.float32))
    arrays, spacing = squeeze_singletons(arrays, ref_vol.spacing)
    pred, ref = arrays[0], arrays[1]
    case_labels = _case_labels(pred, ref, labels)
    results, distances = evaluate_case_with_distances(pred, ref, spacing, case_labels, metrics, **options)
    if num_slices <= 0:
        return results, None
    rel = f"cases/{_safe(name)}.png"
    background = arrays[2] if len(arrays) > 2 else ref.astype(np.float32)
    report.case_figure(out_dir / rel, name, background, pred, ref, spacing, case_labels, distances, num_slices)
    return results, rel


def _accumulate(per_case: Sequence[tuple[str, dict[int, dict[str, float]]]], metrics: Sequence[str]
                ) -> MetricAccumulator:
    """Accumulator over all cases; a label absent from both maps of a case is 'both empty' (NaN)."""
    all_labels = sorted({lab for _, results in per_case for lab in results})
    acc = MetricAccumulator()
    for name, results in per_case:
        acc.add(name, {lab: results.get(lab, {m: float("nan") for m in metrics}) for lab in all_labels})
    return acc


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m seg.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--pred", required=True, help="folder of predicted label maps")
    p.add_argument("--label", required=True, help="folder of reference label maps")
    p.add_argument("-o", "--output", required=True, help="report folder (created)")
    p.add_argument("--image", help="folder of images drawn under the contours (case or case_0000)")
    p.add_argument("--classes", nargs="+", metavar="NAME", help="names of labels 1, 2, …")
    p.add_argument("--labels", nargs="+", type=int, metavar="INT", help="label values to evaluate")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), help="metrics to compute")
    p.add_argument("--width-mm", type=float, default=DEFAULT_OPTIONS["width_mm"],
                   help="Boundary IoU band width d in mm")
    p.add_argument("--tolerance-mm", type=float, default=DEFAULT_OPTIONS["tolerance_mm"],
                   help="boundary F-score tolerance in mm")
    p.add_argument("--nsd-tolerance-mm", type=float, default=DEFAULT_OPTIONS["nsd_tolerance_mm"],
                   help="normalised surface Dice tolerance tau in mm")
    p.add_argument("--percentile", type=float, default=DEFAULT_OPTIONS["percentile"],
                   help="robust Hausdorff percentile (HD95: 95)")
    p.add_argument("--num-slices", type=int, default=3, help="worst slices shown per 3D case")
    p.add_argument("--no-pictures", action="store_true", help="skip the per-case pictures")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = evaluate_folders(
            args.pred, args.label, args.output, image_dir=args.image, class_names=args.classes,
            labels=args.labels, metrics=args.metrics, num_slices=args.num_slices,
            pictures=not args.no_pictures, width_mm=args.width_mm, tolerance_mm=args.tolerance_mm,
            nsd_tolerance_mm=args.nsd_tolerance_mm, percentile=args.percentile)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{summary['n_cases']} cases; report: {Path(args.output) / report.INDEX_HTML}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
