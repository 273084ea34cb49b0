"""Exported models: a checkpoint's network as TorchScript (and ONNX), plus the JSON inference needs.

    python -m seg.export CHECKPOINT -o DIR [--no-onnx] [--overwrite]

``DIR`` then holds:

* ``model.torchscript.pt``: ``SegmentationModel.forward`` in eval mode, i.e. the model's default
  inference (coarse head, then PointRend's adaptive subdivision when the model has a point head),
  traced with ``torch.jit.trace``.  It loads and runs with ``torch`` alone
  (``torch.jit.load(path)(x)``), on inputs (N, C, *patch_size) for any N >= 1, and returns logits
  (N, K, *patch_size).  The patch size is built into the traced graph (the subdivision schedule and
  the number of re-rendered points follow from it), so a small scripted guard refuses other sizes.
* ``model.onnx`` (where the operators allow): the same computation (opset 20: ``GridSample`` on
  5-D tensors, ``TopK``, ``ScatterElements``), batch axis dynamic; a model whose subdivision does
  not export falls back to the coarse logits, and one that does not export at all gets no ONNX
  file, each said in the log and in ``export.json``.
* ``export.json`` (``MANIFEST``): ``format_version``, the fields of ``seg.checkpoint.InferenceBundle``
  (spatial_dims, patch_size, slice_axis, in_channels, preprocessing, class_names, label_values,
  mirror_axes), and per network file its plain name inside ``DIR``, its sha256, what it computes
  with its input and output shapes, and the measured difference to the eager model.

Every network file is checked before it is kept: traced at batch ``TRACE_BATCH``, the saved file
reloaded and run at batches ``CHECK_BATCHES`` must match the eager model to ``atol`` (max absolute
logit difference), so a batch size or a shape frozen into the trace is caught here.  Files are
written to a temporary folder inside ``DIR`` and renamed into place, ``export.json`` last, so a
failed export leaves nothing under the final names.

``load_export(DIR, unsafe_load=True)`` returns an ``InferenceBundle`` whose model is the loaded
TorchScript module; ``seg.predict.Predictor.from_checkpoint`` (and ``infer_seg.py -m DIR
--unsafe-load``) use it for a folder.  A TorchScript file is a program (PyTorch's security policy
asks to treat it as code), so loading one needs the opt-in that unpickling a checkpoint needs.
Before it is loaded, every field of the manifest is checked (types, ranges, the preprocessing's
statistics per channel, axes), the network file must be a plain name inside ``DIR`` and match its
recorded sha256; after, one dry run on a zero window checks the network against the manifest (input
shape, class count, patch).  Each failure is one ``UserError`` naming the field and the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import reprlib
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from seg.checkpoint import InferenceBundle, load_for_inference
from seg.cli import add_common_flags, run_cli
from seg.errors import UserError
from seg.files import write_atomic
from seg.io import label_dtype
from seg.pointrend import subdivision_sizes
from seg.preprocess import NORMALIZATIONS, Preprocessing
from seg.spec import InferenceSpec

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2       # 2: each network file's sha256; file names are plain names inside DIR
MANIFEST = "export.json"
TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
ONNX_OPSET = 20          # the first opset whose GridSample takes 5-D (3D) inputs
TRACE_BATCH = 2          # traced at this batch size ...
CHECK_BATCHES = (1, 3)   # ... and checked at these, so a frozen batch size cannot pass
ATOL = 1e-4              # max |exported - eager| logit difference accepted
REQUIRED = ("format_version", "spatial_dims", "patch_size", "in_channels", "preprocessing",
            "num_classes", "class_names", "networks")
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a network file: a plain name inside DIR
SHA256 = re.compile(r"[0-9a-f]{64}")
STAT_KEYS = ("mean", "std", "clip_low", "clip_high")  # per channel, what 'ct' normalisation reads


@dataclasses.dataclass
class ExportResult:
    """Outcome of ``export_checkpoint``.

    Attributes:
        out_dir: the export folder.
        manifest: the content of ``out_dir / MANIFEST``.
        files: the files written (manifest included).
    """

    out_dir: Path
    manifest: dict[str, Any]
    files: list[Path]


class InputGuard(nn.Module):
    """The traced network behind a shape check: (N, C, *patch) only, N >= 1 (scripted).

    A trace has the patch size built in (resize targets, the subdivision schedule); another size
    would run and give wrong logits, so it is refused with a message instead.
    """

    def __init__(self, net: nn.Module, in_channels: int, patch_size: Sequence[int]) -> None:
        super().__init__()
        self.net = net
        self.shape = [int(in_channels)] + [int(p) for p in patch_size]
        self.expected = "(N, " + ", ".join(str(s) for s in self.shape) + ") float32"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != len(self.shape) + 1 or x.shape[0] < 1 or list(x.shape[1:]) != self.shape:
            raise RuntimeError("input must be " + self.expected + " (see export.json), got "
                               + str(list(x.shape)))
        with torch.no_grad():  # as SegmentationModel.forward_infer
            return self.net(x)


class CoarseOnly(nn.Module):
    """``forward_infer(x, 'coarse')``: the coarse logits upsampled to the input (ONNX fallback)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_infer(x, mode="coarse")


