"""Finding training cases on disk: images paired with label maps BY NAME, and seeded splits.

Cases and their names come from ``seg.io.image_cases`` (the rule inference and evaluation use too):
a file is a case named like the file without extension, except nnU-Net channel files ``name_0000``,
``name_0001``, ... which form one multi-channel case ``name`` when ``name_0000`` exists.  Each case
is paired with the label map of its name (``images/brain1.nrrd`` + ``labels/brain1.nii.gz``,
``la_003_0000.nii.gz`` + ``la_003_0001.nii.gz`` + ``labels/la_003.nii.gz``; extensions may differ),
never by sort order.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from seg import io
from seg.errors import DataError, UserError
from seg.io import Case

log = logging.getLogger(__name__)


def find_cases(images_dir: str | Path, labels_dir: str | Path, pattern: str = "*") -> list[Case]:
    """Pair the images of ``images_dir`` with the label maps of ``labels_dir`` by name.

    Args:
        images_dir: folder of images (.nii.gz .nii .nrrd .nhdr .mha .mhd .png); nnU-Net ``_0000``
            channel files are grouped into one case.
        labels_dir: folder of label maps, one per case, named like the case.
        pattern: glob applied to image file names.

    Returns:
        The cases sorted by name.

    Raises:
        DataError: a folder is missing or has no images, an image has no label, names are ambiguous.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    if not images_dir.is_dir():
        raise DataError("image folder not found", images_dir)
    groups: dict[str, list[Case]] = {}
    for case in io.image_cases(images_dir, pattern):
        groups.setdefault(case.name, []).append(case)
    labels = io.label_files(labels_dir)
    cases = [_labelled(name, same, labels, labels_dir) for name, same in sorted(groups.items())]
    orphans = sorted(set(labels) - set(groups))
    if orphans:
        log.warning("%d label file(s) in %s have no image and are ignored: %s", len(orphans), labels_dir,
                    ", ".join(labels[n].name for n in orphans[:5]) + (" ..." if len(orphans) > 5 else ""))
    return cases


def _labelled(name: str, same: list[Case], labels: dict[str, Path], labels_dir: Path) -> Case:
    """The one image case called ``name`` with its label map; a DataError naming the files else."""
    files = [p for c in same for p in c.images]
    if len(same) > 1:
        raise DataError(f"several image files for case {name!r} ({', '.join(p.name for p in files)}): "
                        f"keep one, or name channel files {name}_0000, {name}_0001, ...", files[0])
    if name not in labels:
        raise DataError(f"no label map named {name!r} (any image extension) in {labels_dir}; labels are "
                        f"paired with images by name{_channels_hint(name, files)}", files[0])
    return Case(name, same[0].images, labels[name])


def _channels_hint(name: str, files: list[Path]) -> str:
    """Why several files became one case, and how to name one-channel cases that end in _0000."""
    if len(files) == 1:
        return ""
    stem, ext = io.split_extension(files[0])
    shown = ", ".join(p.name for p in files[:3]) + (" ..." if len(files) > 3 else "")
    return (f" ({shown} are the channels of one case {name!r} because {files[0].name} exists; name "
            f"one-channel images <case>_0000, e.g. {stem}_0000{ext})")


def split_cases(cases: Sequence[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Seeded case-level split into (train, validation), at least one case in each.

    The split depends only on the case names, ``val_fraction`` and ``seed`` (not on the input order).

    Raises:
        UserError: fewer than two cases.
    """
    ordered = sorted(cases, key=lambda c: c.name)
    n = len(ordered)
    if n < 2:
        raise UserError(f"{n} case(s) found: a validation split needs at least 2 (or set "
                        "data.val_images_dir and data.val_labels_dir)")
    n_val = min(n - 1, max(1, int(round(n * val_fraction))))
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[:n_val].tolist())
    train = [c for i, c in enumerate(ordered) if i not in val_idx]
    val = [c for i, c in enumerate(ordered) if i in val_idx]
    return train, val


def kfold_split(names: Sequence[str], seed: int, folds: int = 5) -> list[dict[str, list[str]]]:
    """A cross-validation split when there is no split file: the cases shuffled (seeded) and dealt into
    ``folds`` validation sets (nnU-Net makes 5; fewer when there are fewer cases), each fold training on
    the others; in the split file's form ``[{"train": [...], "val": [...]}, ...]``.  It depends on the
    names and ``seed`` only, not on their order.

    Raises:
        UserError: fewer than two cases.
    """
    ordered = sorted(names)
    if len(ordered) < 2:
        raise UserError(f"{len(ordered)} case(s) found: a cross-validation needs at least 2")
    split = []
    for part in np.array_split(np.random.default_rng(seed).permutation(len(ordered)), min(folds, len(ordered))):
        val = set(part.tolist())
        split.append({"train": [n for i, n in enumerate(ordered) if i not in val],
                      "val": [n for i, n in enumerate(ordered) if i in val]})
    return split


def split_from_file(cases: Sequence[Case], path: str | Path, fold: int) -> tuple[list[Case], list[Case]]:
    """(train, validation) cases of ``fold`` of an nnU-Net-style split file.

    The file is a JSON list of folds, each ``{"train": [case names], "val": [case names]}`` (nnU-Net's
    ``splits_final.json``).

    Raises:
        DataError: one line naming the file: unreadable JSON (``seg.io.read_json``), no such fold, a
            list that is not a list of case names (strings), a name twice in the fold, a name with no
            case, an empty list.
    """
    path = Path(path)
    folds = io.read_json(path, "the split file")
    if not isinstance(folds, list):
        raise DataError('must hold a JSON list of folds, each {"train": [case names], "val": [case names]}', path)
    if not 0 <= fold < len(folds) or not isinstance(folds[fold], dict):
        raise DataError(f"has no fold {fold} with 'train' and 'val' lists ({len(folds)} fold(s); set data.fold)",
                        path)
    train_names, val_names = (_split_names(folds[fold], key, fold, path) for key in ("train", "val"))
    seen: dict[str, str] = {}
    for key, names in (("train", train_names), ("val", val_names)):
        for name in names:
            if name in seen:
                where = f"twice in '{key}'" if seen[name] == key else "in both 'train' and 'val'"
                raise DataError(f"fold {fold} lists case {name!r} {where}: each case once per fold", path)
            seen[name] = key
    by_name = {c.name: c for c in cases}
    for key, names in (("train", train_names), ("val", val_names)):
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DataError(f"fold {fold} '{key}' names {len(missing)} case(s) that are not among the "
                            f"{len(by_name)} cases found (images with labels), e.g. {missing[0]!r}", path)
    return [by_name[n] for n in sorted(train_names)], [by_name[n] for n in sorted(val_names)]


def _split_names(fold_dict: dict, key: str, fold: int, path: Path) -> list[str]:
    """The non-empty list of case names under ``key`` of a fold; a DataError naming the file else."""
    names = fold_dict.get(key)
    if not isinstance(names, list) or not names:
        raise DataError(f"fold {fold} needs a non-empty '{key}' list of case names, got "
                        f"{io.short_repr(names)}", path)
    bad = next((n for n in names if not isinstance(n, str)), None)
    if bad is not None:
        raise DataError(f"fold {fold} '{key}' holds {io.short_repr(bad)}: case names must be strings", path)
    return names
