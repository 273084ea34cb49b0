#!/usr/bin/env python
"""What the point head buys: the same backbone and coarse head trained with and without PointRend.

    python benchmarks/pointrend.py --dims 3 2                        # trains 4 models (long)
    python benchmarks/pointrend.py --dims 3 --with-run runs/demo3d   # reuse a default training run
    python benchmarks/pointrend.py --dims 2 --iterations 300         # a quicker, weaker comparison

For each ``--dims``, the default ``hparam.py`` model (``--set`` overrides apply to both runs) is trained
through ``seg.train.train`` on the embedded demo twice for the same number of iterations: once with the
point head (or taken from ``--with-run``, which must hold a ``last.pt`` of a run of equal length) and
once with ``model.pointrend.enabled=False``.  Then, on the demo's validation slabs, whole-volume
sliding-window inference (the code ``infer_seg.py`` uses) in four ways:

* ``no point head``: the model trained without the point head, coarse logits upsampled;
* ``(a) coarse``: the PointRend model's coarse logits upsampled (its point head unused);
* ``(b) subdivision``: PointRend's adaptive subdivision (the default inference);
* ``(c) dense``: the point head evaluated at every output cell.

Reported per way: mean over foreground classes and cases of Dice, Boundary IoU and HD95 (mm), the
point-head evaluations as a fraction of the dense count, wall time of the whole inference, and peak
memory (CUDA allocator peak on GPU; on CPU the growth of the process's peak resident set, reset
before each way: approximate).  Targets (issue 4): in 3D (b) evaluates at most 1/8 of the points of
(c); (b) is within 1 Boundary-IoU point of (c) and at least 2 points above (a).
"""
from __future__ import annotations

import argparse
import ctypes
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from seg.checkpoint import load_checkpoint, load_for_inference  # noqa: E402
from seg.config import apply_overrides, load_config  # noqa: E402
from seg.inference import predict_volume_2d, sliding_window_inference  # noqa: E402
from seg.metrics import evaluate_case  # noqa: E402
from seg.train import planned_run, prepare_data, train  # noqa: E402

METRICS = ("dice", "boundary_iou", "hd95")


class ModePredictor:
    """``model.forward_infer(x, mode)`` that counts point-head evaluations and output cells."""

    def __init__(self, model: torch.nn.Module, mode: str) -> None:
        self.model, self.mode = model, mode
        self.evaluations = self.cells = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_infer(x, self.mode)
        self.evaluations += self.model.last_point_evaluations * x.shape[0]
        self.cells += math.prod(x.shape[2:]) * x.shape[0]
        return out


def _proc_status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    return _proc_status("VmRSS")


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else _proc_status("VmHWM")


def config_for(dims: int, pointrend: bool, iterations: int | None, out: Path, overrides: list[str]) -> Any:
    sets = [f"data.spatial_dims={dims}", f"model.pointrend.enabled={pointrend}",
            f"train.output_dir='{out}'", *overrides]
    if iterations:
        sets.append(f"train.iterations={iterations}")
    return apply_overrides(load_config(), sets)


def trained(dims: int, pointrend: bool, args: argparse.Namespace) -> Path:
    """The ``last.pt`` of a run (trained here unless ``--with-run`` gives the PointRend one)."""
    if pointrend and args.with_run:
        return Path(args.with_run) / "last.pt"
    out = Path(args.out) / f"{dims}d_{'pointrend' if pointrend else 'no_point_head'}"
    if not (out / "last.pt").exists() or args.retrain:
        print(f"# training {dims}D {'with' if pointrend else 'without'} the point head -> {out}", flush=True)
        train(config_for(dims, pointrend, args.iterations, out, args.set), progress=False, overwrite=True)
    return out / "last.pt"