# ------------------------------------------------------------------------------------------ export
def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, onnx: bool = True,
                      overwrite: bool = False, unsafe_load: bool = False,
                      atol: float = ATOL) -> ExportResult:
    """Export a checkpoint's network and everything inference needs to ``out_dir``.

    Args:
        checkpoint: a checkpoint written by ``train_seg.py``.
        out_dir: the export folder (created; other files in it are left alone).
        onnx: also write ``model.onnx`` where the operators allow.
        overwrite: replace an export already in ``out_dir``.
        unsafe_load: admit a checkpoint that needs full unpickling (``seg.files.torch_load``).
        atol: max absolute logit difference to the eager model accepted for a network file.

    Returns:
        An ``ExportResult``.

    Raises:
        UserError: unusable checkpoint; ``out_dir`` is a file or holds an export (without
            ``overwrite``); the traced network does not match the eager one (nothing written).
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    bundle = load_for_inference(checkpoint, "cpu", unsafe_load=unsafe_load)
    logger.info("%s: %dD model, patch %s, %d classes, %d input channel(s)", checkpoint,
                bundle.spatial_dims, "x".join(map(str, bundle.patch_size)), len(bundle.class_names),
                bundle.in_channels)
    model = bundle.model.eval()
    computes, pointrend = _describe(model, bundle)
    created = [p for p in [out_dir, *out_dir.parents] if not p.exists()]  # removed again on failure
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {}

    def write(manifest_path: Path) -> None:  # in a temporary folder, moved into out_dir at the end
        tmp = manifest_path.parent
        networks = {"torchscript": _export_torchscript(model, bundle, tmp / TORCHSCRIPT_FILE, atol,
                                                       checkpoint, computes)}
        networks["onnx"] = _export_onnx(model, bundle, tmp / ONNX_FILE, atol, computes) if onnx \
            else _skipped("not requested (--no-onnx)")
        for entry in networks.values():
            if entry["file"] is not None:
                entry["sha256"] = _sha256(tmp / entry["file"])  # checked before loading
        manifest.update(_manifest(bundle, checkpoint, computes, pointrend, networks))
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        _clear_earlier_export(tmp, out_dir)

    try:
        write_atomic(out_dir / MANIFEST, write)  # the manifest last: it marks a complete export
    except BaseException:
        for folder in created:  # innermost first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    files = [out_dir / n for n in (TORCHSCRIPT_FILE, ONNX_FILE, MANIFEST) if (out_dir / n).exists()]
    logger.info("export written to %s (%s)", out_dir, ", ".join(p.name for p in files))
    return ExportResult(out_dir, manifest, files)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError("is a file: the export needs a folder", out_dir)
    held = [n for n in (MANIFEST, TORCHSCRIPT_FILE, ONNX_FILE) if (out_dir / n).exists()]
    if held and not overwrite:
        raise UserError(f"holds an export ({', '.join(held)}): choose another folder, or replace it "
                        "with --overwrite", out_dir)


def _describe(model: nn.Module, bundle: InferenceBundle) -> tuple[str, dict | None]:
    """What ``model.forward`` computes on a patch, in words, and the PointRend schedule (or None)."""
    options = getattr(model, "pointrend", None)
    if getattr(model, "point_head", None) is None or not options:
        return "SegmentationModel.forward in eval mode: the coarse head's logits upsampled " \
               "(bi/trilinear) to the patch (this model has no point head)", None
    coarse = _coarse_size(model, bundle)
    sizes = subdivision_sizes(coarse, bundle.patch_size, options["subdivision_steps"])
    points = [min(int(options["subdivision_num_points"]), math.prod(s)) for s in sizes]
    schedule = " -> ".join("x".join(map(str, s)) for s in [coarse, *sizes])
    text = (f"SegmentationModel.forward in eval mode: coarse head ({'x'.join(map(str, coarse))} "
            f"logits), then PointRend adaptive subdivision {schedule} re-rendering the "
            f"{'/'.join(map(str, points))} most uncertain cells per step with the point head "
            f"({sum(points)} point evaluations per window)")
    if sizes and tuple(sizes[-1]) != tuple(bundle.patch_size):
        text += ", then upsampled to the patch"
    return text, {"coarse_size": list(coarse), "step_sizes": [list(s) for s in sizes],
                  "points_per_step": points, "subdivision_num_points": int(options["subdivision_num_points"]),
                  "subdivision_steps": options["subdivision_steps"]}


def _coarse_size(model: nn.Module, bundle: InferenceBundle) -> tuple[int, ...]:
    """Spatial size of the coarse head's logits on one patch (read with a forward hook)."""
    seen: list[tuple[int, ...]] = []
    hook = model.head.register_forward_hook(
        lambda mod, args, out: seen.append(tuple(out.logits.shape[2:])))  # a heads.HeadOutput
    try:
        with torch.no_grad():
            model(_example(bundle, 1, seed=0))
    finally:
        hook.remove()
    return seen[0]


