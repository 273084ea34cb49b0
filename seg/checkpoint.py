"""Checkpoints, written and read here: self-describing, enough on their own for inference.

A checkpoint is a dict with:
    format_version, model (state dict), model_config (kwargs of ``seg.model.build_model``),
    spatial_dims, patch_size, slice_axis (2D models: the (X, Y, Z) axis sliced along),
    preprocessing (``Preprocessing.to_dict()``), class_names, label_values (the label value of each
    class in the training files, ``data.label_remap`` inverted), in_channels, mirror_axes (of training,
    used by test-time mirroring), plan (``RUN/plan.json``: the fingerprint summary and decisions),
    and, for resuming, optimizer, scheduler, scaler, iteration, rng, best, config, config_source.

Writing: ``checkpoint_state`` (the dict above) and ``save_checkpoint`` (atomic, ``seg.files``).
Reading: ``load_checkpoint`` (checked), ``load_for_inference`` (the model rebuilt), ``restore``
(training state, to resume) and ``resume_config`` (the configuration a resumed run continues with).

Everything but the tensors is plain Python (``to_plain``), so ``torch.load(weights_only=True)``
(``seg.files.torch_load``) reads a checkpoint without running code from the file.  Files that need
full unpickling are loaded only when the caller opts in (``unsafe_load=True``; ``--unsafe-load`` on
the command lines).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from seg.config import RESUME_FIELDS, Provenance, apply_overrides, config_from_dict, override_keys, stored_config
from seg.errors import ConfigError, UserError
from seg.files import to_plain, torch_load, torch_save_atomic
from seg.model import build_model
from seg.spec import InferenceSpec, RunSpec

logger = logging.getLogger(__name__)

#: 2: one learned branch on the input (``seg.model.InputStages``) where format 1 had two (the U-Net
#: head's stride-2 stage and the point head's ``FineStem``); a format-1 model has no format-2 form
FORMAT_VERSION = 2
#: the last commit that writes and reads format-1 checkpoints
FORMAT_1_COMMIT = "b324894"
REQUIRED = ("model", "model_config", "spatial_dims", "patch_size", "preprocessing", "class_names")


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


def check_format(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse, in one line, a checkpoint whose model this version cannot rebuild."""
    version = ckpt.get("format_version")
    if version == FORMAT_VERSION:
        return
    why = (": a format-1 model has two learned input branches where this one has one, so its weights "
           f"do not convert; run it with the version that wrote it (git checkout {FORMAT_1_COMMIT}) "
           "or train it again") if version == 1 else ""
    raise UserError(f"checkpoint format {version}; this version reads {FORMAT_VERSION}{why}", path)


@dataclasses.dataclass
class InferenceBundle:
    """A model ready for inference and its ``InferenceSpec`` (whose fields it shows as its own:
    ``bundle.patch_size`` is ``bundle.spec.patch_size``)."""

    model: Any  # torch.nn.Module, or an exported network (seg.export)
    spec: InferenceSpec

    def __getattr__(self, name: str) -> Any:
        if name == "spec":  # not yet set (copying): no recursion
            raise AttributeError(name)
        return getattr(self.spec, name)


def inference_bundle(spec: RunSpec, model: torch.nn.Module) -> InferenceBundle:
    """What inference needs, from a run and its model (as a checkpoint would restore it)."""
    return InferenceBundle(model, spec.inference)


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu",
                       unsafe_load: bool = False) -> InferenceBundle:
    """Rebuild the model of a checkpoint in eval mode on ``device`` (``unsafe_load``: see
    ``load_checkpoint``)."""
    ckpt = load_checkpoint(path, unsafe_load=unsafe_load)
    check_format(ckpt, path)
    spec = InferenceSpec.from_dict(ckpt, ckpt["model_config"])
    model = build_model(**spec.model_config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UserError(f"weights do not fit the stored model configuration: {exc}", path) from exc
    return InferenceBundle(model.to(device).eval(), spec)


# ----------------------------------------------------------------------------- writing
def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain Python (NumPy's key array as a list), so that
    checkpoints load with ``weights_only=True``."""
    state = {"python": random.getstate(), "numpy": to_plain(np.random.get_state()),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(state["python"]))
    np.random.set_state(tuple(state["numpy"]))  # older checkpoints: the key as an array
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # as many devices as are visible now
        for i, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)


def checkpoint_state(spec: RunSpec, model, optimizer, scheduler, scaler, iteration: int, best: float
                     ) -> dict[str, Any]:
    """The checkpoint of a training run at ``iteration`` (module docstring), the RNG states included."""
    source = spec.provenance.source if spec.provenance is not None else None
    return {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        **to_plain({  # plain data only: the file loads with weights_only=True (torch_load)
            **spec.inference.to_dict(),
            "plan": spec.plan,
            "iteration": iteration,
            "best": best,
            "config": stored_config(spec.config),
            "config_source": None if source is None else os.path.abspath(source),
        }),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
    }


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` (``checkpoint_state``) to ``path`` atomically."""
    return torch_save_atomic(state, path)


# ----------------------------------------------------------------------------- resuming
def restore(path: str, model, optimizer, scheduler, scaler, unsafe_load: bool = False,
            ckpt: dict | None = None) -> tuple[int, float]:
    """Load model, optimiser, scheduler, scaler and RNG states; return (iteration, best).
    ``ckpt``: the checkpoint of ``path`` if already read; ``unsafe_load``: see ``load_checkpoint``."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(path, unsafe_load=unsafe_load)
    check_format(ckpt, path)
    for name, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler),
                      ("scaler", scaler)):
        if name not in ckpt:
            raise UserError(f"cannot resume: checkpoint has no {name} state", path)
        try:
            obj.load_state_dict(ckpt[name])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"cannot resume: {name} state does not fit this configuration ({exc})",
                            path) from exc
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    return int(ckpt["iteration"]), float(ckpt.get("best", -1.0))


def resume_config(template: Any, checkpoint: str, overrides: Sequence[str], unsafe_load: bool = False
                  ) -> tuple[Any, Provenance]:
    """The configuration a run resumed from ``checkpoint`` continues with: the run's own (stored in
    the checkpoint), with ``overrides`` limited to ``RESUME_FIELDS``; and its provenance (the run's
    config file, the fields ``overrides`` set).

    Raises:
        ConfigError: an override of another field, or a ``train.iterations`` the run has reached.
    """
    ckpt = load_checkpoint(checkpoint, unsafe_load=unsafe_load)
    check_format(ckpt, checkpoint)
    if "config" not in ckpt or "iteration" not in ckpt:
        raise ConfigError("cannot resume: the checkpoint holds no training state (config, iteration)",
                          checkpoint)
    cfg = config_from_dict(template, ckpt["config"], checkpoint)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key not in RESUME_FIELDS:
            raise ConfigError(f"--set {key} with --resume: a resumed run keeps its own configuration; "
                              f"only {' and '.join(RESUME_FIELDS)} may change")
    apply_overrides(cfg, overrides)
    cfg.train.output_dir = str(Path(checkpoint).parent)  # the run continues in its own folder
    done = int(ckpt["iteration"])
    if cfg.train.iterations is not None and cfg.train.iterations <= done:
        raise ConfigError(f"the run is at iteration {done}: to continue it, set train.iterations above "
                          f"that (--set train.iterations=N)", checkpoint)
    return cfg, Provenance(ckpt.get("config_source") or None, override_keys(overrides))
