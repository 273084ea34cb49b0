"""Evaluate predicted label maps against references: ``python -m seg.evaluate --pred P --label L -o OUT``.

Files are found and read by ``seg.io``, the reader of training and inference: every image format
(.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd, .png); a case is paired by its name (the file name without
extension, and without ``--suffix`` for predictions); label maps and predictions must hold integers,
and size, spacing, origin and direction must match within ``seg.io``'s one geometry tolerance, the
one training applies to an image and its label map.  Arrays follow the project's (X, Y, Z) voxel
order, spacing (from the files) the same order.  Axes of size 1 are dropped (a one-slice volume is
evaluated as 2D).  Writes ``metrics_per_case.csv``, ``summary.json``, box plots, a picture per case
of the slices with the worst boundary error and ``index.html`` into the report folder.  Bad input
exits with status 2.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from seg import io, report
from seg.cli import add_common_flags, run_cli
from seg.dataset_json import read_dataset_json
from seg.errors import DataError
from seg.metrics import (DEFAULT_METRICS, DEFAULT_OPTIONS, MetricAccumulator, evaluate_case_with_distances,
                         validate_options)

log = logging.getLogger(__name__)


def squeeze_singletons(arrays: Sequence[np.ndarray], spacing: Sequence[float]
                       ) -> tuple[list[np.ndarray], tuple[float, ...]]:
    """Drops axes of size 1 (and their spacing) from arrays that share a shape."""
    keep = [i for i, n in enumerate(arrays[0].shape) if n > 1] or [0]
    squeezed = [a.reshape([a.shape[i] for i in keep]) for a in arrays]
    return squeezed, tuple(float(spacing[i]) for i in keep)


def _pair_cases(pred_dir: Path, label_dir: Path, suffix: str = "", cases: Sequence[str] | None = None
                ) -> list[tuple[str, Path, Path]]:
    """(name, prediction, label) of every labelled case (of ``cases`` only, when given)."""
    refs = io.label_files(label_dir)
    if not refs:
        raise DataError(f"no label files ({', '.join(io.IMAGE_EXTENSIONS)})", label_dir)
    preds = {name[: len(name) - len(suffix)]: path for name, path in io.label_files(pred_dir).items()
             if name.endswith(suffix)}
    if cases is not None:
        ignored = sorted(set(refs) - set(cases))
        if ignored:
            log.info("%d label(s) of cases that were not predicted are ignored: %s", len(ignored),
                     ", ".join(ignored[:5]) + (" …" if len(ignored) > 5 else ""))
        refs = {name: refs[name] for name in set(refs) & set(cases)}
        if not refs:
            example = f" (e.g. {cases[0]!r})" if cases else ""
            raise DataError(f"no label named like a predicted case{example}", label_dir)
    missing = sorted(set(refs) - set(preds))
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise DataError(f"no prediction for {len(missing)} labelled case(s): {shown}"
                        + (f" (named <case>{suffix}.<ext>)" if suffix else ""), pred_dir)
    extra = sorted(set(preds) - set(refs))
    if extra:
        log.warning("%s: %d prediction(s) without a label are ignored: %s", pred_dir, len(extra), extra[:5])
    return [(name, preds[name], refs[name]) for name in sorted(refs)]


def _image_lookup(image_dir: Path | None) -> dict[str, tuple[Path, ...]]:
    """{case name: its image files} (``case``, nnU-Net's ``case_0000``, ... or a DICOM series, as
    ``seg.io`` names them)."""
    return {} if image_dir is None else {c.name: c.images for c in io.image_cases(image_dir)}


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
                     suffix: str = "", cases: Sequence[str] | None = None,
                     groups: Mapping[str, Sequence[str]] | None = None, extra: Mapping[str, Any] | None = None,
                     **options: float) -> dict[str, Any]:
    """Evaluates every labelled case and writes the report; returns the summary (as in summary.json).

    Args:
        pred_dir: folder of predicted label maps, named ``<case><suffix>.<ext>``.
        label_dir: folder of reference label maps (one per case; each needs a prediction).
        out_dir: report folder (created).
        image_dir: optional folder of images (``case`` or ``case_0000``) drawn under the contours.
        class_names: names of the foreground labels 1, 2, … (sets ``labels`` to 1..len if not given).
        labels: label values to evaluate; default: every nonzero value found in the files.
        metrics: metric names (``seg.metrics.DEFAULT_METRICS``).
        num_slices: slices per case picture (3D).
        pictures: write the per-case pictures.
        progress: show a tqdm bar.
        suffix: what follows the case name in the prediction file names (``infer_seg.py --suffix``).
        cases: evaluate these cases only (the ones just predicted); the labels of other cases are
            ignored (an info line says which).  None: every label needs a prediction.
        groups: {name: its cases}: each group's summary too, under ``groups`` (cross-validation folds).
        extra: more entries of the summary (what produced the predictions).
        **options: metric options (``seg.metrics.DEFAULT_OPTIONS``).

    Raises:
        DataError: unreadable files, missing predictions, geometry mismatch (one line, both files).
    """
    out_dir = Path(out_dir)
    opts = validate_options(metrics, options)
    if class_names is not None and labels is None:
        labels = list(range(1, len(class_names) + 1))
    names = {lab: n for lab, n in zip(labels or [], class_names or [])}
    images = _image_lookup(None if image_dir is None else Path(image_dir))
    per_case, case_pictures = [], {}
    pairs = _pair_cases(Path(pred_dir), Path(label_dir), suffix, cases)
    for name, pred_path, ref_path in tqdm(pairs, desc="evaluate", unit="case", disable=not progress):
        if image_dir is not None and name not in images:
            raise DataError(f"no image for case {name!r} ({name} or {name}_0000, any extension)", image_dir)
        results, pic = _evaluate_one(name, pred_path, ref_path, images.get(name), out_dir, labels,
                                     metrics, num_slices if pictures else 0, opts)
        per_case.append((name, results))
        if pic:
            case_pictures[name] = pic
    acc = _accumulate(per_case, metrics)
    summary = report.build_summary(acc, names, opts)
    if groups:
        summary["groups"] = {g: report.build_summary(acc.subset(members), names, opts)["classes"]
                             for g, members in groups.items()}
    summary.update(extra or {})
    report.write_case_csv(out_dir / report.CASE_CSV, acc, names)
    report.write_summary_json(out_dir / report.SUMMARY_JSON, summary)
    boxplots = report.box_plots(out_dir, acc, names)
    report.write_index_html(out_dir, summary, acc, names, boxplots, case_pictures)
    log.info("wrote %s", out_dir / report.INDEX_HTML)
    return summary


def _evaluate_one(name: str, pred_path: Path, ref_path: Path, image_paths: Sequence[Path] | None, out_dir: Path,
                  labels: Sequence[int] | None, metrics: Sequence[str], num_slices: int,
                  options: dict[str, float]) -> tuple[dict[int, dict[str, float]], str | None]:
    """Metrics of one case and the relative path of its picture (None without pictures)."""
    (pred, pred_meta), (ref, ref_meta) = io.read_label(pred_path), io.read_label(ref_path)
    io.check_geometry(pred_meta, ref_meta, "prediction", "label map")
    arrays = [pred, ref]
    if image_paths is not None:
        image, image_meta = io.read_case(image_paths)
        io.check_geometry(image_meta, ref_meta, "image", "label map")
        arrays.append(image[0].astype(np.float32))
    arrays, spacing = squeeze_singletons(arrays, ref_meta.spacing)
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
    p.add_argument("--suffix", default="", help="what follows the case name in prediction file names, e.g. _seg")
    p.add_argument("--classes", nargs="+", metavar="NAME",
                   help="names of labels 1, 2, … (default: the dataset.json beside an nnU-Net labelsTr folder)")
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
    add_common_flags(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exit status 0, 2 for input errors (one line), 1 for a bug (traceback)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(message)s")
    return run_cli(lambda: _run(args), debug=args.debug)


def dataset_json_classes(label_dir: str | Path) -> tuple[list[str], list[int]] | None:
    """(foreground class names, their label values) from the ``dataset.json`` of the nnU-Net dataset
    ``label_dir`` lies in (``DatasetXXX/labelsTr``), or None when there is none."""
    path = Path(label_dir).parent / "dataset.json"
    if not path.is_file():
        return None
    dj = read_dataset_json(path)
    return dj.class_names[1:], dj.label_values[1:]


def _run(args: argparse.Namespace) -> int:
    classes, labels = args.classes, args.labels
    if classes is None and labels is None and (described := dataset_json_classes(args.label)):
        classes, labels = described
        log.info("classes from %s: %s", Path(args.label).parent / "dataset.json",
                 ", ".join(f"{n}={v}" for n, v in zip(classes, labels)))
    summary = evaluate_folders(
        args.pred, args.label, args.output, image_dir=args.image, class_names=classes,
        labels=labels, metrics=args.metrics, num_slices=args.num_slices,
        pictures=not args.no_pictures, suffix=args.suffix, width_mm=args.width_mm, tolerance_mm=args.tolerance_mm,
        nsd_tolerance_mm=args.nsd_tolerance_mm, percentile=args.percentile)
    print(f"{summary['n_cases']} cases; report: {Path(args.output) / report.INDEX_HTML}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