def _example(bundle: InferenceBundle, n: int, seed: int) -> torch.Tensor:
    """A seeded (n, C, *patch) float32 window, z-scored-like values."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, bundle.in_channels, *bundle.patch_size), generator=g)


def _io_spec(bundle: InferenceBundle) -> dict[str, Any]:
    patch = list(bundle.patch_size)
    return {"input": {"name": "image", "shape": ["N", bundle.in_channels, *patch], "dtype": "float32",
                      "means": "normalised image windows (this export's preprocessing applied), any N >= 1"},
            "output": {"name": "logits", "shape": ["N", len(bundle.class_names), *patch],
                       "dtype": "float32", "means": "class logits (softmax over axis 1; argmax = class "
                                                    "index, label_values maps it to the file value)"}}


def _max_diffs(run: Callable[[torch.Tensor], torch.Tensor], model: nn.Module,
               bundle: InferenceBundle) -> dict[str, float]:
    """Max |run(x) - model(x)| over seeded windows, at each batch of ``CHECK_BATCHES``."""
    out = {}
    for n in CHECK_BATCHES:
        x = _example(bundle, n, seed=100 + n)
        with torch.no_grad():
            ref, got = model(x), run(x)
        if tuple(got.shape) != tuple(ref.shape):
            raise ValueError(f"batch {n}: output shape {tuple(got.shape)}, eager {tuple(ref.shape)}")
        out[str(n)] = float((got.float() - ref.float()).abs().max())
    return out


def _export_torchscript(model: nn.Module, bundle: InferenceBundle, path: Path, atol: float,
                        checkpoint: Path, computes: str) -> dict[str, Any]:
    """Trace, guard, save, reload and check the network; the manifest entry of the file."""
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, _example(bundle, TRACE_BATCH, seed=1), check_trace=False)
    # sizes the trace froze (spatial sizes, which the guard pins); batch sizes are checked below
    logger.debug("tracing: %d tracer warnings (constants frozen into the graph)",
                 sum(issubclass(w.category, torch.jit.TracerWarning) for w in caught))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still supported
        guarded = torch.jit.script(InputGuard(traced, bundle.in_channels, bundle.patch_size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.save: deprecated, still supported
        torch.jit.save(guarded, str(path))
    loaded = _jit_load(path, "cpu")
    try:
        diffs = _max_diffs(loaded, model, bundle)
    except (RuntimeError, torch.jit.Error) as exc:  # e.g. a loop over the batch frozen into the trace
        raise UserError(f"cannot be exported faithfully: the traced network fails at another batch "
                        f"size than traced ({_last_line(exc)})", checkpoint) from exc
    worst = max(diffs.values())
    if not worst <= atol:
        raise UserError(f"cannot be exported faithfully: the traced network differs from the eager one "
                        f"by {worst:.3g} (max |logit| difference at batch sizes {', '.join(diffs)}; "
                        f"accepted {atol:g})", checkpoint)
    logger.info("TorchScript: traced and checked in %.1f s, max |exported - eager| = %.2g at batch "
                "sizes %s", time.perf_counter() - t0, worst, "/".join(diffs))
    return {"file": TORCHSCRIPT_FILE, "format": "torchscript", "computes": computes,
            "load": f"torch.jit.load('{TORCHSCRIPT_FILE}', map_location=device)",
            **_io_spec(bundle), "max_abs_diff_vs_eager": diffs, "torch_version": torch.__version__}


def _skipped(reason: str) -> dict[str, Any]:
    return {"file": None, "skipped": reason}


def _export_onnx(model: nn.Module, bundle: InferenceBundle, path: Path, atol: float,
                 computes: str) -> dict[str, Any]:
    """The first ONNX form that exports and matches its eager counterpart: the full forward, else
    (a PointRend model) the coarse logits; or a skipped entry, with one warning line."""
    try:
        import onnxruntime  # noqa: F401 - each file is checked before it is kept
    except ImportError:
        logger.warning("ONNX skipped: onnxruntime is not installed (pip install -r requirements.txt)")
        return _skipped("onnxruntime not installed: the ONNX file could not be checked")
    candidates = [("forward", model, computes)]
    if getattr(model, "point_head", None) is not None:
        candidates.append(("coarse", CoarseOnly(model).eval(),
                           "the coarse head's logits upsampled (bi/trilinear) to the patch, WITHOUT "
                           "PointRend subdivision (SegmentationModel.forward_infer(x, 'coarse'); the "
                           "TorchScript file has the subdivision)"))
    reasons = []
    for mode, net, text in candidates:
        t0 = time.perf_counter()
        try:
            diffs = _onnx_file(net, bundle, path)
        except Exception as exc:  # noqa: BLE001 - an operator the exporter or runtime lacks
            reasons.append(f"{mode}: {type(exc).__name__}: {_first_line(exc)}")
            logger.debug("ONNX export of %s failed", mode, exc_info=True)
            continue
        worst = max(diffs.values())
        if not worst <= atol:
            reasons.append(f"{mode}: differs from eager by {worst:.3g} (accepted {atol:g})")
            continue
        if mode != "forward":
            logger.warning("ONNX holds the coarse logits only, without PointRend subdivision (%s)",
                           "; ".join(reasons))
        logger.info("ONNX (opset %d, onnxruntime): %s; checked in %.1f s, max |onnx - eager| = %.2g",
                    ONNX_OPSET, "the same computation" if mode == "forward" else "coarse logits",
                    time.perf_counter() - t0, worst)
        return {"file": ONNX_FILE, "format": "onnx", "opset": ONNX_OPSET, "mode": mode,
                "computes": text, **_io_spec(bundle), "dynamic_axes": {"image": [0], "logits": [0]},
                "max_abs_diff_vs_eager": diffs, "onnxruntime_version": onnxruntime.__version__}
    path.unlink(missing_ok=True)
    logger.warning("ONNX skipped: %s", "; ".join(reasons))
    return _skipped("; ".join(reasons))


def _onnx_file(net: nn.Module, bundle: InferenceBundle, path: Path) -> dict[str, float]:
    """Write ``net`` as ONNX (TorchScript-based exporter, dynamic batch) and compare it with
    onnxruntime against ``net`` itself at ``CHECK_BATCHES``."""
    import onnxruntime as ort

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and exporter deprecation chatter; the check decides
        torch.onnx.export(net, (_example(bundle, TRACE_BATCH, seed=1),), str(path), dynamo=False,
                          opset_version=ONNX_OPSET, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])

    return _max_diffs(run, net, bundle)


def _jit_load(path: Path, device: str | torch.device) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load: deprecated, still supported
        return torch.jit.load(str(path), map_location=device)


def _last_line(exc: BaseException) -> str:
    """The last line of a (TorchScript interpreter) error: the error itself, after its traceback."""
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    return (lines or [type(exc).__name__])[-1][:200]


def _first_line(exc: BaseException) -> str:
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    return (lines or [type(exc).__name__])[0][:200]


def _manifest(bundle: InferenceBundle, checkpoint: Path, computes: str,
              pointrend: dict | None, networks: dict[str, Any]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "written_by": "python -m seg.export",
        "source": {"checkpoint": checkpoint.name, "sha256": _sha256(checkpoint)},
        **dataclasses.replace(bundle.spec, model_config=None).to_dict(),  # the checkpoint's own fields
        "num_classes": len(bundle.class_names),
        "computes": computes,
        "pointrend": pointrend,
        "networks": networks,
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _clear_earlier_export(tmp: Path, out_dir: Path) -> None:
    """Before this export's files (in ``tmp``) move in: remove the manifest of an earlier export in
    ``out_dir`` (no manifest pointing at half-replaced files) and its network files this export does
    not have (an ONNX file)."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for name in (TORCHSCRIPT_FILE, ONNX_FILE):
        if not (tmp / name).exists():
            (out_dir / name).unlink(missing_ok=True)


