"""Sliding-window inference: speed and memory, ours vs MONAI, and a full-size CT-like volume.

    python benchmarks/inference.py                 # both parts (a few minutes on 2 CPU cores)
    python benchmarks/inference.py --part compare --repeats 5
    python benchmarks/inference.py --part large --device cuda

Part 1 (compare): the same small 3D conv net, patch, overlap 0.5 and Gaussian blending through
``seg.inference.sliding_window_inference`` and ``monai.inferers.sliding_window_inference``.  The
volume is chosen so both place their windows identically; the outputs must agree to 1e-4.  Each
measurement runs in a fresh process: voxels per second (best of ``--repeats``) and the peak resident
memory above the process's baseline (ru_maxrss after imports and model set-up).

Part 2 (large): a 512 x 512 x 300 synthetic int16 volume through the whole ``Predictor.predict_array``
pipeline (z-score, sliding window, argmax to uint8) with a cheap 3-class 3D model; reports the time
and the process's peak resident memory (target: at most 4 GB).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

PATCH, OVERLAP = (48, 48, 32), 0.5
VOLUME = (120, 120, 80)  # S - P is a multiple of MONAI's interval (24, 24, 16) on every axis


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def small_net(channels: int = 8, classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, channels, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv3d(channels, channels, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv3d(channels, classes, 1)).eval()


def _run_compare(which: str, device: str, batch_size: int, repeats: int, queue) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    net = small_net().to(device)
    x = torch.randn(1, 1, *VOLUME, generator=torch.Generator().manual_seed(0))
    if which == "ours":
        from seg.inference import sliding_window_inference

        fn = lambda: sliding_window_inference(x, net, PATCH, OVERLAP, "gaussian", batch_size=batch_size,  # noqa: E731
                                              device=device)
    else:
        from monai.inferers import sliding_window_inference as monai_swi

        def fn():
            with torch.no_grad():
                return monai_swi(x, PATCH, batch_size, net, overlap=OVERLAP, mode="gaussian",
                                 sw_device=device, device="cpu")
    base = _rss_mb()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    queue.put((which, min(times), _rss_mb() - base, out.float().cpu().numpy()))


def compare(device: str, batch_size: int, repeats: int) -> None:
    ctx = mp.get_context("spawn")
    results = {}
    for which in ("monai", "ours", "monai", "ours"):  # interleaved: both see the same machine load
        q = ctx.Queue()
        p = ctx.Process(target=_run_compare, args=(which, device, batch_size, repeats, q))
        p.start()
        name, t, mem, out = q.get()
        p.join()
        prev = results.get(name)
        results[name] = (min(t, prev[0]) if prev else t, mem, out)
    vox = float(np.prod(VOLUME))
    diff = float(np.abs(results["ours"][2] - results["monai"][2]).max())
    print(f"\n[compare] volume {VOLUME}, patch {PATCH}, overlap {OVERLAP}, gaussian, batch {batch_size}, "
          f"device {device}, threads {os.environ.get('BENCH_THREADS', torch.get_num_threads())}")
    for name in ("ours", "monai"):
        t, mem, _ = results[name]
        print(f"  {name:6s} {t:7.3f} s  {vox / t / 1e6:7.3f} Mvoxel/s  peak RSS +{mem:7.1f} MB")
    print(f"  speed ratio ours/MONAI = {results['monai'][0] / results['ours'][0]:.3f}; "
          f"max |ours - MONAI| = {diff:.2e} ({'OK' if diff <= 1e-4 else 'MISMATCH'})")


class _CheapModel(torch.nn.Module):
    """3 classes from one 3x3x3 conv: a stand-in whose cost is negligible next to the blending."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def _run_large(shape, patch, device: str, batch_size: int, queue) -> None:
    from seg.predict import Predictor
    from seg.preprocess import Preprocessing

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    bundle = types.SimpleNamespace(model=_CheapModel().to(device), spatial_dims=3, patch_size=patch,
                                   slice_axis=None, class_names=["bg", "a", "b"], in_channels=1,
                                   preprocessing=Preprocessing("zscore"))
    rng = np.random.default_rng(0)
    image = rng.integers(-1000, 1500, size=(1, *shape), dtype=np.int16)
    base = _rss_mb()
    t0 = time.perf_counter()
    labels, _ = Predictor(bundle, overlap=0.5, batch_size=batch_size).predict_array(image, (0.7, 0.7, 2.5))
    queue.put((time.perf_counter() - t0, base, _rss_mb(), labels.dtype.name, labels.shape))


def large(shape, patch, device: str, batch_size: int) -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_run_large, args=(shape, patch, device, batch_size, q))
    p.start()
    t, base, peak, dtype, out_shape = q.get()
    p.join()
    vox = float(np.prod(shape))
    print(f"\n[large] volume {shape} int16, 3-class cheap 3D model, patch {patch}, overlap 0.5, "
          f"gaussian, batch {batch_size}, device {device}")
    print(f"  {t:.1f} s ({vox / t / 1e6:.2f} Mvoxel/s), labels {dtype} {out_shape}, "
          f"peak RSS {peak / 1024:.2f} GB (baseline {base / 1024:.2f} GB) "
          f"-> {'OK' if peak <= 4096 else 'OVER'} the 4 GB target")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("all", "compare", "large"), default="all")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--large-shape", type=int, nargs=3, default=(512, 512, 300))
    ap.add_argument("--large-patch", type=int, nargs=3, default=(128, 128, 64))
    args = ap.parse_args()
    print("command: python " + " ".join(sys.argv))
    if args.part in ("all", "compare"):
        compare(args.device, args.batch_size, args.repeats)
    if args.part in ("all", "large"):
        large(tuple(args.large_shape), tuple(args.large_patch), args.device, args.batch_size)


if __name__ == "__main__":
    main()
