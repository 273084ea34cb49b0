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
  mirror_axes), what each network file computes with its input and output shapes, and the measured
  difference to the eager model.

Every network file is checked before it is kept: traced at batch ``TRACE_BATCH``, the saved file
reloaded and run at batches ``CHECK_BATCHES`` must match the eager model to ``atol`` (max absolute
logit difference), so a batch size or a shape frozen into the trace is caught here.  Files are
written to a temporary folder inside ``DIR`` and renamed into place, ``export.json`` last, so a
failed export leaves nothing under the final names.

``load_export(DIR)`` returns an ``InferenceBundle`` whose model is the loaded TorchScript module;
``seg.predict.Predictor.from_checkpoint`` (and ``infer_seg.py -m DIR``) use it for a folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from seg.checkpoint import InferenceBundle, load_for_inference
from seg.cli import add_common_flags, run_cli
from seg.errors import UserError
from seg.preprocess import Preprocessing

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "export.json"
TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
ONNX_OPSET = 20          # the first opset whose GridSample takes 5-D (3D) inputs
TRACE_BATCH = 2          # traced at this batch size ...
CHECK_BATCHES = (1, 3)   # ... and checked at these, so a frozen batch size cannot pass
ATOL = 1e-4              # max |exported - eager| logit difference accepted
REQUIRED = ("format_version", "spatial_dims", "patch_size", "in_channels", "preprocessing",
            "class_names", "networks")


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
        unsafe_load: admit a checkpoint that needs full unpickling (``seg.checkpoint.torch_load``).
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
    tmp = Path(tempfile.mkdtemp(prefix=".export-", suffix=".tmp", dir=out_dir))
    try:
        networks = {"torchscript": _export_torchscript(model, bundle, tmp / TORCHSCRIPT_FILE, atol,
                                                       checkpoint, computes)}
        networks["onnx"] = _export_onnx(model, bundle, tmp / ONNX_FILE, atol, computes) if onnx \
            else _skipped("not requested (--no-onnx)")
        manifest = _manifest(bundle, checkpoint, computes, pointrend, networks)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        files = _move_into_place(tmp, out_dir, [TORCHSCRIPT_FILE, ONNX_FILE, MANIFEST])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # innermost first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    shutil.rmtree(tmp, ignore_errors=True)
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
    from seg.pointrend import subdivision_sizes

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
    hook = model.head.register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape[2:])))
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
        "spatial_dims": bundle.spatial_dims,
        "patch_size": list(bundle.patch_size),
        "slice_axis": bundle.slice_axis,
        "in_channels": bundle.in_channels,
        "num_classes": len(bundle.class_names),
        "class_names": list(bundle.class_names),
        "label_values": None if bundle.label_values is None else list(bundle.label_values),
        "mirror_axes": None if bundle.mirror_axes is None else list(bundle.mirror_axes),
        "preprocessing": bundle.preprocessing.to_dict(),
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


def _move_into_place(tmp: Path, out_dir: Path, names: Sequence[str]) -> list[Path]:
    """Rename the files of ``tmp`` into ``out_dir``, the manifest last (it marks a complete export);
    a file of an earlier export this one does not have (an ONNX file) is removed."""
    (out_dir / MANIFEST).unlink(missing_ok=True)  # no manifest pointing at half-replaced files
    written = []
    for name in names:
        if (tmp / name).exists():
            os.replace(tmp / name, out_dir / name)
            written.append(out_dir / name)
        else:
            (out_dir / name).unlink(missing_ok=True)
    return written


# -------------------------------------------------------------------------------------------- load
def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """``path / MANIFEST`` of an export folder, checked.

    Raises:
        UserError: no manifest, unreadable or invalid JSON, another format version, missing fields.
    """
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise UserError(f"holds no export (no {MANIFEST}; write one with python -m seg.export "
                        "CHECKPOINT -o DIR)", path)
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"not a readable export manifest ({type(exc).__name__}: {exc})", file) from exc
    if not isinstance(manifest, dict):
        raise UserError("not an export manifest (not a JSON object)", file)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"export format_version {manifest.get('format_version')!r}; this version reads "
                        f"{FORMAT_VERSION}", file)
    missing = [k for k in REQUIRED if k not in manifest]
    ts = manifest.get("networks", {}).get("torchscript") if isinstance(manifest.get("networks"), dict) else None
    if not isinstance(ts, dict) or not isinstance(ts.get("file"), str):
        missing.append("networks.torchscript.file")
    if missing:
        raise UserError(f"not an export manifest (missing {', '.join(missing)})", file)
    return manifest


def load_export(path: str | os.PathLike, device: str | torch.device = "cpu") -> InferenceBundle:
    """An export folder as an ``InferenceBundle`` whose model is the TorchScript module on ``device``.

    Raises:
        UserError: see ``read_manifest``; the TorchScript file is missing or unreadable.
    """
    manifest = read_manifest(path)
    file = Path(path) / manifest["networks"]["torchscript"]["file"]
    if not file.is_file():
        raise UserError(f"the export's network file is missing ({MANIFEST} names it)", file)
    try:
        bundle = _bundle(manifest, None)
    except (TypeError, ValueError, KeyError) as exc:
        raise UserError(f"not a valid export manifest ({type(exc).__name__}: {exc})",
                        Path(path) / MANIFEST) from exc
    try:
        model = _jit_load(file, device)
    except Exception as exc:  # noqa: BLE001 - truncated zip, not TorchScript, ...: unusable
        raise UserError(f"not a readable TorchScript file ({type(exc).__name__}: {_first_line(exc)})",
                        file) from exc
    return dataclasses.replace(bundle, model=model.eval())


def _bundle(manifest: dict[str, Any], model: Any) -> InferenceBundle:
    """The InferenceBundle fields of a manifest (TypeError/ValueError/KeyError when malformed)."""
    pp = Preprocessing.from_dict(manifest["preprocessing"])
    pp.validate()
    values, mirror = manifest.get("label_values"), manifest.get("mirror_axes")
    bundle = InferenceBundle(
        model=model, spatial_dims=int(manifest["spatial_dims"]),
        patch_size=tuple(int(p) for p in manifest["patch_size"]),
        slice_axis=None if manifest.get("slice_axis") is None else int(manifest["slice_axis"]),
        preprocessing=pp, class_names=[str(c) for c in manifest["class_names"]],
        in_channels=int(manifest["in_channels"]),
        mirror_axes=None if mirror is None else tuple(int(a) for a in mirror),
        label_values=None if values is None else tuple(int(v) for v in values))
    if bundle.spatial_dims not in (2, 3) or len(bundle.patch_size) != bundle.spatial_dims:
        raise ValueError(f"spatial_dims {bundle.spatial_dims} with patch_size {bundle.patch_size}")
    if values is not None and len(values) != len(bundle.class_names):
        raise ValueError(f"{len(values)} label_values for {len(bundle.class_names)} classes")
    return bundle


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
