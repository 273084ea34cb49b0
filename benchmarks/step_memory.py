#!/usr/bin/env python
"""Memory of a training step of the default model per patch voxel: the measurement behind the CUDA
patch budget (``seg.plan.STEP_BYTES_PER_VOXEL``, ``seg.plan.cuda_patch_budget``; issue 24 item 1).

    python benchmarks/step_memory.py                 # 3D and 2D: about 2 minutes on one core
    python benchmarks/step_memory.py --dims 3 --set model.head=deeplab

For each (patch, batch) below, the default ``hparam.py`` configuration is planned on the hippocampus
demo with that patch and batch set (the point budgets follow the patch, as the plan sets them), built
as training builds it (``seg.train.build_training``) and run for one warm-up step (AdamW's moments
exist after it) and one measured step (``seg.train.train_step``, float32, on CPU, one thread) on a
synthetic batch made inside the measurement.  The measured figure is the peak of the bytes held by
the tensors the step allocates (torch.profiler's allocator events, ``profile_memory=True``, summed
in time order):
the batch, the forward activations autograd keeps for the backward, the backward's gradients, the
point head's per-point features.  What lives before the step is printed apart: weights, their
gradients and AdamW's two moments (4 x the parameter bytes).  Buffers oneDNN allocates outside
torch's allocator (its scratchpads, like cuDNN's workspaces on CUDA) are not counted.

A least-squares line through the peaks over batch x patch voxels gives the bytes per voxel (slope)
and a part that does not grow with the patch (intercept); over the sizes at or above the CPU budget
(those the CUDA rule plans), and over all (at the smallest the new gradients, allocated during the
backward, are part of the peak).  As a cross-check independent of the profiler, a spawned process
reports how much its resident set peaks above where it was, over a step at the largest size after
one at the smallest (Linux).  On CUDA the tensors of a float32 step have the same sizes; what
differs is stated with the budgets the rule gives for common devices, printed at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from seg import plan as planning  # noqa: E402
from seg.config import apply_overrides, load_config  # noqa: E402
from seg.train import build_training, planned_run, seed_everything, train_step  # noqa: E402

#: (patch, batch) measured per dims: three patch sizes at batch 2 and, at 64x64x32 / 160x192, three
#: batches, so the fit shows whether the memory follows batch x voxels (one line for both)
CASES = {3: [((32, 32, 32), 2), ((64, 64, 32), 1), ((64, 64, 32), 2), ((64, 64, 32), 4), ((64, 64, 64), 2)],
         2: [((128, 128), 4), ((160, 192), 2), ((160, 192), 4), ((160, 192), 8), ((256, 256), 4)]}
GIB = 2 ** 30
#: total memories of CUDA devices (GiB, as torch reports them), for the budgets printed at the end
DEVICES = (("8 GiB", 8), ("16 GiB", 16), ("24 GiB", 24), ("40 GiB", 40), ("80 GiB", 80),
           ("H200, 139.8 GiB", 139.8))


def cpu_model() -> str:
    """``lscpu``'s model name (the platform's processor string where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else platform.processor() or "unknown"


def peak_allocated(prof: profile) -> int:
    """Peak over the profiled region of the bytes allocated in it and not yet freed (CPU allocator
    events in time order; frees of older tensors count too, so this is the peak above the start)."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    return max(itertools.accumulate((n for _, n in events), initial=0))


def synthetic_batch(patch: tuple[int, ...], batch: int, channels: int, classes: int) -> dict[str, torch.Tensor]:
    """A batch with the loader's keys, dtypes and shapes (image (B, C, *patch), label (B, *patch))."""
    return {"image": torch.randn(batch, channels, *patch), "label": torch.randint(0, classes, (batch, *patch))}


def planned_step(dims: int, patch: tuple[int, ...], batch: int, overrides: list[str], cache: Path
                 ) -> tuple[Any, Callable[[tuple[int, ...], int], None], int]:
    """(planned config, ``step(patch, batch)``: one training step of its model on a synthetic batch,
    the model's parameter bytes) of the default configuration planned at ``patch`` x ``batch``."""
    sets = [f"data.spatial_dims={dims}", f"data.patch_size={patch}", f"train.batch_size={batch}",
            "train.device='cpu'", "train.amp=False", *overrides]
    with contextlib.redirect_stdout(io.StringIO()):  # the plan tables, once per size
        spec = planned_run(apply_overrides(load_config(), sets), cache, overwrite=True)[0]
    cfg, device = spec.config, torch.device("cpu")
    seed_everything(0)
    model, opt, sched, scaler = build_training(spec, device)

    def step(size: tuple[int, ...], n: int) -> None:
        batch = synthetic_batch(size, n, cfg.data.in_channels, cfg.data.num_classes)
        train_step(model, batch, opt, sched, scaler, cfg, device)
    return cfg, step, sum(p.numel() * p.element_size() for p in model.parameters())


def measure(dims: int, patch: tuple[int, ...], batch: int, overrides: list[str], cache: Path) -> dict:
    """Peak step bytes (above the start) of the planned default model at ``patch`` x ``batch``."""
    cfg, step, parameter_bytes = planned_step(dims, patch, batch, overrides, cache)
    step(patch, batch)  # warm-up: AdamW's moments
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(patch, batch)  # the batch is made inside: it counts
    return {"voxels": batch * int(np.prod(patch)), "peak": peak_allocated(prof),
            "resident": 4 * parameter_bytes, "points": cfg.model.pointrend.train_num_points}


