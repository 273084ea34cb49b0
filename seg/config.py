"""Loading, overriding and validating the ``hparam.py`` configuration, and its paths as a run
stores them (``stored_config``; ``config_from_dict`` reads them back)."""
from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import os
import sys
import typing
from pathlib import Path
from typing import Any, Sequence

import backbones
import heads
from seg.errors import ConfigError
from seg.preprocess import NORMALIZATIONS
from seg.registry import unknown_name_message


#: the repository's ``hparam.py``: the config file when none is named
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "hparam.py"


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where a request came from, as data beside the config (nothing is set on the config object).

    Attributes:
        source: the config file (absolute path): relative ``data.root`` resolves against its
            folder, and checkpoints record it (``config_source``); None: the repository's hparam.py.
        user_set: dotted names of the fields the user set: in the config file (a value other than
            its dataclass's default) or with ``--set``.
    """

    source: str | None = None
    user_set: frozenset[str] = frozenset()


def load_request(path: str | None = None, overrides: Sequence[str] = ()) -> tuple[Any, Provenance]:
    """The user's request: the config of ``path`` (``load_config``) with ``overrides``
    (``apply_overrides``), and its ``Provenance``."""
    path = Path(path) if path else DEFAULT_CONFIG
    cfg = load_config(str(path))
    in_file = changed_fields(cfg, type(cfg)())
    cfg = apply_overrides(cfg, overrides)
    return cfg, Provenance(str(path.absolute()), frozenset(in_file) | override_keys(overrides))


def changed_fields(cfg: Any, default: Any, prefix: str = "") -> set[str]:
    """Dotted names of the fields of dataclass ``cfg`` whose value differs from ``default``'s."""
    out: set[str] = set()
    for f in dataclasses.fields(cfg):
        value, base = getattr(cfg, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(value) and dataclasses.is_dataclass(base):
            out |= changed_fields(value, base, f"{prefix}{f.name}.")
        elif value != base:
            out.add(prefix + f.name)
    return out


def override_keys(overrides: Sequence[str]) -> frozenset[str]:
    """The dotted field names ``--set key=value`` items set."""
    return frozenset(item.split("=", 1)[0].strip() for item in overrides)


def load_config(path: str | None = None) -> Any:
    """Return ``get_config()`` of ``path`` (default: the repository's ``hparam.py``); its
    provenance: ``load_request``."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError("config file not found", path)
    spec = importlib.util.spec_from_file_location(f"_hparam_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a user's file: report, don't crash with a traceback
        raise ConfigError(f"cannot execute config: {type(exc).__name__}: {exc}", path) from exc
    if not hasattr(module, "get_config"):
        raise ConfigError("config file must define get_config()", path)
    try:
        cfg = module.get_config()
    except Exception as exc:  # a user's function: report it like the file above
        raise ConfigError(f"get_config() failed: {type(exc).__name__}: {exc}", path) from exc
    return cfg


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a literal parsed from the command line to the field's declared type."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"Any": Any})  # postponed annotations
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if value is None:
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"{key}: cannot use {value!r} as {annotation}")
    if origin in (tuple, list) and not isinstance(value, (tuple, list)):
        raise ValueError(f"{key}: expected a {origin.__name__}, got {value!r}")
    if origin is tuple:
        return tuple(_coerce(v, args[0] if args else Any, key) for v in value)
    if origin is list:
        return [_coerce(v, args[0] if args else Any, key) for v in value]
    if annotation is bool and not isinstance(value, bool):
        raise ValueError(f"{key}: expected True or False, got {value!r}")
    if annotation in (int, float, str) and not isinstance(value, annotation):
        if annotation is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def _parse_literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # bare words are strings: model.backbone=repvgg_a0


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """Apply ``section.field=value`` overrides (values are Python literals or bare strings)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        obj, parts = cfg, key.strip().split(".")
        for i, part in enumerate(parts):
            fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
            if part not in fields:
                where = ".".join(parts[:i]) or "config"
                raise ConfigError(unknown_name_message(f"field of {where}", part, fields))
            if i == len(parts) - 1:
                hints = typing.get_type_hints(type(obj))
                try:
                    setattr(obj, part, _coerce(_parse_literal(text), hints[part], key))
                except ValueError as exc:
                    raise ConfigError(str(exc)) from exc
            else:
                obj = getattr(obj, part)
    return cfg


def _auto_or(value: Any, check: Any) -> bool:
    """``value`` is the string 'auto' (the plan decides) or passes ``check``."""
    if isinstance(value, str) and value == "auto":
        return True
    try:
        return bool(check(value))
    except (TypeError, ValueError):
        return False


def _window_ok(window: Any) -> bool:
    try:
        low, high = window
        return bool(low < high)
    except (TypeError, ValueError):
        return False


def _axes_ok(axes: Any, dims: int) -> bool:
    return (isinstance(axes, (tuple, list)) and len(set(axes)) == len(axes)
            and all(isinstance(a, int) and 0 <= a < dims for a in axes))


def validate_config(cfg: Any) -> None:
    """Check the whole configuration; raise ConfigError with a clear message."""
    d, m, t = cfg.data, cfg.model, cfg.train
    checks = [
        (d.spatial_dims in (2, 3), f"data.spatial_dims must be 2 or 3, got {d.spatial_dims!r}"),
        (_auto_or(d.class_names, lambda v: isinstance(v, (list, tuple)) and len(v) >= 2),
         "data.class_names must be 'auto' or at least 2 names (background first)"),
        (_auto_or(d.class_names, lambda v: len(set(v)) == len(v)), "data.class_names has duplicates"),
        (d.channel_names is None or _auto_or(d.in_channels, lambda v: len(d.channel_names) == v),
         f"data.channel_names {d.channel_names!r} must name data.in_channels={d.in_channels!r} channel(s)"),
        (d.dataset_json is None or isinstance(d.dataset_json, str), "data.dataset_json must be 'auto', a path or None"),
        (_auto_or(d.patch_size, lambda v: isinstance(v, (tuple, list)) and len(v) == d.spatial_dims
                  and all(isinstance(p, int) and p > 0 for p in v)),
         f"data.patch_size must be 'auto' or {d.spatial_dims} positive sizes, got {d.patch_size!r}"),
        (_window_ok(d.ct_window), f"data.ct_window must be (low, high) with low < high, got {d.ct_window!r}"),
        (_auto_or(d.patch_voxel_budget, lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
         f"data.patch_voxel_budget must be 'auto' or a number of voxels > 0, got {d.patch_voxel_budget!r}"),
        (_auto_or(d.slice_axis, lambda v: v in (0, 1, 2)),
         f"data.slice_axis must be 'auto', 0, 1 or 2, got {d.slice_axis!r}"),
        (0.0 <= d.foreground_ratio <= 1.0, "data.foreground_ratio must be in [0, 1]"),
        (0.0 <= d.lookalike_ratio <= 1.0, "data.lookalike_ratio must be in [0, 1]"),
        (0.0 < d.val_fraction < 1.0, "data.val_fraction must be in (0, 1)"),
        (d.fold == "all" or (isinstance(d.fold, int) and not isinstance(d.fold, bool) and d.fold >= 0),
         f"data.fold must be an integer >= 0 or 'all', got {d.fold!r}"),
        (_auto_or(d.normalization, lambda v: all(n in NORMALIZATIONS for n in ([v] if isinstance(v, str) else v))
                  and (isinstance(v, str) or _auto_or(d.in_channels, lambda c: len(v) == c))),
         f"data.normalization must be 'auto', one of {', '.join(NORMALIZATIONS)} or one per channel, "
         f"got {d.normalization!r}"),
        (_auto_or(d.target_spacing, lambda v: v is None or (len(v) in (2, 3) and all(s > 0 for s in v))),
         f"data.target_spacing must be 'auto', None or positive spacings (mm), got {d.target_spacing!r}"),
        (_auto_or(d.mirror_axes, lambda v: _axes_ok(v, d.spatial_dims)),
         f"data.mirror_axes must be 'auto' or distinct axes in 0..{d.spatial_dims - 1}, got {d.mirror_axes!r}"),
        (_auto_or(d.rotation_axes, lambda v: _axes_ok(v, 3)),
         f"data.rotation_axes must be 'auto' or distinct axes in 0..2, got {d.rotation_axes!r}"),
        (_auto_or(m.pointrend.train_num_points, lambda v: isinstance(v, int) and v > 0),
         "model.pointrend.train_num_points must be 'auto' or > 0"),
        (_auto_or(m.pointrend.subdivision_num_points, lambda v: isinstance(v, int) and v > 0),
         "model.pointrend.subdivision_num_points must be 'auto' or > 0"),
        (_auto_or(d.in_channels, lambda v: isinstance(v, int) and v >= 1),
         f"data.in_channels must be 'auto' or >= 1, got {d.in_channels!r}"),
        ((t.iterations is None or t.iterations > 0)
         and _auto_or(t.batch_size, lambda v: isinstance(v, int) and v > 0)
         and t.iterations_2d > 0 and t.iterations_3d > 0,
         "train.iterations (or None), iterations_2d and iterations_3d must be > 0, train.batch_size "
         "'auto' or > 0"),
        (t.lr > 0, "train.lr must be > 0"),
        (t.schedule in ("cosine", "poly"), f"train.schedule must be cosine or poly, got {t.schedule!r}"),
        (0.0 <= t.val_overlap < 1.0, "train.val_overlap must be in [0, 1)"),
        (t.val_every > 0, "train.val_every must be > 0"),
        (0.0 <= t.val_share <= 1.0, "train.val_share must be in [0, 1]"),
        (t.dist_timeout_minutes > 0, "train.dist_timeout_minutes must be > 0"),
        (0 < m.pointrend.oversample_ratio and 0 <= m.pointrend.importance_sample_ratio <= 1,
         "model.pointrend: oversample_ratio must be > 0 and importance_sample_ratio in [0, 1]"),
        (m.pointrend.image_features in ("none", "point", "neighbourhood", "cube", "cube5"),
         "model.pointrend.image_features must be none, point, neighbourhood, cube or cube5, "
         f"got {m.pointrend.image_features!r}"),
        (all(isinstance(w, int) and w > 0 for w in m.input_stages),
         f"model.input_stages must be positive widths, got {m.input_stages!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if m.backbone not in backbones.BACKBONES:
        raise ConfigError(unknown_name_message("backbone (model.backbone)", m.backbone,
                                               backbones.list_backbones()))
    if m.head not in heads.HEADS:
        raise ConfigError(unknown_name_message("head (model.head)", m.head, heads.HEADS.names()))
    if m.pretrained and not Path(m.pretrained).is_file():
        raise ConfigError("pretrained weights file not found", m.pretrained)


#: what ``--set`` may change when a run is resumed: extend it, or give it more wall-clock time
RESUME_FIELDS = ("train.iterations", "train.max_minutes")


def config_from_dict(template: Any, values: dict[str, Any], where: str = "checkpoint") -> Any:
    """``template`` (a config dataclass, changed in place and returned) with the fields of
    ``values`` (``Config.to_dict()`` of a run), each coerced to its declared type.

    Fields ``values`` lacks keep the template's value; keys the schema does not know are an error
    naming ``where``.
    """
    hints = typing.get_type_hints(type(template))
    for f in dataclasses.fields(template):
        if f.name not in values:
            continue
        current, value = getattr(template, f.name), values[f.name]
        if dataclasses.is_dataclass(current):
            config_from_dict(current, value, where)
            continue
        try:
            setattr(template, f.name, _coerce(value, hints[f.name], f.name))
        except ValueError as exc:
            raise ConfigError(f"stored config: {exc}", where) from exc
    unknown = set(values) - {f.name for f in dataclasses.fields(template)}
    if unknown:
        raise ConfigError(f"stored config has field(s) this version does not know: "
                          f"{', '.join(sorted(unknown))}", where)
    return template


def anchored(cfg: Any, provenance: Provenance | None) -> Any:
    """``cfg``, or a copy with a relative ``data.root`` made absolute against the folder of the
    config file it came from (``provenance.source``); the caller's object is not changed."""
    if provenance is None or provenance.source is None or Path(cfg.data.root).is_absolute():
        return cfg
    out = copy.deepcopy(cfg)
    out.data.root = str(Path(provenance.source).parent / cfg.data.root)
    return out


def data_root(root: str | os.PathLike) -> Path:
    """A ``data.root``: a relative one resolves against the repository's folder (that of its
    ``hparam.py``; ``anchored`` resolves it against another config file's folder first)."""
    root = Path(root)
    return root if root.is_absolute() else DEFAULT_CONFIG.parent / root


def resolve_data_path(cfg: Any, *parts: str | None) -> Path | None:
    """Join data folders under ``data.root`` (``data_root``)."""
    if any(p is None for p in parts):
        return None
    root = data_root(cfg.data.root)
    return root.joinpath(*parts[1:]) if parts[0] == "root" else root.joinpath(*parts)


def stored_config(cfg: Any) -> dict[str, Any]:
    """``cfg.to_dict()`` with its paths absolute, as a checkpoint stores it, so that a run resumes
    from any working folder: ``data.root`` resolved against the config file's folder
    (``resolve_data_path``), ``model.pretrained`` and ``train.output_dir`` against the working
    folder (the folders under ``data.root`` stay relative to it); ``model.backbone_kwargs`` merged
    over the variant's registered defaults, so a resumed run never depends on them changing."""
    out = cfg.to_dict()
    out["data"]["root"] = os.path.abspath(resolve_data_path(cfg, "root"))
    if cfg.model.pretrained:
        out["model"]["pretrained"] = os.path.abspath(cfg.model.pretrained)
    out["train"]["output_dir"] = os.path.abspath(cfg.train.output_dir)
    out["model"]["backbone_kwargs"] = backbones.backbone_options(cfg.model.backbone, cfg.model.backbone_kwargs)
    return out
