"""Ensembles: several models as one predictor, and ``python -m seg.ensemble`` over probability folders.

``infer_seg.py -m`` takes checkpoint files, export folders and run folders (``model_files``): a
cross-validation folder stands for its ``fold_<k>/last.pt``, any other run folder for its ``last.pt``.
Two or more models make an ``Ensemble``: every model segments the case its own way (its
preprocessing and spacing, its windows, its mirroring with ``--tta``), its softmax probabilities are
taken on the input's grid and added to a running sum, and the mean gives the labels (argmax) before
the postprocessing.  Models that disagree on the class names, label values, spatial dims or input
channels are refused, naming the two models.

``python -m seg.ensemble DIR1 DIR2 ... -o OUT`` builds the same ensemble later from the probability
folders ``infer_seg.py --save-probabilities`` wrote (``OUT/probabilities/``, with their
``classes.json``): per case the mean of the folders' probabilities, its argmax written in the label
values with the probabilities' geometry, postprocessed with ``--postprocessing FILE``.

Memory: one model's probabilities of a case and their running sum, never all models' at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from seg import io
from seg.cli import add_common_flags, run_cli
from seg.errors import DataError, UserError
from seg.export import MANIFEST
from seg.postprocess import Postprocessing, fold_index, postprocessing_file, read_postprocessing
from seg.predict import (Predictor, labels_from_probabilities, probabilities_, read_probability_classes,
                         write_labels)

logger = logging.getLogger(__name__)


def fold_checkpoints(run: str | os.PathLike) -> dict[int, Path]:
    """{k: ``run/fold_<k>/last.pt``} of the folds of a cross-validation folder that have one."""
    folders = [p for p in Path(run).glob("fold_*") if fold_index(p.name) is not None]
    return {fold_index(p.name): p / "last.pt" for p in sorted(folders, key=lambda p: fold_index(p.name))
            if (p / "last.pt").is_file()}


def model_files(models: Sequence[str | os.PathLike]) -> list[Path]:
    """The models ``-m`` names: files and export folders as they are; a folder with
    ``fold_<k>/last.pt`` (a cross-validation) stands for those, else a folder with ``last.pt`` for it."""
    out: list[Path] = []
    for item in map(Path, models):
        if item.is_dir() and not (item / MANIFEST).is_file():
            folds = list(fold_checkpoints(item).values())
            out += folds or ([item / "last.pt"] if (item / "last.pt").is_file() else [item])
        else:
            out.append(item)
    return out


def check_compatible(predictors: Sequence[Predictor], names: Sequence[str]) -> None:
    """Raise a UserError naming two models of an ensemble that differ in class names, label values,
    spatial dims or input channels."""
    facts = {"class names": lambda p: list(p.bundle.class_names), "label values": lambda p: p.label_values,
             "spatial dims": lambda p: p.spatial_dims, "input channels": lambda p: int(p.bundle.in_channels)}
    for other, name in zip(predictors[1:], names[1:]):
        for what, fact in facts.items():
            if fact(other) != fact(predictors[0]):
                raise UserError(f"cannot ensemble {names[0]} and {name}: their {what} differ "
                                f"({fact(predictors[0])} and {fact(other)})")


class Ensemble(Predictor):
    """Several models as one ``Predictor``: the mean of their softmax probabilities on the input's grid.

    Args:
        members: one ``Predictor`` per model (each with its own overlap, mirroring, ...).
        names: the members' names for messages (their files).
        postprocessing: applied to the label maps ``predict_file`` writes.
    """

    def __init__(self, members: Sequence[Predictor], names: Sequence[str],
                 postprocessing: Postprocessing | None = None) -> None:
        check_compatible(members, names)
        super().__init__(members[0].bundle, postprocessing=postprocessing)  # the description all share
        self.members = list(members)

    def check_input(self, image: np.ndarray, path: str | os.PathLike | None = None) -> None:
        for member in self.members:
            member.check_input(image, path)

    def predict_array(self, image: np.ndarray, spacing: Sequence[float] | None = None,
                      return_probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """``Predictor.predict_array`` with the members' mean probabilities (a running sum)."""
        total = None
        for member in self.members:
            probabilities = probabilities_(member.input_grid_logits(image, spacing))
            total = probabilities if total is None else total.add_(probabilities)
        total /= len(self.members)
        return labels_from_probabilities(total), (total.numpy() if return_probabilities else None)

    def predict_file(self, in_paths, out_path, probabilities_path=None) -> Path:
        start = time.perf_counter()
        written = super().predict_file(in_paths, out_path, probabilities_path)
        logger.info("%s: %.1f s with %d models", Path(out_path).name, time.perf_counter() - start,
                    len(self.members))
        return written


def load_models(models: Sequence[str | os.PathLike], device: str | torch.device = "cpu",
                unsafe_load: bool = False, postprocessing: str | os.PathLike | None = None,
                find_postprocessing: bool = True, **kwargs) -> Predictor:
    """The ``Predictor`` of ``models`` (``model_files``): one model's, or an ``Ensemble``.

    Args:
        models: checkpoint files, export folders, run or cross-validation folders.
        device, unsafe_load: see ``Predictor.from_checkpoint``.
        postprocessing: a ``postprocessing.json`` to apply; None: the one the models' cross-validation
            wrote (``chosen_postprocessing``), when ``find_postprocessing``.
        **kwargs: ``Predictor`` options (overlap, tta, batch size, blend).
    """
    files = model_files(models)
    predictors = [Predictor.from_checkpoint(f, device, unsafe_load, **kwargs) for f in files]
    predictor = predictors[0] if len(files) == 1 else Ensemble(predictors, [str(f) for f in files])
    if len(files) > 1:
        logger.info("ensemble of %d models: %s", len(files), ", ".join(map(str, files)))
    predictor.postprocessing = chosen_postprocessing(files, postprocessing, find_postprocessing,
                                                     predictor.label_values)
    return predictor


