"""Postprocessing chosen by the cross-validation: keep only the largest connected component.

nnU-Net's rule (v2's ``determine_postprocessing``), written anew: on the cross-validation's
predictions, "keep only the largest connected component" is tried first for the foreground as a
whole (every foreground label as one mask; its voxels outside the largest component become
background) and adopted when it raises the mean over the classes of their mean Dice and lowers no
class's mean Dice; then, on top of that decision, for each class alone, adopted when it raises that
class's mean Dice.  "Raises" is strict: on a tie the predictions stay as they are.  A class's mean
Dice is over the cases, a case where both masks are empty left out (as the evaluation does).

A class's step changes only its own voxels, so each class's decision depends on the foreground
decision and not on the other classes': one pass over the cases computes every figure
(``case_dice``), and ``decide`` draws the decisions from them.

Connected components: ``scipy.ndimage.label`` with full connectivity (voxels touching by a face, an
edge or a corner: 8 neighbours in 2D, 26 in 3D), as nnU-Net (``skimage.measure.label`` with its
default, full connectivity, in ``acvl_utils``); components of the same, largest size are all kept,
as there.  Label maps hold the training files' label values; any number of dimensions.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from seg import io
from seg.errors import DataError
from seg.files import write_bytes_atomic
from seg.metrics import dice

POSTPROCESSING_JSON = "postprocessing.json"
CROSSVAL_DIR = "crossval"
#: the Dice of each class under each variant of ``case_dice``
VARIANTS = ("none", "none+class", "foreground", "foreground+class")
RULE = ("nnU-Net's: keep the largest connected component (full connectivity) of the foreground as a whole "
        "when the mean over the classes of their mean Dice rises strictly and no class falls; then, on top, "
        "of each class alone when its mean Dice rises strictly")


@dataclasses.dataclass(frozen=True)
class Postprocessing:
    """What to do to a label map (in the training files' values).

    Attributes:
        foreground: keep only the largest component of the foreground as a whole (first).
        labels: label values whose largest component alone is kept (then, in this order).
        source: the file it was read from, if any.
    """

    foreground: bool = False
    labels: tuple[int, ...] = ()
    source: str | None = None

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """``labels`` postprocessed (the input is not changed; returned as it is when there is no step)."""
        out = keep_largest(labels) if self.foreground else labels
        for value in self.labels:
            out = keep_largest(out, (value,))
        return out

    def describe(self) -> str:
        steps = (["the foreground's largest component"] if self.foreground else []) + \
            [f"the largest component of label {v}" for v in self.labels]
        return "keep " + ", then ".join(steps) if steps else "nothing (no step raised the Dice)"


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The voxels of the largest connected component(s) of boolean ``mask`` (full connectivity;
    components of the same, largest size all kept)."""
    components, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if n <= 1:
        return mask.astype(bool, copy=True)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return (sizes == sizes.max())[components]


def keep_largest(labels: np.ndarray, values: Sequence[int] | None = None) -> np.ndarray:
    """``labels`` (a copy) with the voxels of ``values`` (None: every non-zero value, the foreground)
    outside their largest connected component set to 0."""
    mask = labels != 0 if values is None else np.isin(labels, values)
    out = labels.copy()
    out[mask & ~largest_component(mask)] = 0
    return out


def case_dice(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int]) -> dict[str, list[float]]:
    """Dice of each label of one case under each of ``VARIANTS``: the prediction as it is ('none'),
    after the foreground step ('foreground'), and either followed by the label's own step ('+class')."""
    after_fg = keep_largest(pred)
    out: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for lab in labels:
        ref_mask = ref == lab
        for name, mask in (("none", pred == lab), ("foreground", after_fg == lab)):
            out[name].append(dice(mask, ref_mask))
            out[name + "+class"].append(dice(largest_component(mask), ref_mask))
    return out


def _mean(values: np.ndarray) -> float:
    """Mean of the values that are not NaN (NaN when there are none)."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else math.nan


def decide(per_case: Sequence[Mapping[str, Sequence[float]]], labels: Sequence[int],
           names: Sequence[str]) -> tuple[Postprocessing, dict[str, Any]]:
    """The postprocessing of the module's rule, and its record (``postprocessing.json``).

    Args:
        per_case: ``case_dice`` of every case.
        labels: the foreground label values, in the order of ``case_dice``.
        names: their class names.
    """
    means = {v: [_mean(np.array([c[v][i] for c in per_case], dtype=float)) for i in range(len(labels))]
             for v in VARIANTS}
    before, fg = np.array(means["none"]), np.array(means["foreground"])
    foreground = bool(_mean(fg) > _mean(before) and not np.any(fg < before))
    base = "foreground" if foreground else "none"
    adopted = [means[base + "+class"][i] > means[base][i] for i in range(len(labels))]
    classes = {name: {"label": int(lab), "dice_before": means["none"][i], "dice_after_foreground_step":
                      means["foreground"][i], "dice_after_class_step": means[base + "+class"][i],
                      "class_step_adopted": adopted[i],
                      "dice_after": means[base + "+class"][i] if adopted[i] else means[base][i]}
               for i, (lab, name) in enumerate(zip(labels, names))}
    record = {"rule": RULE, "n_cases": len(per_case), "keep_largest_foreground": foreground,
              "keep_largest_labels": [int(lab) for lab, a in zip(labels, adopted) if a],
              "foreground": {"mean_dice_before": _mean(before), "mean_dice_after": _mean(fg),
                             "adopted": foreground},
              "classes": classes}
    return Postprocessing(foreground, tuple(record["keep_largest_labels"])), record


def write_record(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """``record`` as JSON (NaN, a class never present in a case, as null), atomically."""
    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return None if isinstance(x, float) and math.isnan(x) else x
    return write_bytes_atomic(path, json.dumps(plain(record), indent=2) + "\n")


def read_postprocessing(path: str | os.PathLike) -> Postprocessing:
    """The postprocessing a ``postprocessing.json`` says (``decide``'s record).

    Raises:
        DataError: unreadable JSON, or its two fields missing or malformed (the message names the file).
    """
    record = io.read_json(path, POSTPROCESSING_JSON)
    fg = record.get("keep_largest_foreground") if isinstance(record, dict) else None
    labels = record.get("keep_largest_labels") if isinstance(record, dict) else None
    if not isinstance(fg, bool) or not isinstance(labels, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in labels):
        raise DataError("needs 'keep_largest_foreground' (true or false) and 'keep_largest_labels' (a list "
                        "of label values > 0)", path)
    return Postprocessing(fg, tuple(labels), str(path))


def postprocessing_file(checkpoint: str | os.PathLike) -> Path | None:
    """The ``postprocessing.json`` of the cross-validation a checkpoint file belongs to, if there is one:
    ``RUN/fold_<k>/X.pt`` -> ``RUN/crossval/postprocessing.json``; any other ``DIR/X.pt`` ->
    ``DIR/crossval/postprocessing.json``.  Folders (exports) have none."""
    path = Path(checkpoint)
    if not path.is_file():
        return None
    run = path.parent.parent if fold_index(path.parent.name) is not None else path.parent
    found = run / CROSSVAL_DIR / POSTPROCESSING_JSON
    return found if found.is_file() else None


def fold_index(name: str) -> int | None:
    """k of a fold folder's name ``fold_<k>``, else None."""
    head, _, k = name.partition("_")
    return int(k) if head == "fold" and k.isdigit() else None