def run_way(predictor: ModePredictor, bundle: Any, cases: list, cfg: Any, device: torch.device
            ) -> dict[str, float]:
    """Whole-volume inference of every validation case; mean metrics, time, memory, evaluations."""
    labels = list(range(1, cfg.data.num_classes))
    values = {m: [] for m in METRICS}
    seconds, peak = 0.0, 0
    for case in cases:
        x = torch.from_numpy(np.ascontiguousarray(case.image)).float()
        base = _reset_peak(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            if bundle.spatial_dims == 3:
                logits = sliding_window_inference(x[None], predictor, bundle.patch_size, 0.5,
                                                  batch_size=2, device=device)[0]
            else:
                logits = predict_volume_2d(x, predictor, bundle.slice_axis, bundle.patch_size,
                                           overlap=0.5, batch_size=8, device=device)
        seconds += time.perf_counter() - t0
        peak = max(peak, _peak(device) - base)
        pred = logits.argmax(0).numpy()
        res = evaluate_case(pred, case.label, case.spacing, labels, metrics=METRICS)
        for lab in labels:
            for m in METRICS:
                values[m].append(res[lab][m])
    out = {m: float(np.mean(v)) for m, v in values.items()}
    out.update(seconds=seconds, peak_mb=peak / 2**20,
               fraction=predictor.evaluations / max(1, predictor.cells))
    return out


def run_dims(dims: int, args: argparse.Namespace, device: torch.device) -> None:
    with_pr, without_pr = trained(dims, True, args), trained(dims, False, args)
    spec, found = planned_run(config_for(dims, True, args.iterations, Path(args.out) / "eval", args.set))
    cases = prepare_data(spec.config, cases=found).val_data  # the plan is the training runs' (same data)
    a = load_for_inference(with_pr, device)
    b = load_for_inference(without_pr, device)
    if a.model.point_head is None or b.model.point_head is not None:
        raise SystemExit(f"{with_pr} must have a point head and {without_pr} none")
    ways = [("no point head", ModePredictor(b.model, "coarse"), b, None),
            ("(a) coarse", ModePredictor(a.model, "coarse"), a, None),
            ("(b) subdivision", ModePredictor(a.model, "subdivision"), a, None),
            ("(c) dense", ModePredictor(a.model, "dense"), a, None)]
    ways += [(f"(b) subdivision, N={n}", ModePredictor(a.model, "subdivision"), a, n)
             for n in args.points]
    configured = a.model.pointrend["subdivision_num_points"]
    rows = {}
    for name, pred, bundle, points in ways:
        if bundle.model.pointrend is not None:
            bundle.model.pointrend["subdivision_num_points"] = points or configured
        rows[name] = run_way(pred, bundle, cases, cfg, device)
    a.model.pointrend["subdivision_num_points"] = configured
    it_a = load_checkpoint(with_pr)["iteration"]
    it_b = load_checkpoint(without_pr)["iteration"]
    print(f"\n{dims}D, {cfg.model.backbone} + {cfg.model.head}, {it_a} / {it_b} iterations "
          f"(with / without point head), {len(cases)} validation slabs, patch {a.patch_size}, "
          f"overlap 0.5, device {device}; (b) uses N={configured or 'auto'} points per step unless named")
    print("| inference | mean Dice | mean Boundary IoU | mean HD95 (mm) | point evals / dense | time (s) "
          "| peak mem (MB) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['dice']:.4f} | {r['boundary_iou']:.4f} | {r['hd95']:.2f} | "
              f"{r['fraction']:.4f} | {r['seconds']:.1f} | {r['peak_mb']:.0f} |")
    sub, dense, coarse = rows["(b) subdivision"], rows["(c) dense"], rows["(a) coarse"]
    print(f"(b) vs (c): Boundary IoU {100 * (sub['boundary_iou'] - dense['boundary_iou']):+.2f} points "
          f"(target within 1), point evaluations {sub['fraction'] / max(dense['fraction'], 1e-12):.3f} "
          f"of (c) (target <= 0.125 in 3D); (b) vs (a): Boundary IoU "
          f"{100 * (sub['boundary_iou'] - coarse['boundary_iou']):+.2f} points (target >= +2)", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[3, 2])
    ap.add_argument("--iterations", type=int, default=None, help="default: hparam.py's")
    ap.add_argument("--with-run", default=None, help="folder of a finished PointRend run to reuse "
                    "(one --dims only)")
    ap.add_argument("--out", default="runs/bench_pointrend")
    ap.add_argument("--retrain", action="store_true", help="train even if a run folder exists")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides for both runs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--points", type=int, nargs="*", default=[8192, 4096, 2048],
                    help="also run (b) with these subdivision budgets (points per step and window)")
    args = ap.parse_args(argv)
    if args.with_run and len(args.dims) != 1:
        ap.error("--with-run needs exactly one --dims")
    print("command: python " + " ".join(sys.argv), flush=True)
    for dims in args.dims:
        run_dims(dims, args, torch.device(args.device))


if __name__ == "__main__":
    main()
