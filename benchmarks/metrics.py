"""Times the boundary metrics on a 512x512x300 volume pair and a 512x512 image pair.

Usage: ``python benchmarks/metrics.py [--repeat 1] [--reference]``

The pair is two perturbed ellipsoids (ellipses in 2D) with anisotropic spacing. ``--reference`` also
times MONAI's implementation of the same definitions (HD95, ASSD, NSD) for comparison.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from seg import metrics as M  # noqa: E402


def perturbed_ellipsoid(shape, spacing, radii_mm, center_shift_mm, wobble, seed):
    """A boolean ellipsoid whose radius is modulated by low-frequency angular noise."""
    rng = np.random.default_rng(seed)
    axes = [(np.arange(n) - n / 2) * s - c for n, s, c in zip(shape, spacing, center_shift_mm)]
    grid = np.meshgrid(*axes, indexing="ij", sparse=True)
    r2 = sum((g / r) ** 2 for g, r in zip(grid, radii_mm))
    # low-frequency modulation from a few random plane waves
    mod = 0
    for _ in range(4):
        k = rng.normal(size=len(shape)) / 60.0
        mod = mod + np.cos(sum(g * kk for g, kk in zip(grid, k)) + rng.uniform(0, 6.3))
    return r2 <= (1 + wobble * mod / 4) ** 2


def timed(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    return value, best


def bench(shape, spacing, repeat, reference):
    radii = [0.38 * n * s for n, s in zip(shape, spacing)]
    pred = perturbed_ellipsoid(shape, spacing, radii, [2.0] * len(shape), 0.08, 0)
    ref = perturbed_ellipsoid(shape, spacing, radii, [0.0] * len(shape), 0.08, 1)
    rows = []
    sd, t_sd = timed(lambda: M.surface_distances(pred, ref, spacing), repeat)
    rows.append(("surface_distances (shared)", t_sd, f"{sd.pred_to_ref.size + sd.ref_to_pred.size} edge voxels"))
    for name, fn in [("hd95", lambda: M.hd95(pred, ref, spacing)),
                     ("assd", lambda: M.assd(pred, ref, spacing)),
                     ("nsd@2mm", lambda: M.normalized_surface_dice(pred, ref, spacing, 2.0)),
                     ("boundary_iou@2mm", lambda: M.boundary_iou(pred, ref, spacing, 2.0))]:
        value, t = timed(fn, repeat)
        rows.append((name, t, f"{value:.4f}"))
    _, t_all = timed(lambda: M.evaluate_case(pred.astype(np.uint8), ref.astype(np.uint8), spacing, [1],
                                              metrics=["hd95", "assd", "nsd"]), repeat)
    rows.append(("evaluate_case hd95+assd+nsd", t_all, "one surface pass"))
    if reference:
        rows += monai_rows(pred, ref, spacing, repeat)
    return rows


def monai_rows(pred, ref, spacing, repeat):
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice
    p, r = (torch.from_numpy(x[None, None]).float() for x in (pred, ref))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = []
        for name, fn in [
            ("monai hd95", lambda: compute_hausdorff_distance(p, r, percentile=95, spacing=spacing).item()),
            ("monai assd", lambda: compute_average_surface_distance(p, r, symmetric=True, spacing=spacing).item()),
            ("monai nsd@2mm", lambda: compute_surface_dice(p, r, [2.0], spacing=spacing,
                                                          include_background=True).item())]:
            value, t = timed(fn, repeat)
            out.append((name, t, f"{value:.4f}"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--reference", action="store_true", help="also time MONAI (test-only dependency)")
    args = ap.parse_args()
    for shape, spacing in [((512, 512, 300), (0.7, 0.7, 1.5)), ((512, 512), (0.6, 0.9))]:
        print(f"\n{'x'.join(map(str, shape))} spacing {spacing}")
        print(f"{'metric':32s} {'seconds':>8s}  value")
        for name, t, note in bench(shape, spacing, args.repeat, args.reference):
            print(f"{name:32s} {t:8.3f}  {note}")


if __name__ == "__main__":
    main()