# -------------------------------------------------------------------------------------------- load
def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """``path / MANIFEST`` of an export folder, every field checked (``check_manifest``).

    Raises:
        UserError: no manifest; unreadable, invalid or too deeply nested JSON; another format
            version; a missing or malformed field (named in the message).
    """
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise UserError(f"holds no export (no {MANIFEST}; write one with python -m seg.export "
                        "CHECKPOINT -o DIR)", path)
    try:
        manifest = json.loads(file.read_text())
    except RecursionError as exc:
        raise UserError("not a readable export manifest (JSON nested too deeply)", file) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"not a readable export manifest ({type(exc).__name__}: {exc})", file) from exc
    if not isinstance(manifest, dict):
        raise UserError("not an export manifest (not a JSON object)", file)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        old = " (written before file hashes were recorded: export the checkpoint again)" if version == 1 else ""
        raise UserError(f"export format_version {_show(version)}; this version reads {FORMAT_VERSION}{old}", file)
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise UserError(f"not an export manifest (missing {', '.join(missing)})", file)
    check_manifest(manifest, file)
    return manifest


def check_manifest(m: dict[str, Any], file: Path) -> None:
    """Check every field inference reads: types, ranges, and agreement between fields.

    Raises:
        UserError: the first bad field, as ``<file>: <field> <value>: <rule>``.
    """
    dims, channels, names = m["spatial_dims"], m["in_channels"], m["class_names"]
    _expect(_is_int(dims) and dims in (2, 3), file, "spatial_dims", "must be 2 or 3", dims)
    _expect(_ints(m["patch_size"], dims, low=1), file, "patch_size",
            f"must be {dims} positive integers (spatial_dims {dims})", m["patch_size"])
    axis = m.get("slice_axis")
    _expect(axis is None or (_is_int(axis) and 0 <= axis <= 2), file, "slice_axis",
            "must be null or an axis 0, 1 or 2", axis)
    _expect(_is_int(channels) and channels >= 1, file, "in_channels", "must be a positive integer",
            channels)
    _expect(isinstance(names, list) and len(names) >= 1 and all(isinstance(n, str) and n for n in names),
            file, "class_names", "must be a list of non-empty names, background first", names)
    _expect(_is_int(m["num_classes"]) and m["num_classes"] == len(names), file, "num_classes",
            f"must equal the number of class_names ({len(names)})", m["num_classes"])
    values = m.get("label_values")
    _expect(values is None or (_ints(values, len(names), low=0) and len(set(values)) == len(values)
                               and _fits_label_map(values)), file, "label_values",
            f"must be null or {len(names)} distinct label values (one per class name) a uint16 label "
            "map holds", values)
    axes = m.get("mirror_axes")
    _expect(axes is None or (isinstance(axes, list) and _ints(axes, len(axes), low=0, high=dims - 1)
                             and len(set(axes)) == len(axes)), file, "mirror_axes",
            f"must be null or distinct spatial axes in 0..{dims - 1}", axes)
    _check_preprocessing(m["preprocessing"], channels, dims, file)
    _check_networks(m["networks"], file)