def chosen_postprocessing(files: Sequence[Path], explicit: str | os.PathLike | None, find: bool,
                          label_values: Sequence[int]) -> Postprocessing | None:
    """``explicit``'s postprocessing, else (``find``) the one of the cross-validation every model
    belongs to (``seg.postprocess.postprocessing_file``; models of different ones get none, with a
    warning); each use is logged.

    Raises:
        DataError: the file is unreadable or names a label value the models do not predict.
    """
    if explicit is None:
        found = {postprocessing_file(f) for f in files} if find else {None}
        if len(found) > 1:
            logger.warning("the models belong to different cross-validations (%s): no postprocessing applied; "
                           "choose one with --postprocessing FILE", ", ".join(sorted(map(str, found))))
            return None
        explicit = found.pop()
        if explicit is None:
            return None
    pp = checked(read_postprocessing(explicit), label_values)
    logger.info("postprocessing from %s: %s (--no-postprocessing turns it off)", explicit, pp.describe())
    return pp


def checked(pp: Postprocessing, label_values: Sequence[int]) -> Postprocessing:
    """``pp``, when the label values it names are among ``label_values``; a DataError naming its file else."""
    unknown = sorted(set(pp.labels) - set(label_values))
    if unknown:
        raise DataError(f"keeps the largest component of label value(s) {unknown}, which the model does not "
                        f"predict (its values: {list(label_values)})", pp.source)
    return pp


# ---------------------------------------------------------------------------------------------------
# Ensembles of probability folders
# ---------------------------------------------------------------------------------------------------
def ensemble_folders(folders: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                     postprocessing: Postprocessing | None = None, progress: bool = True) -> list[Path]:
    """Label maps from the mean of the probabilities of ``folders`` (``infer_seg.py --save-probabilities``).

    Every folder must hold the same cases and classes (``classes.json``); a case's files must share
    their geometry and channels.  Outputs are named like the cases, in the probabilities' format.

    Raises:
        UserError: ``out_dir`` is one of ``folders``; folders of other classes or other cases; files
            of another geometry or channel count (one line naming the files).
    """
    folders, out_dir = [Path(f) for f in folders], Path(out_dir)
    if any(f.resolve() == out_dir.resolve() for f in folders):
        raise UserError("is one of the probability folders: write the label maps to another folder", out_dir)
    classes = [read_probability_classes(f) for f in folders]
    files = [io.label_files(f) for f in folders]
    for folder, cls, found in zip(folders[1:], classes[1:], files[1:]):
        if cls != classes[0]:
            raise UserError(f"cannot ensemble {folders[0]} and {folder}: their classes differ ({classes[0]} and {cls})")
        if set(found) != set(files[0]):
            odd = sorted(set(found) ^ set(files[0]))[0]
            raise UserError(f"cannot ensemble {folders[0]} and {folder}: case {odd!r} is in only one of them")
    if postprocessing is not None:
        checked(postprocessing, classes[0][1])
    written = []
    for name in tqdm(sorted(files[0]), desc="ensemble", unit="case", disable=not progress):
        start = time.perf_counter()
        total, meta = _mean_probabilities([found[name] for found in files])
        out = out_dir / (name + io.split_extension(files[0][name])[1])
        written.append(write_labels(out, labels_from_probabilities(total), meta, *classes[0], postprocessing))
        logger.info("%s: %.1f s with %d models", out.name, time.perf_counter() - start, len(folders))
    return written


def _mean_probabilities(paths: Sequence[Path]) -> tuple[torch.Tensor, io.ImageMeta]:
    """The mean of the (K, *S) probabilities in ``paths`` (a running sum) and the first file's geometry."""
    total, meta = None, None
    for path in paths:
        probabilities, m = io.read_image(path)
        if total is None:
            total, meta = torch.from_numpy(probabilities.astype(np.float32, copy=False)), m
            continue
        io.check_geometry(m, meta, "probabilities", "probabilities")
        if probabilities.shape != tuple(total.shape):
            raise DataError(f"has {probabilities.shape[0]} channel(s) but {paths[0]} has {total.shape[0]}", path)
        total.add_(torch.from_numpy(probabilities.astype(np.float32, copy=False)))
    return total.div_(len(paths)), meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m seg.ensemble",
                                description="Label maps from the mean of probability folders")
    p.add_argument("folders", nargs="+", metavar="PROB_DIR",
                   help="probability folders (infer_seg.py --save-probabilities: OUT/probabilities)")
    p.add_argument("-o", "--output", required=True, help="folder of the label maps (created)")
    p.add_argument("--postprocessing", metavar="JSON",
                   help="a postprocessing.json (python -m seg.crossval) to apply to the label maps")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_common_flags(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exit status 0, 2 for input errors (one line), 1 for a bug (traceback)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")

    def body() -> int:
        pp = read_postprocessing(args.postprocessing) if args.postprocessing else None
        if pp is not None:
            logger.info("postprocessing from %s: %s", args.postprocessing, pp.describe())
        written = ensemble_folders(args.folders, args.output, pp, progress=not args.no_progress)
        print(f"{len(written)} label maps from {len(args.folders)} probability folders in {args.output}")
        return 0
    return run_cli(body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
