"""Checkpoints: written atomically, self-describing, enough on their own for inference.

A checkpoint is a dict with:
    format_version, model (state dict), model_config (kwargs of ``seg.model.build_model``),
    spatial_dims, patch_size, slice_axis (2D models: the (X, Y, Z) axis sliced along),
    preprocessing (``Preprocessing.to_dict()``), class_names, in_channels, mirror_axes (of training,
    used by test-time mirroring), plan (``RUN/plan.json``: the fingerprint summary and decisions),
    and, for resuming, optimizer, scheduler, scaler, iteration, rng, best, config.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from seg.errors import UserError
from seg.preprocess import Preprocessing

FORMAT_VERSION = 1
REQUIRED = ("model", "model_config", "spatial_dims", "patch_size", "preprocessing", "class_names")


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


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read and check a checkpoint; bad files raise a one-line UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError("checkpoint not found", path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise UserError(f"not a readable checkpoint ({type(exc).__name__}: {exc})", path) from exc
    missing = [k for k in REQUIRED if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"not a segmentation checkpoint (missing {', '.join(missing)})", path)
    return ckpt


def model_config_from(cfg: Any) -> dict[str, Any]:
    """Map the hparam ``Config`` to the JSON-friendly kwargs of ``seg.model.build_model``."""
    d, m = cfg.data, cfg.model
    dims = d.spatial_dims
    pointrend = dataclasses.asdict(m.pointrend) if m.pointrend.enabled else None
    return {
        "spatial_dims": dims,
        "in_channels": d.in_channels,
        "num_classes": d.num_classes,
        "backbone": m.backbone,
        "backbone_kwargs": dict(m.backbone_kwargs),
        "head": m.head,
        "head_kwargs": dict(m.head_kwargs),
        "pointrend": pointrend,
    }


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


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu") -> InferenceBundle:
    """Rebuild the model of a checkpoint in eval mode on ``device``."""
    from seg.model import build_model

    ckpt = load_checkpoint(path)
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
    )
