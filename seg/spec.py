"""The run specification: a request resolved once, frozen, with where each value came from.

A run starts from the user's request (``hparam.py`` and ``--set``: ``"auto"`` allowed, see
``seg.config.load_request``).  ``seg.train`` describes the data (``seg.dataset_json``) and plans
(``seg.plan``) once, then freezes the result here::

    request --describe + plan--> RunSpec(config, provenance, plan, inference)
                                           |                          |
                     datasets, model, training loop        checkpoint, export, inference

``RunSpec.config`` has no ``"auto"`` left (``resolve`` refuses one) and cannot be changed: assigning a
field raises ``dataclasses.FrozenInstanceError``.  ``InferenceSpec`` is the part inference needs; a
checkpoint stores exactly it (``to_checkpoint``) and inference reads it back (``from_checkpoint``), so
training and inference cannot disagree on the format.  ``Labels`` is the one type of class names and
the label value each class has in the files.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any, Mapping

from backbones import backbone_options
from seg.errors import ConfigError
from seg.files import to_plain
from seg.preprocess import Preprocessing

if TYPE_CHECKING:  # the schema lives in the user's file; only its type is named here
    from hparam import Config

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Labels:
    """Class names (background first) and the label value of each class in the label files."""

    names: tuple[str, ...]
    values: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.values):
            raise ValueError(f"{len(self.names)} class names for {len(self.values)} label values")

    @classmethod
    def from_remap(cls, names: Any, remap: Mapping[int, int] | None) -> "Labels":
        """The classes ``names`` with ``data.label_remap`` ({file value: class index}) inverted:
        indices no remap targets keep their own value; the first value mapped to an index wins.

        >>> Labels.from_remap(["bg", "a"], {255: 1}).values, Labels.from_remap("abc", {1: 2, 2: 1}).values
        ((0, 255), (0, 2, 1))
        """
        values = list(range(len(names)))
        for old, new in reversed(list((remap or {}).items())):
            if 0 <= int(new) < len(names):
                values[int(new)] = int(old)
        return cls(tuple(names), tuple(values))

    @property
    def remap(self) -> dict[int, int] | None:
        """``data.label_remap`` taking these values to the class indices (None: every value is its
        own index)."""
        return {v: i for i, v in enumerate(self.values) if v != i} or None

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def pairs(self) -> list[tuple[str, int]]:
        """(name, value) of each class, background included."""
        return list(zip(self.names, self.values))


@dataclasses.dataclass(frozen=True)
class InferenceSpec:
    """What inference needs besides the weights: how to feed the network and read its output.
    Checkpoints and exports store it as ``to_dict`` (the same keys in both) and read it with
    ``from_dict``.

    Attributes:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        patch_size: the window, (X, Y, Z) in 3D or the two in-plane axes in 2D.
        slice_axis: 2D models: the axis of (X, Y, Z) volumes sliced along (None in 3D).
        preprocessing: how images are brought onto the network's grid and intensities.
        labels: the classes and their values in the label files.
        mirror_axes: axes mirrored in training (``--tta`` mirrors these; None: not recorded).
        model_config: kwargs of ``seg.model.build_model`` (None: an exported network).
    """

    spatial_dims: int
    in_channels: int
    patch_size: tuple[int, ...]
    slice_axis: int | None
    preprocessing: Preprocessing
    labels: Labels
    mirror_axes: tuple[int, ...] | None = None
    model_config: Mapping[str, Any] | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.labels.names)

    @property
    def label_values(self) -> tuple[int, ...]:
        return self.labels.values

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the fields a checkpoint and an export manifest store (``model_config``
        only when there is one)."""
        out = {"spatial_dims": self.spatial_dims, "patch_size": list(self.patch_size), "slice_axis": self.slice_axis,
               "in_channels": self.in_channels, "class_names": list(self.labels.names),
               "label_values": list(self.labels.values),
               "mirror_axes": None if self.mirror_axes is None else list(self.mirror_axes),
               "preprocessing": self.preprocessing.to_dict()}
        if self.model_config is not None:
            out["model_config"] = dict(self.model_config)
        return out

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any], model_config: Mapping[str, Any] | None = None
                  ) -> "InferenceSpec":
        """The spec ``to_dict`` wrote (``model_config``: the stored one upgraded to this version, or
        None).  Files without label values or channels (older checkpoints) mean class indices and
        one channel."""
        names, values, mirror = tuple(stored["class_names"]), stored.get("label_values"), stored.get("mirror_axes")
        channels = stored.get("in_channels", (model_config or {}).get("in_channels", 1))
        return cls(spatial_dims=int(stored["spatial_dims"]), in_channels=int(channels),
                   patch_size=tuple(int(p) for p in stored["patch_size"]), slice_axis=stored.get("slice_axis"),
                   preprocessing=Preprocessing.from_dict(stored["preprocessing"]),
                   labels=Labels(names, tuple(range(len(names))) if values is None else tuple(int(v) for v in values)),
                   mirror_axes=None if mirror is None else tuple(int(a) for a in mirror),
                   model_config=None if model_config is None else dict(model_config))


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A resolved run: its configuration (frozen, no "auto"), the plan record that resolved it
    (``RUN/plan.json``: fingerprint summary and decisions, each with its value, source and reason),
    the request's provenance, and the inference part.

    Attributes:
        config: the resolved configuration (``freeze``d ``hparam.Config``).
        provenance: ``seg.config.Provenance`` of the request.
        plan: the plan record (None: a run resumed from a checkpoint that predates plans).
        inference: what a checkpoint of this run stores for inference.
    """

    config: "Config"
    provenance: Any
    plan: Mapping[str, Any] | None
    inference: InferenceSpec

    @property
    def labels(self) -> Labels:
        return self.inference.labels


def resolve(cfg: Any, provenance: Any, plan: Mapping[str, Any] | None) -> RunSpec:
    """The run specification of ``cfg``, a config with its data described and its plan applied
    (``seg.train``): frozen, and refused while any field is still "auto"."""
    left = still_auto(cfg)
    if left:
        raise ConfigError(f"{', '.join(left)} still 'auto' after describing the data and planning")
    frozen = freeze(cfg)
    d = frozen.data
    inference = InferenceSpec(
        spatial_dims=int(d.spatial_dims), in_channels=int(d.in_channels), patch_size=tuple(int(p) for p in d.patch_size),
        slice_axis=d.slice_axis if d.spatial_dims == 2 else None, preprocessing=preprocessing_from(d),
        labels=Labels.from_remap(d.class_names, d.label_remap), mirror_axes=tuple(int(a) for a in d.mirror_axes),
        model_config=model_config_from(frozen))
    return RunSpec(frozen, provenance, plan, inference)


def model_config_from(cfg: Any) -> dict[str, Any]:
    """The kwargs of ``seg.model.build_model`` for a resolved config (plain data, as stored)."""
    d, m = cfg.data, cfg.model
    return to_plain({
        "spatial_dims": d.spatial_dims,
        "in_channels": d.in_channels,
        "num_classes": d.num_classes,
        "backbone": m.backbone,
        "backbone_kwargs": backbone_options(m.backbone, m.backbone_kwargs),  # merged: registry defaults may change
        "head": m.head,
        "head_kwargs": dict(m.head_kwargs),
        "pointrend": dataclasses.asdict(m.pointrend) if m.pointrend.enabled else None,
        "input_stages": list(m.input_stages),
    })


def preprocessing_from(data_cfg: Any) -> Preprocessing:
    """The ``Preprocessing`` of a planned data section (so inference matches training)."""
    d = data_cfg
    norm = d.normalization if isinstance(d.normalization, str) else tuple(d.normalization)
    stats = None if d.intensity_stats is None else tuple(dict(x) for x in d.intensity_stats)
    pp = Preprocessing(normalization=norm, intensity_stats=stats, ct_window=tuple(d.ct_window),
                       target_spacing=None if d.target_spacing is None else tuple(d.target_spacing))
    pp.validate()
    return pp


def still_auto(cfg: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields of dataclass ``cfg`` (nested) whose value is "auto"."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += still_auto(value, f"{prefix}{f.name}.")
        elif isinstance(value, str) and value == AUTO and f.name != "device":  # a device is chosen at run time
            out.append(prefix + f.name)
    return out


def _refuse(self: Any, name: str, value: Any = None) -> None:
    raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}: a resolved run specification "
                                          "is frozen (change the request and resolve again)")


_FROZEN: dict[type, type] = {}


def _frozen_type(cls: type) -> type:
    """A subclass of dataclass ``cls`` whose instances refuse assignment (made once per class)."""
    if cls not in _FROZEN:
        _FROZEN[cls] = type(f"Frozen{cls.__name__}", (cls,),
                            {"__setattr__": _refuse, "__delattr__": _refuse, "__module__": cls.__module__,
                             "__qualname__": f"Frozen{cls.__qualname__}"})
    return _FROZEN[cls]


def freeze(cfg: Any) -> Any:
    """A frozen deep copy of dataclass ``cfg``: no field of it or of its nested dataclasses can be
    assigned (to change a run, change the request and resolve it again)."""
    if type(cfg) in _FROZEN.values():
        return cfg
    out = object.__new__(_frozen_type(type(cfg)))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        object.__setattr__(out, f.name, freeze(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value))
    return out
