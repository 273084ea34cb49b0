"""Exported models against the eager one: max logit difference and time per window.

    python benchmarks/export.py                        # the default 3D model of the hippocampus demo
    python benchmarks/export.py --dims 2               # its 2D variant
    python benchmarks/export.py --checkpoint runs/demo/best.pt --repeats 10
    python benchmarks/export.py --part models          # which backbone x head exports (several minutes)
    python benchmarks/export.py --part volumes --checkpoint runs/demo/best.pt [--cases 40]

Without ``--checkpoint`` the model is the default architecture of ``hparam.py`` (ConvNeXt-atto with
3^d kernels, U-Net head, PointRend with the image cube and the input stage) for the demo's plan (3D
patch 40x56x40, 2D 40x56, 3 classes, the planned point budgets), seeded and untrained: the export
path and the cost of a window do not depend on the weights.  The model is exported with
``seg.export.export_checkpoint`` (which itself checks batches 1 and 3); then, on fresh windows
(noise over a smooth blob, so the model is unsure somewhere), the max |exported - eager| logit
difference, and the time per window of eager PyTorch, the TorchScript file and the ONNX file in
onnxruntime, at batch 1 and at the Predictor's default batch of 4 (best of ``--repeats`` interleaved
rounds after three warm-up rounds; torch and onnxruntime with the same number of threads).

``--part volumes`` exports ``--checkpoint`` and segments the validation subjects of fold 0 of the
hippocampus demo (``splits_final.json``) with ``seg.predict.Predictor`` (what ``infer_seg.py`` runs)
from the checkpoint and from the export: voxels that differ between the two label maps, and seconds
per case of each.

``--part models`` exports a small untrained model of every backbone family (its smallest variant)
with each coarse head, in 2D and 3D (32^d patch, PointRend with the image cube and the input stage), and
prints per model the TorchScript difference and what the ONNX file holds ('forward': everything,
'coarse': no subdivision) or why it was skipped.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from seg.checkpoint import FORMAT_VERSION  # noqa: E402

PATCHES = {3: (40, 56, 40), 2: (40, 56)}


def default_checkpoint(dims: int, path: Path) -> Path:
    """The default model for the demo's plan, untrained, in the checkpoint layout of seg.train."""
    from backbones import backbone_options
    from hparam import PointRendConfig, get_config
    from seg.model import build_model
    from seg.plan import plan_subdivision_points, plan_train_points
    from seg.preprocess import Preprocessing

    cfg, patch = get_config(), PATCHES[dims]
    train_points = plan_train_points(patch)
    pointrend = dataclasses.asdict(dataclasses.replace(
        PointRendConfig(), train_num_points=train_points,
        subdivision_num_points=plan_subdivision_points(patch, train_points)))
    config = dict(spatial_dims=dims, in_channels=1, num_classes=3, backbone=cfg.model.backbone,
                  backbone_kwargs=backbone_options(cfg.model.backbone, cfg.model.backbone_kwargs), head=cfg.model.head,
                  head_kwargs=dict(cfg.model.head_kwargs), pointrend=pointrend,
                  input_stages=list(cfg.model.input_stages))
    torch.manual_seed(0)
    model = build_model(**config)
    torch.save({"format_version": FORMAT_VERSION, "model": model.state_dict(), "model_config": config,
                "spatial_dims": dims, "patch_size": patch, "slice_axis": 2 if dims == 2 else None,
                "preprocessing": Preprocessing("zscore").to_dict(),
                "class_names": ["background", "anterior", "posterior"], "in_channels": 1,
                "mirror_axes": list(range(dims))}, path)
    return path


def windows(patch: tuple[int, ...], channels: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, p) for p in patch], indexing="ij")
    blob = (sum(a ** 2 for a in axes) < 0.4).float() * 3 - 1
    return 0.5 * torch.randn((n, channels, *patch), generator=g) + blob


def per_window_ms(runs: list, x: torch.Tensor, repeats: int) -> list[float]:
    """Best time per window of each of ``runs`` on ``x``, in ms: the calls are interleaved (one of
    each per round), so load from other processes hits all alike, and the best of ``repeats``
    rounds is kept (the least disturbed), after three warm-up rounds (TorchScript's profiling
    executor optimises on its first calls)."""
    best = [float("inf")] * len(runs)
    for r in range(3 + repeats):
        for i, run in enumerate(runs):
            t0 = time.perf_counter()
            run(x)
            if r >= 3:
                best[i] = min(best[i], time.perf_counter() - t0)
    return [1000 * b / x.shape[0] for b in best]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


FAMILIES = ("convnext_atto", "repvgg_a0", "swinv2_tiny", "conv2former_n", "cmt_ti")


def models_part() -> None:
    """Export every family's smallest variant with every head, 2D and 3D; one line each."""
    from heads import list_heads
    from seg.errors import UserError
    from seg.export import export_checkpoint
    from seg.model import build_model
    from seg.preprocess import Preprocessing

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import point_options

    logging.getLogger("seg.export").setLevel(logging.ERROR)
    print(f"{'dims':>4} {'backbone':<14} {'head':<8} {'TorchScript':>12}  ONNX")
    for dims in (2, 3):
        for backbone in FAMILIES:
            for head in list_heads():
                config = dict(spatial_dims=dims, in_channels=1, num_classes=3, backbone=backbone,
                              backbone_kwargs={}, head=head, head_kwargs={},
                              pointrend=point_options(image_features="cube",
                                                      fc_dim=32, subdivision_num_points=256))
                torch.manual_seed(0)
                model = build_model(**config)
                tmp = Path(tempfile.mkdtemp(prefix="export-models-"))
                torch.save({"format_version": FORMAT_VERSION, "model": model.state_dict(), "model_config": config,
                            "spatial_dims": dims, "patch_size": (32,) * dims, "slice_axis": None,
                            "preprocessing": Preprocessing("zscore").to_dict(),
                            "class_names": ["bg", "a", "b"], "in_channels": 1}, tmp / "model.pt")
                try:
                    nets = export_checkpoint(tmp / "model.pt", tmp / "export").manifest["networks"]
                except UserError as exc:
                    print(f"{dims:>4} {backbone:<14} {head:<8} {'refused':>12}  {exc}")
                    continue
                ts = max(nets["torchscript"]["max_abs_diff_vs_eager"].values())
                onnx = nets["onnx"]
                what = (f"{onnx['mode']} ({max(onnx['max_abs_diff_vs_eager'].values()):.1e})"
                        if onnx["file"] else f"skipped: {onnx['skipped']}")
                print(f"{dims:>4} {backbone:<14} {head:<8} {ts:>12.1e}  {what}", flush=True)