def _check_preprocessing(pp: Any, channels: int, dims: int, file: Path) -> None:
    """The ``preprocessing`` field: known keys, one scheme per channel, the statistics 'ct' reads."""
    _expect(isinstance(pp, dict), file, "preprocessing", "must be an object", pp)
    known = [f.name for f in dataclasses.fields(Preprocessing)]
    unknown = sorted(set(pp) - set(known) - {"zscore_nonzero"})  # zscore_nonzero: format 1
    _expect(not unknown, file, "preprocessing", f"unknown field(s) (known: {', '.join(known)})", unknown)
    norm = pp.get("normalization", "zscore")
    schemes = [norm] * channels if isinstance(norm, str) else norm
    _expect(isinstance(schemes, list) and len(schemes) == channels
            and all(isinstance(n, str) and n in NORMALIZATIONS for n in schemes), file,
            "preprocessing.normalization", f"must be one of {', '.join(NORMALIZATIONS)}, or a list "
            f"with one per input channel ({channels})", norm)
    stats = pp.get("intensity_stats")
    _expect(stats is None or (isinstance(stats, list) and all(isinstance(s, dict) for s in stats)),
            file, "preprocessing.intensity_stats", "must be null or a list of per-channel objects", stats)
    for c in (c for c, scheme in enumerate(schemes) if scheme == "ct"):
        st = stats[c] if stats and c < len(stats) else None
        _expect(isinstance(st, dict) and all(_is_num(st.get(k)) for k in STAT_KEYS)
                and st["std"] >= 0 and st["clip_low"] <= st["clip_high"], file,
                f"preprocessing.intensity_stats[{c}]", f"channel {c} is normalised 'ct', which needs "
                f"finite {', '.join(STAT_KEYS)} (std >= 0, clip_low <= clip_high)", st)
    window = pp.get("ct_window", [-1000.0, 1000.0])
    _expect(isinstance(window, list) and len(window) == 2 and all(_is_num(v) for v in window)
            and window[0] < window[1], file, "preprocessing.ct_window",
            "must be [low, high], finite, low < high", window)
    spacing, lengths = pp.get("target_spacing"), ((2, 3) if dims == 2 else (3,))
    _expect(spacing is None or (isinstance(spacing, list) and len(spacing) in lengths
                                and all(_is_num(v) and v > 0 for v in spacing)), file,
            "preprocessing.target_spacing", f"must be null or {' or '.join(map(str, lengths))} "
            "positive spacings (mm)", spacing)
    _expect(isinstance(pp.get("zscore_nonzero", False), bool), file, "preprocessing.zscore_nonzero",
            "must be true or false", pp.get("zscore_nonzero"))


