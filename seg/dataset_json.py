"""What the data say about themselves: nnU-Net's ``dataset.json``, else the label values and channels.

A training run needs the class names, the label value of each class, the number of image channels
and the file pattern.  ``describe_data`` resolves the fields of ``hparam.DataConfig`` that say
``'auto'`` (and checks the ones that do not) from, in this order:

1. **nnU-Net's ``dataset.json``** (``data.dataset_json``: ``'auto'`` reads ``ROOT/dataset.json``
   when it exists, a path reads that file, None ignores it).  ``labels`` (name -> value, in any
   order, with gaps) gives the class names in value order and the label values
   (``{"background": 0, "b": 3, "a": 1}`` -> classes background, a, b with values 0, 1, 3, i.e.
   ``data.label_remap={3: 2}``; outputs are written back in 0, 1, 3); ``channel_names`` the number
   of channels and their names, each meaning nnU-Net's normalisation for it
   (``channel_normalization``: ``CT``, ``noNorm``, ``rescale_to_0_1``, ``rgb_to_0_1``; ``zscore`` and
   every other name z-score); ``file_ending`` the file pattern (``*.nii.gz``).
   A value set in ``hparam.py`` or ``--set`` that disagrees with the file is a one-line
   ``ConfigError`` naming both (set ``data.dataset_json=None`` to ignore the file).
2. **The data themselves**, without a ``dataset.json``: the class names are ``background`` and
   ``label_<value>`` for every other value found in the label maps (0/255 masks train as two
   classes and are written back as 0/255); the channel count is the first case's.

``read_dataset_json`` refuses, in one line naming the file: unreadable JSON (``seg.io.read_json``:
invalid, a key twice, nested too deeply), missing keys, label values that are not distinct integers
from 0 (the background) to ``io.MAX_LABEL_VALUE`` (the largest value a written label map holds),
region-based labels (lists of values) and nnU-Net's ``ignore`` label (not supported), channel keys
that are not 0..C-1, channel names that are not strings, a ``file_ending`` we do not read.
``describe_data`` also refuses label values found in the data, or mapped by ``data.label_remap``,
above ``io.MAX_LABEL_VALUE``.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import numpy as np
from tqdm import tqdm

from seg import io
from seg.errors import ConfigError, DataError
from seg.spec import Labels

logger = logging.getLogger(__name__)

AUTO = "auto"
#: nnU-Net's ``channel_names`` values (compared case-insensitively, as nnU-Net does) and the scheme of
#: ``seg.preprocess`` each one means; every other name means z-score (``ZSCORE``), as in nnU-Net
CHANNEL_NORMALIZATION = {"ct": "ct", "nonorm": "none", "zscore": "zscore", "rescale_to_0_1": "rescale_to_0_1",
                         "rgb_to_0_1": "rgb_to_0_1"}
#: the scheme of a channel named anything else ("MRI", "T1", "ADC"): z-score, whose masking to the non-zero
#: region the plan decides by nnU-Net's crop rule (``seg.plan.plan_normalization``)
ZSCORE = "zscore"
#: more distinct values than this in the label maps is not a label map (a scan in the label folder)
MAX_DISCOVERED_CLASSES = 256


@dataclasses.dataclass(frozen=True)
class DatasetJson:
    """The parts of an nnU-Net ``dataset.json`` training and inference use.

    Attributes:
        path: the file.
        labels: (name, value) pairs sorted by value, background (0) first.
        channel_names: one name per channel, in channel order.
        file_ending: the image and label file extension, e.g. '.nii.gz'.
        num_training: ``numTraining`` (None when absent).
    """

    path: Path
    labels: tuple[tuple[str, int], ...]
    channel_names: tuple[str, ...]
    file_ending: str
    num_training: int | None = None

    @property
    def class_names(self) -> list[str]:
        return [name for name, _ in self.labels]

    @property
    def label_values(self) -> list[int]:
        return [value for _, value in self.labels]

    @property
    def label_remap(self) -> dict[int, int] | None:
        """{file value: class index} for the values that are not their own index (None: none)."""
        return Labels(tuple(self.class_names), tuple(self.label_values)).remap

    @property
    def pattern(self) -> str:
        return "*" + self.file_ending


def label_values(label: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a label array (a bincount for compact integer ranges)."""
    if label.dtype.kind in "iub" and label.size:
        lo, hi = int(label.min()), int(label.max())
        if hi - lo < 1 << 20:
            counts = np.bincount((label.ravel().astype(np.int64) - lo))
            return np.flatnonzero(counts) + lo
    return np.unique(label)


