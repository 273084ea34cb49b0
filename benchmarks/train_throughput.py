#!/usr/bin/env python
"""Training throughput of the default 2D and 3D configurations on the demo data.

    python benchmarks/train_throughput.py [--steps 20] [--warmup 3] [--dims 2 3] [--nproc 1 2] [--set key=value ...]

Prints patches per second (optimisation steps including data loading, after warm-up) and the peak
resident memory of the process (ru_maxrss; CUDA: torch.cuda.max_memory_allocated as well).

``--nproc 1 2`` measures one process and then 2 DistributedDataParallel processes (spawned here, Gloo
on CPU or NCCL on one GPU each, each with its own case shard and ``train.batch_size`` patches per
step): patches/s counts the patches of all processes over the slowest process's time.  On CPU the
processes share the cores (each gets cores / N torch threads unless train.num_threads is set), so
expect little or no gain there; the gain is meant for one GPU per process.
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

import socket  # noqa: E402

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from seg import distributed as distr  # noqa: E402
from seg.config import apply_overrides, load_config  # noqa: E402
from seg.train import (TrainForward, batches, build_training, planned_run, prepare_data,  # noqa: E402
                       resolve_device, seed_everything, train_step)


def measure(dims: int, steps: int, warmup: int, overrides: list[str],
            ctx: distr.DistContext | None = None) -> dict[str, float]:
    """Throughput of ``steps`` steps after ``warmup``; with ``ctx``, of this DDP process's share."""
    spec, cases = planned_run(apply_overrides(load_config(), [f"data.spatial_dims={dims}", *overrides]))
    cfg = spec.config
    ctx = ctx or distr.DistContext(device=resolve_device(cfg.train.device))
    device = ctx.device
    seed_everything(0)
    data = prepare_data(cfg, ctx, cases)
    model, opt, sched, scaler = build_training(spec, device)
    step_model = distr.wrap_model(TrainForward(model), ctx) if ctx.distributed else model
    seed = distr.rank_seed(0, ctx.rank)
    stream = batches(cfg, distr.train_shard(data.train_cases, ctx.rank, ctx.world_size), seed)
    for _ in range(warmup):
        train_step(step_model, next(stream), opt, sched, scaler, cfg, device, ctx)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ctx.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(step_model, next(stream), opt, sched, scaler, cfg, device, ctx)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = max(ctx.all_gather_object(time.perf_counter() - t0))  # the slowest process
    rss = max(ctx.all_gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6))
    n = ctx.world_size
    out = {
        "nproc": n, "dims": dims, "patch": "x".join(map(str, cfg.data.patch_size)),
        "batch": cfg.train.batch_size, "patches_per_s": n * steps * cfg.train.batch_size / dt,
        "ms_per_step": 1000 * dt / steps, "peak_rss_gb": rss,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }
    if device.type == "cuda":
        out["peak_cuda_gb"] = max(ctx.all_gather_object(torch.cuda.max_memory_allocated() / 1e9))
    return out


def _ddp_worker(rank: int, nproc: int, port: int, args: tuple, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dims, steps, warmup, overrides = args
    cfg = apply_overrides(load_config(), list(overrides))
    torch.set_num_threads(cfg.train.num_threads or max(1, (os.cpu_count() or 1) // nproc))
    ctx = distr.setup(resolve_device(cfg.train.device), cfg.train.dist_timeout_minutes)
    try:
        result = measure(dims, steps, warmup, list(overrides), ctx)
        if ctx.is_main:
            results.put(result)
    finally:
        ctx.close()


def measure_ddp(nproc: int, dims: int, steps: int, warmup: int, overrides: list[str]) -> dict[str, float]:
    """``measure`` on ``nproc`` spawned DDP processes (rank i on cuda:i when CUDA is used)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_ddp_worker, args=(nproc, port, (dims, steps, warmup, tuple(overrides)), results),
             nprocs=nproc, join=True)
    return results.get()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dims", type=int, nargs="+", default=[3, 2])
    ap.add_argument("--nproc", type=int, nargs="+", default=[1],
                    help="numbers of processes to compare, e.g. 1 2 (DDP, batch_size per process)")
    ap.add_argument("--set", nargs="*", default=[])
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {resolve_device('auto')}")
    print("| processes | dims | patch | batch/process | params (M) | patches/s (all processes) | ms/step "
          "| peak RSS (GB, per process) |")
    print("|---|---|---|---|---|---|---|---|")
    for dims in args.dims:  # one process: RSS is the running peak, so 3D (larger) goes first
        for n in args.nproc:
            if n == 1:
                r = measure(dims, args.steps, args.warmup, args.set)
            else:
                r = measure_ddp(n, dims, args.steps, args.warmup, args.set)
            print(f"| {r['nproc']} | {r['dims']}D | {r['patch']} | {r['batch']} | {r['params_m']:.2f} | "
                  f"{r['patches_per_s']:.2f} | {r['ms_per_step']:.0f} | {r['peak_rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