def _check_networks(nets: Any, file: Path) -> None:
    """The ``networks`` field: a TorchScript entry; each file a plain name with a sha256."""
    _expect(isinstance(nets, dict) and isinstance(nets.get("torchscript"), dict), file, "networks",
            "must be an object with a 'torchscript' entry", nets)
    for key, entry in nets.items():
        field = f"networks.{key[:40]}"
        _expect(isinstance(entry, dict), file, field, "must be an object", entry)
        if entry.get("file") is None and key != "torchscript":
            continue  # not written (ONNX skipped)
        _expect(isinstance(entry.get("file"), str) and PLAIN_NAME.fullmatch(entry["file"]) is not None,
                file, f"{field}.file", "must be a plain file name inside the export folder (letters, "
                "digits, '.', '_', '-'; no folder, no absolute path)", entry.get("file"))
        _expect(isinstance(entry.get("sha256"), str) and SHA256.fullmatch(entry["sha256"]) is not None,
                file, f"{field}.sha256", "must be the file's sha256 (64 lowercase hex digits)",
                entry.get("sha256"))


def _check_io_shapes(m: dict[str, Any], file: Path) -> None:
    """The input and output shapes each network entry states: those of in_channels, class_names and
    patch_size (run after ``check_network``, which checks those three against the network)."""
    patch = list(m["patch_size"])
    shapes = {"input": ["N", m["in_channels"], *patch], "output": ["N", len(m["class_names"]), *patch]}
    for key, entry in m["networks"].items():
        for side, shape in shapes.items():
            spec = entry.get(side)
            got = spec.get("shape", shape) if isinstance(spec, dict) else shape
            _expect(got == shape, file, f"networks.{key[:40]}.{side}.shape", f"must be {shape} (from "
                    "in_channels, class_names and patch_size)", got)