def read_dataset_json(path: str | Path) -> DatasetJson:
    """Read and check an nnU-Net ``dataset.json`` (module docstring).

    Raises:
        DataError: one line naming the file and the problem.
    """
    path = Path(path)
    raw = io.read_json(path, "dataset.json")
    if not isinstance(raw, dict):
        raise DataError("dataset.json must hold a JSON object", path)
    missing = [k for k in ("labels", "channel_names", "file_ending") if k not in raw]
    if missing:
        raise DataError(f"dataset.json lacks {', '.join(repr(k) for k in missing)} (nnU-Net v2 format)", path)
    labels, channels, ending = raw["labels"], raw["channel_names"], raw["file_ending"]
    if not isinstance(labels, dict) or len(labels) < 2:
        raise DataError("'labels' must map at least two names (background first) to label values", path)
    if "ignore" in labels:
        raise DataError("has an 'ignore' label (nnU-Net's sparse annotations): not supported; drop it "
                        "and label those voxels", path)
    regions = [n for n, v in labels.items() if isinstance(v, (list, tuple))]
    if regions:
        raise DataError(f"label {regions[0]!r} is a region (a list of values): region-based training is "
                        "not supported; give each label one integer value", path)
    bad = [n for n, v in labels.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise DataError(f"label {bad[0]!r} has value {io.short_repr(labels[bad[0]])}: label values must be "
                        "integers >= 0", path)
    big = [n for n, v in labels.items() if v > io.MAX_LABEL_VALUE]
    if big:
        raise DataError(f"label {big[0]!r} has value {labels[big[0]]}: the label maps we write hold at most "
                        f"{io.MAX_LABEL_VALUE} (uint16)", path)
    pairs = sorted(((str(n), int(v)) for n, v in labels.items()), key=lambda p: p[1])
    values = [v for _, v in pairs]
    if len(set(values)) != len(values):
        dup = next(v for v in values if values.count(v) > 1)
        names = [n for n, v in pairs if v == dup]
        raise DataError(f"labels {names[0]!r} and {names[1]!r} share the value {dup}", path)
    if values[0] != 0:
        raise DataError(f"has no label with value 0 (the background; lowest is {pairs[0][0]!r} = "
                        f"{values[0]})", path)
    if not isinstance(channels, dict) or not channels:
        raise DataError("'channel_names' must map channel indices '0', '1', ... to names", path)
    names = [k for k, v in channels.items() if not isinstance(v, str)]
    if names:
        raise DataError(f"'channel_names' entry {names[0]!r} is {io.short_repr(channels[names[0]])}: channel "
                        "names must be strings", path)
    try:
        order = sorted((int(k), v) for k, v in channels.items())
    except ValueError:
        raise DataError(f"'channel_names' keys must be channel indices, got {io.short_repr(sorted(channels))}",
                        path) from None
    if [k for k, _ in order] != list(range(len(order))):
        raise DataError(f"'channel_names' keys must be 0..{len(order) - 1}, got "
                        f"{', '.join(str(k) for k, _ in order)}", path)
    if not isinstance(ending, str) or not ending.startswith(".") or ending.lower() not in io.IMAGE_EXTENSIONS:
        raise DataError(f"'file_ending' {io.short_repr(ending)} is not a format we read "
                        f"({', '.join(io.IMAGE_EXTENSIONS)})", path)
    n = raw.get("numTraining")
    return DatasetJson(path, tuple(pairs), tuple(v for _, v in order), ending,
                       int(n) if isinstance(n, int) and not isinstance(n, bool) else None)


def dataset_json_path(data_cfg: Any, root: Path) -> Path | None:
    """The ``dataset.json`` a run reads: ``data.dataset_json`` ('auto': ``root/dataset.json`` when it
    exists; a path, relative to ``root``; None: none).

    Raises:
        ConfigError: an explicit path that does not exist.
    """
    setting = getattr(data_cfg, "dataset_json", AUTO)
    if setting is None:
        return None
    if setting == AUTO:
        path = root / "dataset.json"
        return path if path.is_file() else None
    path = Path(setting) if Path(setting).is_absolute() else root / setting
    if not path.is_file():
        raise ConfigError("data.dataset_json: file not found", path)
    return path


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == AUTO


def _contradiction(field: str, value: Any, dj: DatasetJson, theirs: Any, what: str) -> ConfigError:
    return ConfigError(f"data.{field}={value!r} contradicts {dj.path}: its {what} give {theirs!r}; leave "
                       f"data.{field} at its default to take the file's, or set data.dataset_json=None "
                       "to ignore the file")


def apply_dataset_json(data_cfg: Any, dj: DatasetJson) -> None:
    """Fill the data fields ``dj`` decides into ``data_cfg`` (in place); refuse contradictions.

    Raises:
        ConfigError: ``class_names``, ``label_remap``, ``in_channels``, ``channel_names`` or
            ``pattern`` set to a value that disagrees with ``dj`` (one line naming both).
    """
    d = data_cfg
    if _is_auto(d.class_names):
        d.class_names = dj.class_names
    elif list(d.class_names) != dj.class_names:
        raise _contradiction("class_names", list(d.class_names), dj, dj.class_names, "labels (in value order)")
    if d.label_remap is None:
        d.label_remap = dj.label_remap
    elif remap_for_config(d.label_remap, len(dj.labels)) != remap_for_config(dj.label_remap, len(dj.labels)):
        raise _contradiction("label_remap", d.label_remap, dj, dj.label_remap or {}, "label values")
    if _is_auto(d.in_channels):
        d.in_channels = len(dj.channel_names)
    elif d.in_channels != len(dj.channel_names):
        raise _contradiction("in_channels", d.in_channels, dj, len(dj.channel_names), "channel_names")
    if d.channel_names is None:
        d.channel_names = list(dj.channel_names)
    elif list(d.channel_names) != list(dj.channel_names):
        raise _contradiction("channel_names", list(d.channel_names), dj, list(dj.channel_names), "channel_names")
    if d.pattern == "*":
        d.pattern = dj.pattern
    elif _pattern_extension(d.pattern) not in (None, dj.file_ending.lower()):
        raise _contradiction("pattern", d.pattern, dj, dj.pattern, "file_ending")


def remap_for_config(remap: dict[int, int] | None, num_classes: int) -> dict[int, int]:
    """A label remap without its identity entries (``{0: 0, 3: 2}`` and ``{3: 2}`` are the same map)."""
    return {int(k): int(v) for k, v in (remap or {}).items() if int(k) != int(v) and 0 <= int(v) < num_classes}


def _pattern_extension(pattern: str) -> str | None:
    """The image extension a glob ends with ('*_0000.nii.gz' -> '.nii.gz'), None for '*' or 'case*'."""
    lower = pattern.lower()
    return next((ext for ext in io.IMAGE_EXTENSIONS if lower.endswith(ext)), None)


def discover_classes(label_paths: Sequence[Path], progress: bool = False) -> tuple[list[str], list[int]]:
    """Class names and their label values from the values found in ``label_paths``: background (0)
    and ``label_<value>`` for every other value, in value order.

    Raises:
        DataError: a negative value, one above ``io.MAX_LABEL_VALUE``, or more than
            ``MAX_DISCOVERED_CLASSES`` distinct values.
    """
    found: set[int] = {0}
    for path in tqdm(label_paths, desc="label values", unit="case", disable=not progress or len(label_paths) < 20,
                     leave=False):
        label, _ = io.read_label(path)
        values = label_values(label)
        if values.size and int(values[0]) < 0:
            raise DataError(f"has the negative label value {int(values[0])}: label values must be >= 0 "
                            "(or name the classes in data.class_names with a data.label_remap)", path)
        if values.size and int(values[-1]) > io.MAX_LABEL_VALUE:
            raise DataError(f"has the label value {int(values[-1])}: the label maps we write hold at most "
                            f"{io.MAX_LABEL_VALUE} (uint16); renumber the labels", path)
        found.update(int(v) for v in values)
        if len(found) > MAX_DISCOVERED_CLASSES:
            raise DataError(f"the label maps hold more than {MAX_DISCOVERED_CLASSES} distinct values (up to "
                            f"this file): is an image in the label folder? Name the classes in "
                            "data.class_names", path)
    values = sorted(found)
    return ["background"] + [f"label_{v}" for v in values[1:]], values


def channel_normalization(channel_names: Sequence[str] | None) -> list[str] | None:
    """Per channel, the normalisation scheme its ``dataset.json`` name means in nnU-Net: 'CT' -> 'ct',
    'noNorm' -> 'none', 'rescale_to_0_1', 'rgb_to_0_1', and 'zscore' or any other name -> 'zscore'
    (names compared case-insensitively); None when no channel is named (no ``dataset.json``)."""
    if not channel_names:
        return None
    return [CHANNEL_NORMALIZATION.get(str(n).casefold(), ZSCORE) for n in channel_names]


def describe_data(cfg: Any, root: Path, find_cases: Callable[[Any], Sequence[io.Case]],
                  progress: bool = False, user_set: Collection[str] = frozenset()
                  ) -> tuple[Any, list[tuple[str, Any, str, str]]]:
    """A copy of ``cfg`` with the data description resolved (module docstring), and the
    (field, value, source, why) of each described field: the first rows of the plan table and
    plan.json.

    Args:
        cfg: ``hparam.Config``.
        root: the data root (``data.root`` resolved).
        find_cases: the training and validation cases (with labels) of a config; called, with the
            config as described so far (its file pattern), only when the classes or the channel
            count must be read from the data.
        progress: show a bar while reading label values.
        user_set: the fields the user set (``seg.config.Provenance.user_set``): a described field
            among them is shown as the user's, the others as defaults.

    Raises:
        ConfigError: a contradiction with ``dataset.json`` (``apply_dataset_json``), a
            ``data.label_remap`` mapping a value above ``io.MAX_LABEL_VALUE`` to a class.
        DataError: a bad ``dataset.json`` or label file.
    """
    out = copy.deepcopy(cfg)
    d = out.data
    before = {f: copy.deepcopy(getattr(d, f)) for f in DESCRIBED_FIELDS}
    path = dataset_json_path(d, root)
    d.dataset_json = None if path is None else str(path)  # resolved: the file read, or none
    dj = None
    if path is not None:
        dj = read_dataset_json(path)
        apply_dataset_json(d, dj)
    cases: list[io.Case] = []
    if _is_auto(d.class_names) or _is_auto(d.in_channels):
        cases = list(find_cases(out))
    if _is_auto(d.class_names):
        names, values = discover_classes([c.label for c in cases], progress)
        remap = Labels(tuple(names), tuple(values)).remap
        if d.label_remap is not None and remap_for_config(d.label_remap, len(names)) != remap_for_config(remap, len(names)):
            raise ConfigError(f"data.label_remap={d.label_remap!r} needs explicit data.class_names (with "
                              "class_names 'auto' the classes are the label values found: "
                              f"{', '.join(names)})")
        d.class_names, d.label_remap = names, remap
        found_classes = f"the label values found in {len(cases)} cases (name them in data.class_names)"
    else:
        found_classes = None
    _check_written_values(d)
    channels_found = _is_auto(d.in_channels)
    if channels_found:
        d.in_channels = io.channel_count(cases[0])
    return out, _description(d, before, dj, found_classes, channels_found, user_set)


def _check_written_values(d: Any) -> None:
    """Every class's label value (``data.label_remap`` inverted) fits the label maps we write; a
    ConfigError naming the remap entry before the run, not an error at the first output."""
    top = max(Labels.from_remap(d.class_names, d.label_remap).values)
    if top > io.MAX_LABEL_VALUE:
        raise ConfigError(f"data.label_remap={d.label_remap!r} maps label value {top} to a class: the label "
                          f"maps we write hold at most {io.MAX_LABEL_VALUE} (uint16); renumber the labels")


#: the data fields ``describe_data`` resolves, in the order the plan table shows them
DESCRIBED_FIELDS = ("class_names", "label_remap", "in_channels", "channel_names", "pattern")


#: the value of each described field that leaves it to dataset.json or the data (``apply_dataset_json``)
OPEN_VALUES = {"class_names": AUTO, "label_remap": None, "in_channels": AUTO, "channel_names": None, "pattern": "*"}


def _description(d: Any, before: dict[str, Any], dj: DatasetJson | None, found_classes: str | None,
                 channels_found: bool, user_set: Collection[str]) -> list[tuple[str, Any, str, str]]:
    """(field, value, source, why) of each described field, for the plan table and plan.json."""
    rows = []
    for f in DESCRIBED_FIELDS:
        value, was = getattr(d, f), before[f]
        if f in ("class_names", "label_remap") and found_classes:
            source, why = "data", found_classes
        elif f == "in_channels" and channels_found:
            source, why = "data", "channels of the first case"
        elif dj is not None and was == OPEN_VALUES[f]:
            source, why = "dataset.json", {"class_names": "labels, in value order",
                                           "label_remap": "label values to class indices (gaps closed)",
                                           "in_channels": "channel_names", "channel_names": "channel_names",
                                           "pattern": "file_ending"}[f]
        elif dj is not None:
            source, why = "user", "set in the config (agrees with dataset.json)"
        elif f"data.{f}" not in user_set:
            source, why = "default", "hparam.py's default"
        else:
            source, why = "user", "set in the config"
        if f == "channel_names" and value is None:
            continue
        if f == "label_remap":
            value = None if value is None else {str(k): v for k, v in value.items()}  # JSON keys
        rows.append((f"data.{f}", value, source, why))
    return rows
