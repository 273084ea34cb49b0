#!/usr/bin/env python
"""Training throughput of the default 2D and 3D configurations on the demo data.

    python benchmarks/train_throughput.py [--steps 20] [--warmup 3] [--dims 2 3] [--set key=value ...]

Prints patches per second (optimisation steps including data loading, after warm-up) and the peak
resident memory of the process (ru_maxrss; CUDA: torch.cuda.max_memory_allocated as well).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from seg.config import apply_overrides, load_config  # noqa: E402
from seg.train import batches, build_training, prepare_data, resolve_device, seed_everything, train_step  # noqa: E402


def measure(dims: int, steps: int, warmup: int, overrides: list[str]) -> dict[str, float]:
    cfg = apply_overrides(load_config(), [f"data.spatial_dims={dims}", *overrides]).validate()
    device = resolve_device(cfg.train.device)
    seed_everything(0)
    data = prepare_data(cfg)
    model, opt, sched, scaler = build_training(cfg, device)
    stream = batches(cfg, data.train_cases, 0)
    for _ in range(warmup):
        train_step(model, next(stream), opt, sched, scaler, cfg, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, next(stream), opt, sched, scaler, cfg, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = {
        "dims": dims, "patch": "x".join(map(str, cfg.data.patch_size)), "batch": cfg.train.batch_size,
        "patches_per_s": steps * cfg.train.batch_size / dt, "ms_per_step": 1000 * dt / steps,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }
    if device.type == "cuda":
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dims", type=int, nargs="+", default=[3, 2])
    ap.add_argument("--set", nargs="*", default=[])
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {resolve_device('auto')}")
    print("| dims | patch | batch | params (M) | patches/s | ms/step | peak RSS (GB, process) |")
    print("|---|---|---|---|---|---|---|")
    for dims in args.dims:  # one process: RSS is the running peak, so 3D (larger) goes first
        r = measure(dims, args.steps, args.warmup, args.set)
        print(f"| {r['dims']}D | {r['patch']} | {r['batch']} | {r['params_m']:.2f} | "
              f"{r['patches_per_s']:.2f} | {r['ms_per_step']:.0f} | {r['peak_rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