def fit(rows: list[dict]) -> tuple[float, float, float]:
    """(bytes per voxel, fixed bytes, largest residual as a share of a peak): the least-squares line
    of peak over batch x patch voxels."""
    x, y = np.array([r["voxels"] for r in rows], float), np.array([r["peak"] for r in rows], float)
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept), float(np.max(np.abs(y - (slope * x + intercept)) / y))


def _kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in KiB."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _rss_growth(dims: int, patch: tuple[int, ...], batch: int, overrides: list[str], cache: Path) -> float:
    """In a fresh process: growth of the resident set (bytes) over a step at ``patch`` x ``batch``,
    after one at the smallest measured size (glibc's heap, not the profiler: a cross-check).  The
    peak is VmHWM after resetting it to the current RSS (/proc/self/clear_refs); ru_maxrss would not
    do: a spawned process inherits its parent's peak."""
    torch.set_num_threads(1)
    _, step, _ = planned_step(dims, patch, batch, overrides, cache)
    step(CASES[dims][0][0], 1)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _kib("VmRSS")
    step(patch, batch)
    return 1024.0 * (_kib("VmHWM") - before)


def rss_check(dims: int, overrides: list[str], cache: Path) -> None:
    """The largest measured size's resident-set growth per voxel, from a spawned process (Linux)."""
    if not Path("/proc/self/clear_refs").exists():
        print("cross-check skipped: it reads the peak resident set from /proc (Linux)")
        return
    patch, batch = max(CASES[dims], key=lambda c: (int(np.prod(c[0])) * c[1], c[1]))
    voxels = int(np.prod(patch)) * batch
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        grown = pool.apply(_rss_growth, (dims, patch, batch, overrides, cache))
    small = "x".join(map(str, CASES[dims][0][0]))
    print(f"cross-check: peak resident set grew {grown / 2**20:,.0f} MiB from a {small} x 1 step to a "
          f"{'x'.join(map(str, patch))} x {batch} one: {grown / voxels:,.0f} bytes per voxel")


def report(dims: int, overrides: list[str], cache: Path) -> None:
    """The table of one dims, the fits, the cross-check."""
    print(f"\n{dims}D default model{' with ' + ' '.join(overrides) if overrides else ''}:")
    print("| patch | batch | points/patch | batch x voxels | peak above start (MiB) | bytes/voxel | "
          "weights+grads+AdamW (MiB) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for patch, batch in CASES[dims]:
        r = measure(dims, patch, batch, overrides, cache)
        rows.append(r)
        print(f"| {'x'.join(map(str, patch))} | {batch} | {r['points']} | {r['voxels']:,} | "
              f"{r['peak'] / 2**20:,.0f} | {r['peak'] / r['voxels']:,.0f} | {r['resident'] / 2**20:.1f} |",
              flush=True)
    budget = planning.PATCH_BUDGET[dims]
    large = [r for r in rows if r["voxels"] >= budget]
    for name, chosen in (("all sizes", rows), (f">= the CPU budget ({budget:,})", large)):
        slope, intercept, worst = fit(chosen)
        print(f"fit over {name}: {slope:,.0f} bytes per voxel (batch x patch), intercept "
              f"{intercept / 2**20:,.1f} MiB, largest residual {worst:.1%} of a peak")
    print(f"seg.plan.STEP_BYTES_PER_VOXEL[{dims}] = {planning.STEP_BYTES_PER_VOXEL[dims]:,}")
    rss_check(dims, overrides, cache)


def print_rule() -> None:
    """The CUDA budgets ``seg.plan.cuda_patch_budget`` gives, and how the CPU figure carries over."""
    print(f"\nCUDA rule (seg.plan.cuda_patch_budget): budget = ({planning.DEVICE_MEMORY_SHARE:.0%} x total "
          f"- {planning.DEVICE_FIXED_BYTES / GIB:.0f} GiB) / ({planning.MIN_BATCH} patches x bytes per voxel), "
          f"a multiple of PATCH_BUDGET/{planning.BUDGET_STEPS}, within [PATCH_BUDGET, "
          f"{planning.MAX_BUDGET_FACTOR} x PATCH_BUDGET]")
    print("| device memory | 3D budget (voxels) | ~cube | 2D budget (pixels) | ~square |")
    print("|---|---|---|---|---|")
    for name, gib in DEVICES:
        b3, b2 = (planning.cuda_patch_budget(d, int(gib * GIB)) for d in (3, 2))
        print(f"| {name} | {b3:,} | {b3 ** (1 / 3):.0f}^3 | {b2:,} | {b2 ** 0.5:.0f}^2 |")
    print("Measured: bytes per voxel of a float32 step (above). Assumed: on CUDA the tensors have the "
          "same sizes (same graph, same dtypes); bfloat16/float16 autocast (train.amp) roughly halves "
          "the convolutions' saved activations, but norms, softmax and losses stay float32, so the rule "
          "keeps the float32 figure and the difference is headroom; the CUDA context, cuDNN/cuBLAS "
          "workspaces and the model's weights, gradients and AdamW moments are the fixed part; the "
          "caching allocator's fragmentation is the share left unused.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[3, 2])
    ap.add_argument("--set", nargs="*", default=[], help="config overrides for every measurement")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the figures are tensor sizes; one thread keeps oneDNN's buffers small
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} thread")
    with tempfile.TemporaryDirectory() as tmp:  # the fingerprint is cached there between plans
        for dims in args.dims:
            report(dims, args.set, Path(tmp) / "run")
    print_rule()


if __name__ == "__main__":
    main()
