"""Load pretrained (usually 2D, RGB) weights into any backbone, 2D or 3D, any ``in_chans``.

Steps of ``load_pretrained``:
    1. read the file (``torch.load`` or ``.safetensors``) and unwrap common wrappers;
    2. rename keys with the architecture module's ``checkpoint_filter_fn(state_dict, model)``
       (official and timm layouts -> ours; architecture-specific reshapes live there too);
    3. adapt shapes generically: 2D conv kernels -> 3D (``inflate_conv_weight``) and the stem conv
       (``model.stem_key``) to the model's input channels (``adapt_input_conv``);
    4. load strictly: missing, unexpected or ill-fitting keys raise a UserError listing them.

Files are read with ``torch.load(weights_only=True)`` (``seg.files.torch_load``); one that needs
full unpickling is refused unless the caller passes ``unsafe_load=True``.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from seg.errors import UserError
from seg.files import torch_load

__all__ = ["LoadReport", "adapt_input_conv", "inflate_conv_weight", "load_pretrained",
           "read_state_dict"]

logger = logging.getLogger(__name__)

_WRAPPERS = ("state_dict", "model_state_dict", "model", "module")
_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadReport:
    """What ``load_pretrained`` did.

    Attributes:
        path: the checkpoint file.
        loaded: number of tensors loaded.
        adapted: key -> description of the shape adaptation applied to it.
    """

    path: str
    loaded: int
    adapted: dict[str, str] = field(default_factory=dict)


def inflate_conv_weight(weight: torch.Tensor, depth: int, mode: str = "center") -> torch.Tensor:
    """Turn a 2D conv kernel into a 3D one with ``depth`` taps along the new first spatial axis.

    Args:
        weight: (O, I, kH, kW) 2D kernel.
        depth: kernel size kD of the 3D conv.
        mode: "center": the 2D kernel at tap ``depth // 2`` (the centre; for even ``depth`` the
            later of the two middle taps), zeros elsewhere -- a 3D conv then reproduces the 2D conv
            on every slice of a volume of identical slices, even with zero padding in depth.
            "mean": ``weight / depth`` at every tap (I3D); sums over depth to the 2D kernel.

    Returns:
        (O, I, kD, kH, kW) kernel.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a 2D conv kernel (O, I, kH, kW), got {tuple(weight.shape)}")
    if mode == "center":
        out = weight.new_zeros(weight.shape[:2] + (depth,) + weight.shape[2:])
        out[:, :, depth // 2] = weight
        return out
    if mode == "mean":
        # (O, I, kH, kW) -> (O, I, 1, kH, kW) -> (O, I, kD, kH, kW)
        return (weight / depth).unsqueeze(2).expand(-1, -1, depth, -1, -1).clone()
    raise ValueError(f"unknown inflation mode {mode!r}; choose 'center' or 'mean'")


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a first-conv kernel (O, I, *k) trained on I input channels to ``in_chans``.

    timm's convention: for 1 channel sum over the I channels (a grey image fed as I identical
    channels gives the same output); otherwise repeat the channels cyclically to ``in_chans`` and
    scale by ``I / in_chans`` (keeps the output magnitude; exact for a constant image when
    ``in_chans`` is a multiple of I).

    Returns:
        (O, in_chans, *k) kernel.
    """
    src = weight.shape[1]
    if in_chans == src:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)  # (O, I, *k) -> (O, 1, *k)
    reps = -(-in_chans // src)
    tiled = weight.repeat(1, reps, *([1] * (weight.ndim - 2)))  # (O, reps * I, *k)
    return tiled[:, :in_chans] * (src / in_chans)  # (O, in_chans, *k)


def read_state_dict(path: str | os.PathLike, unsafe_load: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and unwrap it to a flat ``{key: tensor}`` state dict.

    Accepts ``torch.save`` files (read with ``weights_only=True``; a file that needs full
    unpickling raises a UserError unless ``unsafe_load``, which runs code stored in the file) and
    ``.safetensors`` files.  Unwraps ``{'model' | 'state_dict' | 'model_state_dict' | 'module': ...}``
    and strips ``module.`` / ``_orig_mod.`` prefixes.  Bad files raise ``UserError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError("pretrained checkpoint not found", path)
    obj = _read_safetensors(path) if path.suffix == ".safetensors" else \
        torch_load(path, unsafe_load=unsafe_load, what="pretrained checkpoint")
    while isinstance(obj, dict) and not _is_state_dict(obj):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        raise UserError("not a checkpoint: no state dict of tensors found", path)
    return _strip_prefixes(obj)


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                             for k, v in obj.items())


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise UserError("reading .safetensors needs the 'safetensors' package "
                        "(pip install safetensors)", path) from exc
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"not a readable safetensors file ({type(exc).__name__}: {exc})",
                        path) from exc


def _filter_fn(model: nn.Module) -> Callable[[dict, nn.Module], dict]:
    """The ``checkpoint_filter_fn`` of the model's architecture module (identity if none)."""
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", lambda sd, _model: sd)


