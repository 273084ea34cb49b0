#!/usr/bin/env python
"""Segment images with a trained checkpoint; no labels needed.

    python infer_seg.py -i IMAGE_OR_FOLDER -o OUT_FOLDER -m CHECKPOINT [--tta] [--labels LABEL_FOLDER]
    python infer_seg.py -i IMAGE_OR_FOLDER -o OUT_FOLDER -m RUN            # RUN/fold_*/last.pt: an ensemble

``-m`` also takes an export folder (``python -m seg.export CHECKPOINT -o DIR``): the same outputs,
computed by its TorchScript network, which is a program and loads only with ``--unsafe-load``.
Several models (files, or a cross-validation folder's folds) are an ensemble: the mean of their
probabilities, then the argmax (``seg.ensemble``).  Models of a cross-validation get the postprocessing
it chose (``RUN/crossval/postprocessing.json``; ``--no-postprocessing`` turns it off; docs/inference.md).

Each output is named like its case (the file name; nnU-Net channel files ``name_0000``, ``name_0001``
... are one case ``name`` when ``name_0000`` exists), keeps the input's size, spacing, origin and
direction, and is written as uint8 in the input's format unless ``--format`` says otherwise.
A folder's DICOM files (in it and in its subfolders, any extension) are one case per series, named
``<PatientID>_<SeriesNumber>_<Modality>`` (``seg.io.dicom_case_name``), and written as a DICOM
Segmentation object ``<case>.dcm`` that references the series (or in ``--format``).
Existing outputs are skipped unless ``--overwrite``; two inputs that would be written to one output,
or an output folder that is the input folder, stop the run before anything is written.
A bad file is reported in one line and the others are still processed.

Exit status: 0 done; 2 an input error (a bad file, a bad option, an unusable checkpoint), told in one
line naming the file (``--debug`` shows the traceback); 1 anything else (a bug: traceback shown).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from seg import io
from seg.cli import add_common_flags, run_cli
from seg.errors import UserError
from seg.inference import BLEND_MODES, DEFAULT_BATCH_SIZE, DEFAULT_BLEND, DEFAULT_OVERLAP
from seg.ensemble import load_models
from seg.predict import OUTPUT_FORMATS, checked_cases, dataset_inputs, output_path, predict_folder

log = logging.getLogger("infer_seg")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-i", "--input", required=True, nargs="+",
                   help="image file(s), a folder of images and/or DICOM series (subfolders searched for DICOM), "
                        "or an nnU-Net dataset folder (its imagesTs/)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("-m", "--model", required=True, nargs="+",
                   help="checkpoint file (.pt) from train_seg.py, a run folder (its last.pt), a cross-validation "
                        "folder (its fold_<k>/last.pt), or an export folder from python -m seg.export (its network "
                        "is a TorchScript program: loads only with --unsafe-load); several: an ensemble")
    pp = p.add_mutually_exclusive_group()
    pp.add_argument("--no-postprocessing", action="store_true",
                    help="do not apply the postprocessing the models' cross-validation chose")
    pp.add_argument("--postprocessing", metavar="JSON",
                    help="apply this postprocessing.json (python -m seg.crossval) instead of the one found")
    p.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP, help="sliding-window overlap in [0, 1)")
    p.add_argument("--tta", action="store_true", help="mirror test-time augmentation (along the axes mirrored in training)")
    p.add_argument("--blend", default=DEFAULT_BLEND, choices=BLEND_MODES, help="weighting of overlapping windows")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write OUT/probabilities/<case> (float32, one channel per class; an ensemble's mean)")
    p.add_argument("--format", default="same", choices=OUTPUT_FORMATS,
                   help="output format ('same' = the input's, DICOM-SEG for DICOM series; 'seg.nrrd': 3D Slicer's "
                        "segmentation file, named segments; 'dicom-seg': a DICOM Segmentation object over "
                        "the source series, one segment per class, DICOM inputs only)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="windows per network call")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose output exists")
    p.add_argument("--suffix", default="", help="appended to each output name, e.g. _seg")
    p.add_argument("--labels", help="label folder: evaluate the predicted cases into OUT/evaluation "
                   "(labels of other cases are ignored)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing case")
    add_common_flags(p, unsafe_load=True, exports=True)
    return p.parse_args(argv)


def _cuda() -> bool:
    return torch.cuda.is_available()


def run(args: argparse.Namespace) -> int:
    if not 0.0 <= args.overlap < 1.0 or args.batch_size < 1:
        raise UserError(f"need 0 <= --overlap < 1 and --batch-size >= 1 (got {args.overlap}, {args.batch_size})")
    cases = checked_cases(args.input, args.output, args.suffix, args.format, args.save_probabilities)  # before the model
    if args.labels:
        as_seg = [c for c in cases if io.is_dicom_seg(output_path(c, args.output, args.suffix, args.format))]
        if as_seg:
            raise UserError(f"--labels evaluates label maps, not DICOM-SEG outputs: add --format nii.gz "
                            f"to evaluate the DICOM series ({as_seg[0].name}, ...)", as_seg[0].image)
    predictor = load_models(args.model, device=args.device, unsafe_load=args.unsafe_load,
                            postprocessing=args.postprocessing, find_postprocessing=not args.no_postprocessing,
                            overlap=args.overlap, tta=args.tta, batch_size=args.batch_size, blend=args.blend)
    report = predict_folder(predictor, args.input, args.output, suffix=args.suffix, fmt=args.format,
                            overwrite=args.overwrite, save_probabilities=args.save_probabilities,
                            fail_fast=args.fail_fast)
    log.info("%d written, %d skipped (exist), %d failed -> %s", len(report.successes),
             len(report.skipped), len(report.failures), args.output)
    if args.labels:
        _evaluate(args, report.cases, predictor.bundle.class_names, predictor.label_values)
    if report.failures:
        log.error("%d case(s) failed:", len(report.failures))
        for _, msg in report.failures:
            log.error("  %s", msg)
        return 2
    return 0


def _evaluate(args: argparse.Namespace, cases: list[str], class_names: list[str],
              label_values: tuple[int, ...]) -> None:
    """Evaluate the predictions of ``cases`` (the cases with an output) against ``args.labels``;
    ``class_names`` are the checkpoint's, background first, and ``label_values`` their values in the
    files (predictions are written in those values, so both sides are compared in the training
    files' values)."""
    if not cases:
        log.info("no prediction to evaluate")
        return
    # reason: seg.evaluate loads matplotlib (~1.5 s), needed only with --labels
    from seg.evaluate import evaluate_folders

    inputs = dataset_inputs(args.input)[0]  # an nnU-Net dataset folder: its imagesTs/
    image_dir = inputs[0] if len(inputs) == 1 and inputs[0].is_dir() else None
    out = Path(args.output) / "evaluation"
    evaluate_folders(args.output, args.labels, out, image_dir=image_dir, class_names=class_names[1:],
                     labels=list(label_values[1:]), suffix=args.suffix, cases=cases)
    log.info("evaluation written to %s", out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(message)s" if args.debug else "%(message)s")
    with logging_redirect_tqdm():
        return run_cli(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