def _expect(ok: bool, file: Path, field: str, rule: str, value: Any) -> None:
    if not ok:
        raise UserError(f"{field} {_show(value)}: {rule}", file)


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 120, 60, 3


def _show(value: Any) -> str:
    """A short repr of a JSON value, safe on deep nesting."""
    return _REPR.repr(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _ints(v: Any, n: int, low: int | None = None, high: int | None = None) -> bool:
    """``v`` is a list of ``n`` integers in [low, high]."""
    return isinstance(v, list) and len(v) == n and all(
        _is_int(x) and (low is None or x >= low) and (high is None or x <= high) for x in v)


def _fits_label_map(values: Sequence[int]) -> bool:
    """The largest label value fits the widest label map ``seg.io`` writes."""
    try:
        label_dtype(np.zeros(0, np.int64), max(values) + 1)
    except ValueError:
        return False
    return True


def load_export(path: str | os.PathLike, device: str | torch.device = "cpu",
                unsafe_load: bool = False) -> InferenceBundle:
    """An export folder as an ``InferenceBundle`` whose model is the TorchScript module on ``device``.

    The manifest is checked (``read_manifest``), then the network file (a plain file inside the
    folder whose sha256 is the recorded one); only then, with ``unsafe_load``, is the TorchScript
    program loaded, and one dry run checks it against the manifest (``check_network``).

    Args:
        path: the export folder.
        device: where the network runs.
        unsafe_load: load the TorchScript file, a program (PyTorch's security policy: treat
            TorchScript models as code); without it a checked export is refused, naming the opt-in.

    Raises:
        UserError: see ``read_manifest``; the network file is missing, outside the folder, changed
            since the export, or unreadable; ``unsafe_load`` is False; the network disagrees with
            the manifest.
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    bundle = _bundle(manifest, None, folder / MANIFEST)
    entry = manifest["networks"]["torchscript"]
    file = _network_file(folder, entry)
    if not unsafe_load:
        raise UserError("is a TorchScript program: loading and running it runs code stored in the file "
                        f"(its sha256 shows only that it is the file {MANIFEST} names). If you trust "
                        "this export, load it with --unsafe-load (unsafe_load=True)", file)
    logger.warning("%s: TorchScript program loaded (--unsafe-load); it runs code stored in the file", file)
    try:
        model = _jit_load(file, device).eval()
    except Exception as exc:  # noqa: BLE001 - truncated zip, not TorchScript, ...: unusable
        raise UserError(f"not a readable TorchScript file ({type(exc).__name__}: {_first_line(exc)})",
                        file) from exc
    check_network(model, bundle, device, folder / MANIFEST, entry["file"])
    _check_io_shapes(manifest, folder / MANIFEST)
    return InferenceBundle(model, bundle.spec)


def _network_file(folder: Path, entry: dict[str, Any]) -> Path:
    """The network file of a manifest entry: a file inside ``folder`` with the recorded sha256."""
    file = folder / entry["file"]
    if not file.is_file():
        raise UserError(f"the export's network file is missing ({MANIFEST} names it)", file)
    if file.resolve().parent != folder.resolve():
        raise UserError(f"links to {file.resolve()}, outside the export folder: refused", file)
    try:
        digest = _sha256(file)
    except OSError as exc:
        raise UserError(f"not readable ({type(exc).__name__}: {exc})", file) from exc
    if digest != entry["sha256"]:
        raise UserError(f"sha256 {digest} differs from the one {MANIFEST} records: the file was changed "
                        "or replaced after the export (export the checkpoint again)", file)
    return file


def check_network(model: Any, bundle: InferenceBundle, device: str | torch.device, manifest: Path,
                  name: str) -> None:
    """One dry run of the network on a zero window (1, C, *patch): it must take that window (the
    InputGuard's shape, when the file has one, names the field that differs) and give finite logits
    (1, K, *patch) with K the number of ``class_names``.

    Raises:
        UserError: naming the field of ``manifest`` that disagrees with the network ``name``.
    """
    expected = [bundle.in_channels, *bundle.patch_size]
    taken = getattr(model, "shape", None)  # InputGuard: (C, *patch) the trace was made for
    if isinstance(taken, list) and taken != expected:
        if len(taken) != len(expected):
            field, ours = "spatial_dims", bundle.spatial_dims
        elif taken[0] != expected[0]:
            field, ours = "in_channels", bundle.in_channels
        else:
            field, ours = "patch_size", list(bundle.patch_size)
        raise UserError(f"{field} {ours} does not fit the network: {name} takes windows "
                        f"(N, {', '.join(map(str, taken))})", manifest)
    try:
        with torch.no_grad():
            out = model(torch.zeros((1, *expected), device=device))
    except (RuntimeError, torch.jit.Error) as exc:
        raise UserError(f"in_channels/patch_size: {name} does not run on one (1, "
                        f"{', '.join(map(str, expected))}) window ({_last_line(exc)})", manifest) from exc
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    k = len(bundle.class_names)
    if not isinstance(out, torch.Tensor) or out.ndim != len(expected) + 1 or shape[2:] != bundle.patch_size:
        raise UserError(f"patch_size {list(bundle.patch_size)}: {name} gives logits {shape} for one "
                        f"window, not (1, K, {', '.join(map(str, bundle.patch_size))})", manifest)
    if shape[1] != k:
        raise UserError(f"class_names: {k} classes named (num_classes, label_values), but {name} gives "
                        f"{shape[1]} (logits {shape} for one window)", manifest)
    if not bool(torch.isfinite(out).all()):
        raise UserError(f"{name} gives non-finite logits on a zero window", manifest)


def _bundle(manifest: dict[str, Any], model: Any, file: Path) -> InferenceBundle:
    """The InferenceBundle of a checked manifest (``check_manifest``)."""
    try:
        spec = InferenceSpec.from_dict(manifest)
        spec.preprocessing.validate()
    except (TypeError, ValueError, KeyError) as exc:
        raise UserError(f"preprocessing: {exc}", file) from exc
    return InferenceBundle(model, spec)


# ------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m seg.export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint file (.pt) from train_seg.py")
    p.add_argument("-o", "--output", required=True, help="export folder (created)")
    p.add_argument("--no-onnx", action="store_true", help="write the TorchScript file only")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in the folder")
    p.add_argument("--atol", type=float, default=ATOL,
                   help="max |exported - eager| logit difference accepted")
    add_common_flags(p, unsafe_load=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exit status 0, 2 for input errors (one line), 1 for a bug (traceback)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(message)s" if args.debug else "%(message)s")

    def body() -> int:
        export_checkpoint(args.checkpoint, args.output, onnx=not args.no_onnx,
                          overwrite=args.overwrite, unsafe_load=args.unsafe_load, atol=args.atol)
        return 0

    return run_cli(body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
