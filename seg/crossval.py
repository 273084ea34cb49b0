"""Cross-validation: every fold trained in turn (``train_seg.py --set data.fold=all``), then summarised
(``python -m seg.crossval OUT``).

Training (``train_folds``): the folds of the data's split file (``data.split_file``) or, without
one, five folds drawn with ``train.seed`` (nnU-Net makes five when there is no ``splits_final.json``),
written to ``OUT/splits_final.json``.  Fold k is a normal run into ``OUT/fold_<k>/`` (``data.fold=k``:
the weights of a ``data.fold=k`` run, resumable with ``--resume OUT/fold_<k>/last.pt``).  A fold whose
``last.pt`` is at its final iteration is skipped and one with an earlier ``last.pt`` resumed, so the
command run again after an interruption continues; ``OUT/request.json`` holds the request, and another
request into the same folder is refused (``--overwrite`` starts over).  A fold that fails is told in
one line, the next folds still run, and the command ends with a non-zero status and no summary.

Summary (``summarise``): each finished fold's validation cases are segmented by ``infer_seg.py``'s
code (``seg.predict``) with the fold's final ``last.pt`` (not ``best.pt``, chosen on those very cases)
into ``OUT/crossval/predictions/``, evaluated together (``seg.evaluate``) into ``OUT/crossval/``
(``metrics_per_case.csv``, ``summary.json`` with every fold's figures under ``groups``, the report with
its pictures), and the postprocessing is chosen on them (``seg.postprocess``) into
``OUT/crossval/postprocessing.json``, which ``infer_seg.py`` applies to the run's models.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import datasets as ds
from seg import io
from seg.checkpoint import load_checkpoint, resume_config
from seg.cli import EXIT_USER_ERROR, add_common_flags, one_line, run_cli
from seg.config import Provenance, anchored, data_root, resolve_data_path, stored_config
from seg.distributed import env_world_size
from seg.ensemble import fold_checkpoints
from seg.errors import ConfigError, DataError, UserError
from seg.evaluate import evaluate_folders
from seg.files import write_bytes_atomic
from seg.inference import DEFAULT_BATCH_SIZE, DEFAULT_OVERLAP
from seg.postprocess import CROSSVAL_DIR, POSTPROCESSING_JSON, case_dice, decide, write_record
from seg.predict import Predictor, output_path, predict_folder
from seg.train import describe, paired_cases, resolve_device, train, with_iterations

log = logging.getLogger(__name__)

REQUEST_JSON, SPLIT_JSON = "request.json", "splits_final.json"
EXIT_BUG = 1


# ----------------------------------------------------------------------------- training every fold
def train_folds(cfg: Any, provenance: Provenance | None = None, progress: bool = True, overwrite: bool = False,
                unsafe_load: bool = False) -> int:
    """Train every fold of ``cfg`` (``data.fold='all'``) into ``train.output_dir/fold_<k>/``, then
    ``summarise`` them (module docstring).

    Returns:
        The exit status: 0 every fold trained and summarised; 2 a fold failed on an input error; 1 a
        fold failed on another error (its traceback is logged).
    """
    if env_world_size() > 1:
        raise ConfigError("data.fold=all trains on one process: under torchrun train each fold (data.fold=N, "
                          "train.output_dir=OUT/fold_N), then run python -m seg.crossval OUT")
    cfg = copy.deepcopy(with_iterations(anchored(cfg.validate(), provenance)))
    out = Path(cfg.train.output_dir)
    folds, split = fold_split(cfg, provenance)
    claim(out, {"config": stored_config(cfg), "folds": folds}, overwrite)
    if split is None:  # the folds drawn here: the runs read them from the cross-validation folder
        cfg.data.split_file = str(write_bytes_atomic(out / SPLIT_JSON, json.dumps(folds, indent=1) + "\n"))
    failures: dict[int, int] = {}
    for k in range(len(folds)):
        log.info("fold %d/%d: %s", k + 1, len(folds), out / f"fold_{k}")
        try:
            train_fold(cfg, provenance, k, progress, overwrite, unsafe_load)
        except UserError as exc:
            failures[k] = EXIT_USER_ERROR
            log.error("fold %d/%d (fold_%d) failed: %s", k + 1, len(folds), k, one_line(exc))
        except Exception:  # noqa: BLE001 - a bug in one fold: its traceback, then the next fold
            failures[k] = EXIT_BUG
            log.exception("fold %d/%d (fold_%d) failed:", k + 1, len(folds), k)
    if failures:
        log.error("%d of %d folds failed (%s); no summary made. The finished folds are kept: run the command "
                  "again to retry the others", len(failures), len(folds), ", ".join(f"fold_{k}" for k in failures))
        return min(failures.values())
    summarise(out, device=resolve_device(cfg.train.device), progress=progress, unsafe_load=unsafe_load)
    return 0


def fold_split(cfg: Any, provenance: Provenance | None = None) -> tuple[list, Path | None]:
    """(folds, their split file): ``data.split_file`` when it exists, else (``kfold_split`` of the
    training cases, None).

    Raises:
        ConfigError: validation folders exist (``data.val_images_dir``): there are no folds.
        DataError: a split file that is no list of folds.
    """
    d = cfg.data
    val = resolve_data_path(cfg, d.val_images_dir)
    if val is not None and val.exists():
        raise ConfigError(f"data.fold=all cross-validates over folds, but validation folders exist ({val}): "
                          "set data.val_images_dir=None to use data.split_file or 5 seeded folds")
    split = resolve_data_path(cfg, "root", d.split_file)
    if split is not None and split.is_file():
        folds = io.read_json(split, "the split file")
        if not isinstance(folds, list) or not folds:
            raise DataError('must hold a JSON list of folds, each {"train": [case names], "val": [case names]}',
                            split)
        return folds, split
    cases = paired_cases(describe(cfg, provenance)[0])[0]
    return ds.kfold_split([c.name for c in cases], cfg.train.seed), None


def claim(out: Path, request: dict[str, Any], overwrite: bool) -> None:
    """Write ``OUT/request.json``; refuse (without ``overwrite``) a folder that holds folds of another
    request."""
    request = json.loads(json.dumps(request))  # as the file holds it
    path = out / REQUEST_JSON
    before = io.read_json(path, REQUEST_JSON) if path.is_file() else None
    if not overwrite and before is None and fold_checkpoints(out):
        raise ConfigError(f"holds folds of another cross-validation (fold_<k>/last.pt, no {REQUEST_JSON}): choose "
                          "another train.output_dir, or replace them with --overwrite", out)
    changed = _differences(before, request) if before is not None else []
    if changed and not overwrite:
        shown = ", ".join(c.removeprefix("config.") for c in changed[:3])
        raise ConfigError(f"holds a cross-validation of another request (it differs in {shown}): choose "
                          "another train.output_dir, continue it with its own settings, or start over with "
                          "--overwrite", out)
    write_bytes_atomic(path, json.dumps(request, indent=1) + "\n")


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where the JSON values ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".") or "the folds"]


def train_fold(cfg: Any, provenance: Provenance | None, k: int, progress: bool = True,
               overwrite: bool = False, unsafe_load: bool = False) -> None:
    """Fold ``k`` into ``OUT/fold_<k>/``: skipped when its ``last.pt`` is at the final iteration,
    resumed from an earlier one, else trained (a failed attempt's files replaced); ``overwrite``:
    trained anew in any case."""
    folder = Path(cfg.train.output_dir) / f"fold_{k}"
    last = folder / "last.pt"
    if last.is_file() and not overwrite:
        done = int(load_checkpoint(last, unsafe_load=unsafe_load).get("iteration", 0))
        if done >= cfg.train.iterations:
            log.info("fold_%d: finished (iteration %d), skipped", k, done)
            return
        resumed, origin = resume_config(copy.deepcopy(cfg), str(last), [], unsafe_load)
        train(resumed, resume=str(last), progress=progress, unsafe_load=unsafe_load, provenance=origin)
        return
    fold = copy.deepcopy(cfg)
    fold.data.fold, fold.train.output_dir = k, str(folder)
    train(fold, progress=progress, unsafe_load=unsafe_load, overwrite=True, provenance=provenance)


# ----------------------------------------------------------------------------- the summary
@dataclasses.dataclass
class Fold:
    """One fold of a cross-validation folder: its checkpoint and, when it has one, what it stores."""

    index: int
    checkpoint: Path
    ckpt: dict | None = None  # what the summary needs of the checkpoint (``_facts``); None: there is none

    def unfinished(self) -> str:
        """Why the fold is not finished ('' when it is)."""
        if self.ckpt is None:
            return "no last.pt"
        done, total = int(self.ckpt["iteration"] or 0), self.ckpt["config"]["train"]["iterations"]
        return "" if done >= total else f"at iteration {done} of {total}"

    def data(self, key: str) -> Path:
        """A data folder of the fold's run (``data.root`` / its ``key``)."""
        return self.ckpt["root"] / self.ckpt["config"]["data"][key]


def folds_of(out_dir: Path, unsafe_load: bool = False) -> tuple[list[Fold], Path]:
    """Every fold of the split the folds of ``out_dir`` were trained on, and that split file.

    Raises:
        UserError: no fold checkpoint; folds of different split files, classes or label values; a fold
            validated on validation folders or stored as another fold.
    """
    found = fold_checkpoints(out_dir)
    if not found:
        raise UserError("holds no fold_<k>/last.pt: train the folds with train_seg.py --set data.fold=all "
                        f"train.output_dir={out_dir}", out_dir)
    facts = {k: _facts(k, path, unsafe_load) for k, path in found.items()}
    first = facts[min(facts)]
    for k, f in facts.items():
        for what in ("split_file", "class_names", "label_values"):
            if f[what] != first[what]:
                raise UserError(f"fold_{k} and fold_{min(facts)} differ in their {what.replace('_', ' ')} "
                                f"({f[what]} and {first[what]})", out_dir)
    split = first["split_file"]
    n = len(io.read_json(split, "the split file"))
    return [Fold(k, out_dir / f"fold_{k}" / "last.pt", facts.get(k)) for k in range(max(n, max(facts) + 1))], split


def _facts(k: int, path: Path, unsafe_load: bool) -> dict[str, Any]:
    """What the summary needs of fold ``k``'s checkpoint (its weights are left out)."""
    ckpt = load_checkpoint(path, unsafe_load=unsafe_load)
    data = ckpt.get("config", {}).get("data", {})
    if data.get("fold") != k:
        raise UserError(f"is the checkpoint of data.fold={data.get('fold')!r}, not of fold {k}", path)
    val, split = data.get("val_images_dir"), data.get("split_file")
    root = data_root(data["root"]).resolve()  # older runs stored it relative to the repository
    if val is not None and (root / val).exists():
        raise UserError(f"was validated on the folder {root / val}, not on a fold of a split", path)
    if split is None or not (root / split).is_file():
        raise UserError(f"was not trained on a fold of a split file (data.split_file={split!r})", path)
    return {key: ckpt.get(key) for key in ("config", "class_names", "iteration")} | {
        "label_values": ckpt.get("label_values") or list(range(len(ckpt["class_names"]))),
        "root": root, "split_file": (root / split).resolve()}


def summarise(out_dir: str | Path, finished_only: bool = False, device: Any = "cpu", progress: bool = True,
              unsafe_load: bool = False, **predictor_kwargs: Any) -> dict[str, Any]:
    """Segment, evaluate and choose the postprocessing of the cross-validation in ``out_dir`` (module
    docstring); returns the summary (``OUT/crossval/summary.json``).

    Args:
        out_dir: the folder of ``fold_<k>/`` runs (``train.output_dir`` of a ``data.fold=all`` run).
        finished_only: summarise the finished folds when others are not (``summary.json`` says so).
        device: where the models run.
        **predictor_kwargs: ``Predictor`` options (overlap, tta, batch size), ``infer_seg.py``'s defaults.

    Raises:
        UserError: unfinished or missing folds (one line naming them) unless ``finished_only``; see
            ``folds_of``; a case in two folds' validation; a file that cannot be read.
    """
    out_dir = Path(out_dir)
    folds, split = folds_of(out_dir, unsafe_load)
    unfinished = {f"fold_{f.index}": why for f in folds if (why := f.unfinished())}
    if unfinished and not finished_only:
        raise UserError(f"{len(unfinished)} of {len(folds)} folds not finished ("
                        + ", ".join(f"{k}: {why}" for k, why in unfinished.items()) + "): finish them (the "
                        "data.fold=all command again, or --resume OUT/fold_<k>/last.pt), or summarise the "
                        "finished ones with --finished-only", out_dir)
    finished = [f for f in folds if f"fold_{f.index}" not in unfinished]
    if not finished:
        raise UserError("no fold is finished", out_dir)
    crossval = out_dir / CROSSVAL_DIR
    groups, pairs = _predict_folds(finished, split, crossval / "predictions", device, progress, unsafe_load,
                                   predictor_kwargs)
    names, values = finished[0].ckpt["class_names"], finished[0].ckpt["label_values"]
    note = (f"only the finished folds ({len(finished)} of {len(folds)}): {', '.join(unfinished)} not finished"
            if unfinished else "")
    info = {"split_file": str(split), "folds": [f.index for f in finished], "n_folds": len(folds),
            "unfinished": unfinished, "note": note, "checkpoints": {f"fold_{f.index}": str(f.checkpoint)
                                                                    for f in finished},
            "inference": {"overlap": DEFAULT_OVERLAP, "batch_size": DEFAULT_BATCH_SIZE, "tta": False,
                          **predictor_kwargs}}
    summary = evaluate_folders(crossval / "predictions", finished[0].data("labels_dir"), crossval,
                               image_dir=finished[0].data("images_dir"), class_names=names[1:], labels=values[1:],
                               cases=sorted(pairs), groups=groups, extra={"crossval": info}, progress=progress)
    per_case = [case_dice(io.read_label(pred)[0], io.read_label(ref)[0], values[1:]) for pred, ref in pairs.values()]
    postprocessing, record = decide(per_case, values[1:], names[1:])
    write_record(crossval / POSTPROCESSING_JSON, {**record, "folds": info["folds"], "note": note})
    _log_summary(summary, crossval, postprocessing.describe(), note)
    return summary


def _predict_folds(folds: Sequence[Fold], split: Path, pred_dir: Path, device: Any, progress: bool,
                   unsafe_load: bool, predictor_kwargs: dict[str, Any]
                   ) -> tuple[dict[str, list[str]], dict[str, tuple[Path, Path]]]:
    """Segment each fold's validation cases with its checkpoint into ``pred_dir``; returns the case names
    of each fold and {case: (prediction, label file)}."""
    groups: dict[str, list[str]] = {}
    pairs: dict[str, tuple[Path, Path]] = {}
    for i, fold in enumerate(folds):
        cases = ds.find_cases(fold.data("images_dir"), fold.data("labels_dir"),
                              pattern=fold.ckpt["config"]["data"]["pattern"])
        val = ds.split_from_file(cases, split, fold.index)[1]
        twice = next((c.name for c in val if c.name in pairs), None)
        if twice is not None:
            raise DataError(f"case {twice!r} is in the validation of two folds (fold {fold.index} and another)",
                            split)
        log.info("fold_%d (%d/%d): %d validation cases, %s", fold.index, i + 1, len(folds), len(val), fold.checkpoint)
        predictor = Predictor.from_checkpoint(fold.checkpoint, device, unsafe_load, **predictor_kwargs)
        predict_folder(predictor, [p for c in val for p in c.images], pred_dir, overwrite=True, fail_fast=True,
                       progress=progress)
        groups[f"fold_{fold.index}"] = [c.name for c in val]
        pairs.update({c.name: (output_path(c, pred_dir), c.label) for c in val})
    return groups, pairs


def _log_summary(summary: dict[str, Any], crossval: Path, postprocessing: str, note: str) -> None:
    """Per class: mean and std of Dice, Boundary IoU, HD95 and NSD, and each fold's mean Dice."""
    for name, entry in summary["classes"].items():
        figures = " | ".join(f"{m} {_num(entry[m]['mean'])} ± {_num(entry[m]['std'])}"
                             for m in ("dice", "boundary_iou", "hd95", "nsd") if m in entry)
        per_fold = ", ".join(f"{g} {_num(c[name]['dice']['mean'])}" for g, c in summary["groups"].items())
        log.info("%s: %s (Dice per fold: %s)", name, figures, per_fold)
    log.info("postprocessing: %s -> %s", postprocessing, crossval / POSTPROCESSING_JSON)
    if note:
        log.warning("cross-validation of %s", note)


def _num(x: float | str) -> str:
    return x if isinstance(x, str) else f"{x:.4f}"


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m seg.crossval",
                                description="Summarise a cross-validation (train_seg.py --set data.fold=all)")
    p.add_argument("folder", help="the cross-validation folder (its fold_<k>/last.pt)")
    p.add_argument("--finished-only", action="store_true",
                   help="summarise the finished folds when others are missing or unfinished")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP, help="sliding-window overlap in [0, 1)")
    p.add_argument("--tta", action="store_true", help="mirror test-time augmentation")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="windows per network call")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_common_flags(p, unsafe_load=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exit status 0, 2 for input errors (one line), 1 for a bug (traceback)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")

    def body() -> int:
        summarise(args.folder, args.finished_only, resolve_device(args.device), not args.no_progress, args.unsafe_load,
                  overlap=args.overlap, tta=args.tta, batch_size=args.batch_size)
        print(f"cross-validation summary: {Path(args.folder) / CROSSVAL_DIR / 'index.html'}")
        return 0
    return run_cli(body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