def volumes_part(args: argparse.Namespace) -> None:
    """Label maps of the checkpoint and of its export on the hippocampus validation subjects."""
    import json

    from seg import io
    from seg.export import export_checkpoint
    from seg.predict import Predictor

    if not args.checkpoint:
        raise SystemExit("--part volumes needs --checkpoint (a trained 3D or 2D hippocampus model)")
    demo = Path(__file__).resolve().parent.parent / "data" / "demo" / "hippocampus"
    names = json.loads((demo / "splits_final.json").read_text())[0]["val"][: args.cases]
    tmp = Path(tempfile.mkdtemp(prefix="export-volumes-"))
    t0 = time.perf_counter()
    export_checkpoint(args.checkpoint, tmp / "export")
    export_s = time.perf_counter() - t0
    predictors = {"checkpoint": Predictor.from_checkpoint(args.checkpoint),
                  "export": Predictor.from_checkpoint(tmp / "export")}
    seconds = {k: 0.0 for k in predictors}
    differing = voxels = 0
    with torch.no_grad():
        for name in names:
            image, meta = io.read_case(demo / "imagesTr" / f"{name}.nii.gz")
            labels = {}
            for key, predictor in predictors.items():
                t = time.perf_counter()
                labels[key] = predictor.predict_array(image, meta.spacing)[0]
                seconds[key] += time.perf_counter() - t
            differing += int((labels["checkpoint"] != labels["export"]).sum())
            voxels += labels["checkpoint"].size
    n = len(names)
    print(f"\n{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.checkpoint}: exported in {export_s:.1f} s; {n} validation subjects of fold 0, "
          f"{voxels:,} voxels: {differing} differ between checkpoint and export")
    print(f"seconds per case (overlap 0.5, batch 4, no TTA): checkpoint {seconds['checkpoint'] / n:.3f}, "
          f"export {seconds['export'] / n:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="figures", choices=("figures", "models", "volumes"))
    p.add_argument("--cases", type=int, default=40, help="--part volumes: validation subjects segmented")
    p.add_argument("--checkpoint", help="a trained checkpoint (default: the default model, untrained)")
    p.add_argument("--dims", type=int, default=3, choices=(2, 3))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--windows", type=int, default=8, help="windows compared (batch 1 each)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.part == "models":
        models_part()
        return
    if args.part == "volumes":
        volumes_part(args)
        return
    import onnxruntime as ort

    from seg.checkpoint import load_for_inference
    from seg.export import ONNX_FILE, export_checkpoint, load_export

    tmp = Path(tempfile.mkdtemp(prefix="export-bench-"))
    ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint(args.dims, tmp / "model.pt")
    t0 = time.perf_counter()
    result = export_checkpoint(ckpt, tmp / "export")
    export_s = time.perf_counter() - t0
    eager, exported = load_for_inference(ckpt), load_export(tmp / "export", unsafe_load=True)
    onnx_entry = result.manifest["networks"]["onnx"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = None if onnx_entry["file"] is None else ort.InferenceSession(
        str(tmp / "export" / ONNX_FILE), options, providers=["CPUExecutionProvider"])

    def run_onnx(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {"image": x.numpy()})[0]

    patch, c = eager.patch_size, eager.in_channels
    diff_ts = diff_onnx = 0.0
    with torch.no_grad():
        for i in range(args.windows):
            x = windows(patch, c, 1, seed=1000 + i)
            ref = eager.model(x)
            diff_ts = max(diff_ts, float((exported.model(x) - ref).abs().max()))
            if session is not None:
                diff_onnx = max(diff_onnx, float(np.abs(run_onnx(x) - ref.numpy()).max()))
        print(f"\n{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
              f"onnxruntime {ort.__version__}")
        print(f"model: {ckpt if args.checkpoint else 'default ' + str(args.dims) + 'D model, untrained'}, "
              f"patch {'x'.join(map(str, patch))}; export {export_s:.1f} s")
        print(f"computes: {result.manifest['computes']}")
        print(f"ONNX: {onnx_entry.get('computes', onnx_entry.get('skipped'))}")
        print(f"max |logit difference| over {args.windows} windows: TorchScript {diff_ts:.2e}, "
              f"ONNX {diff_onnx:.2e}" if session is not None else "(no ONNX)")
        print(f"{'batch':>5} {'eager ms/window':>16} {'TorchScript':>12} {'ONNX Runtime':>13}")
        for n in (1, 4):
            x = windows(patch, c, n, seed=7)
            row = per_window_ms([eager.model, exported.model] + ([run_onnx] if session else []), x,
                                args.repeats) + ([] if session else [float("nan")])
            print(f"{n:>5} {row[0]:>16.1f} {row[1]:>12.1f} {row[2]:>13.1f}")


if __name__ == "__main__":
    main()
