"""Checkpoints: written atomically, self-describing, enough on their own for inference.

A checkpoint is a dict with:
    format_version, model (state dict), model_config (kwargs of ``seg.model.build_model``),
    spatial_dims, patch_size, slice_axis (2D models: the (X, Y, Z) axis sliced along),
    preprocessing (``Preprocessing.to_dict()``), class_names, label_values (the label value of each
    class in the training files, ``data.label_remap`` inverted), in_channels, mirror_axes (of training,
    used by test-time mirroring), plan (``RUN/plan.json``: the fingerprint summary and decisions),
    and, for resuming, optimizer, scheduler, scaler, iteration, rng, best, config.

Everything but the tensors is plain Python (``to_plain``), so ``torch.load(weights_only=True)``
reads a checkpoint without running code from the file.  Files that need full unpickling are loaded
only when the caller opts in (``unsafe_load=True``; ``--unsafe-load`` on the command lines).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seg.errors import UserError
from seg.preprocess import Preprocessing

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
REQUIRED = ("model", "model_config", "spatial_dims", "patch_size", "preprocessing", "class_names")

# The only non-tensor classes ``weights_only`` loading admits: NumPy's RNG state as checkpoints
# written before it was stored as a list held it (a uint32 array).  Arrays are rebuilt from raw
# bytes; no constructor of the file's choosing runs.
_numpy_core = getattr(np, "_core", None) or np.core
SAFE_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType, _numpy_core.multiarray._reconstruct]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def to_plain(obj: Any) -> Any:
    """``obj`` as plain Python data (dict, list, tuple, str, int, float, bool, None; tensors kept):
    NumPy scalars and arrays, paths, enums and named tuples become their plain equivalents."""
    if isinstance(obj, dict):
        return {to_plain(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v) for v in obj]
        return tuple(items) if type(obj) is tuple else items
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    for kind in (bool, int, float, str):  # subclasses (IntEnum, StrEnum) pickle by class name
        if isinstance(obj, kind):
            return kind(obj)
    if obj is None or isinstance(obj, torch.Tensor):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (plain data only): {obj!r}")


def torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu",
               unsafe_load: bool = False, what: str = "checkpoint") -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors, plain containers and ``SAFE_GLOBALS``).

    A file that needs other Python objects raises a UserError naming them and the opt-in, unless
    ``unsafe_load``: then it is unpickled in full (which runs code stored in the file), with a warning.

    Raises:
        UserError: the file is unreadable, or needs full unpickling and ``unsafe_load`` is False.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        needs = _unsafe_globals(path) or [_first_reason(exc)]
    except Exception as exc:  # noqa: BLE001 - truncated zip, not a torch file, ...: unusable
        raise UserError(f"not a readable {what} ({type(exc).__name__}: {_first_reason(exc)})", path) from exc
    if not unsafe_load:
        raise UserError(f"cannot be loaded safely: it holds Python objects beyond tensors and plain "
                        f"data ({', '.join(needs[:3])}), and unpickling them can run arbitrary code. "
                        f"If you trust this file, load it with --unsafe-load (unsafe_load=True)", path)
    logger.warning("%s: unpickled in full (--unsafe-load); this runs code stored in the file", path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"not a readable {what} ({type(exc).__name__}: {_first_reason(exc)})", path) from exc


def _unsafe_globals(path: Path) -> list[str]:
    """The classes and functions a zip-format torch file needs beyond the safe set ([] if unknown)."""
    safe = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in safe]
    except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be inspected
        return []


def _first_reason(exc: BaseException) -> str:
    """The informative line of a (possibly long, multi-line) torch.load error."""
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    hits = [l for l in lines if "GLOBAL" in l or "allowlisted" in l or "Unsupported" in l]
    return (hits or lines or [type(exc).__name__])[0][:300]


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    unsafe_load: bool = False) -> dict:
    """Read and check a checkpoint (``torch_load``); bad files raise a one-line UserError naming the
    file; ``unsafe_load`` admits files that need full unpickling (trusted files only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError("checkpoint not found", path)
    ckpt = torch_load(path, map_location, unsafe_load)
    missing = [k for k in REQUIRED if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"not a segmentation checkpoint (missing {', '.join(missing)})", path)
    return ckpt


def model_config_from(cfg: Any) -> dict[str, Any]:
    """Map the hparam ``Config`` to the JSON-friendly kwargs of ``seg.model.build_model``."""
    d, m = cfg.data, cfg.model
    if isinstance(d.in_channels, str):
        raise ValueError("data.in_channels is 'auto': describe the data first (seg.train.described_config)")
    dims = d.spatial_dims
    pointrend = dataclasses.asdict(m.pointrend) if m.pointrend.enabled else None
    return to_plain({
        "spatial_dims": dims,
        "in_channels": d.in_channels,
        "num_classes": d.num_classes,
        "backbone": m.backbone,
        "backbone_kwargs": dict(m.backbone_kwargs),
        "head": m.head,
        "head_kwargs": dict(m.head_kwargs),
        "pointrend": pointrend,
    })


def label_values_from(label_remap: dict[int, int] | None, num_classes: int) -> list[int]:
    """The label value of each class index in the training files: the inverse of
    ``data.label_remap`` ({file value: class index}); indices no remap targets keep their value.

    >>> label_values_from({255: 1}, 2), label_values_from({4: 2}, 3), label_values_from({1: 2, 2: 1}, 3)
    ([0, 255], [0, 1, 4], [0, 2, 1])
    """
    values = list(range(num_classes))
    for old, new in reversed(list((label_remap or {}).items())):  # the first source wins
        if 0 <= int(new) < num_classes:
            values[int(new)] = int(old)
    return values


def preprocessing_from(cfg: Any) -> Preprocessing:
    """The ``Preprocessing`` described by the data section of the config."""
    d = cfg.data
    unplanned = [f for f in ("normalization", "target_spacing") if getattr(d, f) == "auto"]
    if unplanned:
        raise ValueError(f"data.{unplanned[0]} is 'auto': resolve the plan first (seg.plan)")
    norm = d.normalization if isinstance(d.normalization, str) else tuple(d.normalization)
    stats = None if d.intensity_stats is None else tuple(dict(x) for x in d.intensity_stats)
    pp = Preprocessing(normalization=norm, intensity_stats=stats, ct_window=tuple(d.ct_window),
                       target_spacing=None if d.target_spacing is None else tuple(d.target_spacing))
    pp.validate()
    return pp


def upgrade_model_config(model_config: dict[str, Any]) -> dict[str, Any]:
    """``model_config`` of a format-1 checkpoint (PointRend options without 'enabled' and
    'in_features', which then meant: on, the stride-4 level) in the current form."""
    out = dict(model_config)
    if out.get("pointrend"):
        out["pointrend"] = {"enabled": True, "in_features": None, **out["pointrend"]}
    return out


@dataclasses.dataclass
class InferenceBundle:
    """Everything inference needs, restored from a checkpoint."""

    model: torch.nn.Module
    spatial_dims: int
    patch_size: tuple[int, ...]
    slice_axis: int | None
    preprocessing: Preprocessing
    class_names: list[str]
    in_channels: int
    mirror_axes: tuple[int, ...] | None = None  # axes mirrored in training (--tta mirrors these)
    label_values: tuple[int, ...] | None = None  # file value of each class index (None: the index)


def inference_bundle(cfg: Any, model: torch.nn.Module) -> InferenceBundle:
    """What inference needs, from a planned config and its model (as a checkpoint would restore it)."""
    d = cfg.data
    return InferenceBundle(
        model=model, spatial_dims=int(d.spatial_dims), patch_size=tuple(int(p) for p in d.patch_size),
        slice_axis=d.slice_axis if d.spatial_dims == 2 else None, preprocessing=preprocessing_from(cfg),
        class_names=list(d.class_names), in_channels=int(d.in_channels),
        mirror_axes=tuple(int(a) for a in d.mirror_axes),
        label_values=tuple(label_values_from(d.label_remap, d.num_classes)))


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu",
                       unsafe_load: bool = False) -> InferenceBundle:
    """Rebuild the model of a checkpoint in eval mode on ``device`` (``unsafe_load``: see
    ``load_checkpoint``)."""
    from seg.model import build_model

    ckpt = load_checkpoint(path, unsafe_load=unsafe_load)
    model = build_model(**upgrade_model_config(ckpt["model_config"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UserError(f"weights do not fit the stored model configuration: {exc}", path) from exc
    model.to(device).eval()
    return InferenceBundle(
        model=model,
        spatial_dims=int(ckpt["spatial_dims"]),
        patch_size=tuple(int(p) for p in ckpt["patch_size"]),
        slice_axis=ckpt.get("slice_axis"),
        preprocessing=Preprocessing.from_dict(ckpt["preprocessing"]),
        class_names=list(ckpt["class_names"]),
        in_channels=int(ckpt["model_config"].get("in_channels", 1)),
        mirror_axes=None if ckpt.get("mirror_axes") is None else tuple(int(a) for a in ckpt["mirror_axes"]),
        label_values=None if ckpt.get("label_values") is None else tuple(int(v) for v in ckpt["label_values"]),
    )