def adapt_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module, inflate: str = "center"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Inflate 2D conv kernels where the model has 3D ones, and fit the stem to ``in_chans``.

    Returns:
        The adapted state dict and ``{key: description}`` of what was changed.
    """
    ours = model.state_dict()
    stem_key = getattr(model, "stem_key", None)
    out, adapted = dict(state_dict), {}
    for key, value in state_dict.items():
        target = ours.get(key)
        if target is None:
            continue
        notes = []
        if value.ndim == 4 and target.ndim == 5:
            value = inflate_conv_weight(value, target.shape[2], inflate)
            notes.append(f"inflated to depth {target.shape[2]} ({inflate})")
        if key == stem_key and value.ndim == target.ndim and value.shape[1] != target.shape[1]:
            notes.append(f"input channels {value.shape[1]} -> {target.shape[1]}")
            value = adapt_input_conv(value, target.shape[1])
        if notes:
            out[key] = value
            adapted[key] = "; ".join(notes)
    return out, adapted


def _check_fit(state_dict: dict[str, torch.Tensor], model: nn.Module, path: str) -> None:
    """Raise a UserError naming the file and every missing, unexpected or ill-fitting key."""
    ours = model.state_dict()  # persistent entries only: non-persistent buffers are never expected
    missing = [k for k in ours if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in ours]
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
              for k, v in state_dict.items() if k in ours and v.shape != ours[k].shape]
    problems = [f"{title} ({len(keys)}): {', '.join(keys)}" for title, keys in
                (("missing keys", missing), ("unexpected keys", unexpected),
                 ("shape mismatches", shapes)) if keys]
    if problems:
        raise UserError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems), path)


def backbone_part(state_dict: dict[str, torch.Tensor], model: nn.Module
                  ) -> dict[str, torch.Tensor]:
    """The ``backbone.`` entries of a whole segmentation model's state dict (one of our training
    checkpoints: backbone + coarse head + point head), prefix removed; other dicts unchanged."""
    prefix = "backbone."
    if any(k.startswith(prefix) for k in state_dict) and \
            not any(k.startswith(prefix) for k in model.state_dict()):
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def load_pretrained(model: nn.Module, path: str | os.PathLike, inflate: str = "center",
                    unsafe_load: bool = False) -> LoadReport:
    """Load a checkpoint in an official, timm or our own key layout into ``model``.

    A training checkpoint of this project (``runs/.../best.pt``) works too: its backbone part is
    taken, so a model trained on one task initialises the backbone of the next (same family and
    spatial dims; a 2D run's backbone is inflated into a 3D one).

    Args:
        model: a backbone; its architecture module may define ``checkpoint_filter_fn`` and the
            model may name its first conv weight in ``stem_key``.
        path: ``torch.save`` or ``.safetensors`` file.
        inflate: how 2D kernels become 3D: "center" or "mean" (see ``inflate_conv_weight``).
        unsafe_load: admit ``torch.save`` files that need full unpickling (runs code stored in
            the file: trusted files only).

    Returns:
        A ``LoadReport``.

    Raises:
        UserError: the file is missing, is not a checkpoint, cannot be loaded safely, or its keys
            or shapes do not fit the model (all offending keys listed).
    """
    if inflate not in ("center", "mean"):
        raise ValueError(f"unknown inflation mode {inflate!r}; choose 'center' or 'mean'")
    state_dict = backbone_part(read_state_dict(path, unsafe_load), model)
    try:
        state_dict = _filter_fn(model)(state_dict, model)
    except UserError as exc:  # the architecture's filter knows the problem, not the file
        raise exc if exc.path else UserError(str(exc), path) from exc
    state_dict, adapted = adapt_state_dict(state_dict, model, inflate)
    _check_fit(state_dict, model, str(path))
    loaded = len(state_dict)
    for key, value in model.state_dict().items():  # tolerated: BatchNorm step counters
        state_dict.setdefault(key, value)
    model.load_state_dict(state_dict, strict=True)
    report = LoadReport(str(path), loaded, adapted)
    logger.info("loaded %d tensors from %s (%d adapted)", report.loaded, path, len(adapted))
    return report
