#!/usr/bin/env python
"""Backbone figures: parameters, GFLOPs, forward / training-step time, peak memory; RepVGG fused.

    python benchmarks/backbones.py                       # every variant, 2D 256^2 and 3D 96^3
    python benchmarks/backbones.py --variants convnext_atto repvgg_a0 --dims 2
    python benchmarks/backbones.py --part repvgg          # fused vs unfused only
    python benchmarks/backbones.py --device cuda

Each (variant, dims) measurement runs in a fresh process, so the peak memory is that variant's own:
on CPU the rise of the process's peak resident set (ru_maxrss) over its baseline after the model is
built, on CUDA ``torch.cuda.max_memory_allocated``.  GFLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` for one forward of one sample (multiply-add = 2 FLOPs).
Times are the median of ``--repeats`` runs after one warm-up; the training step is forward +
backward of the mean of the deepest feature (batch ``--batch``).

The RepVGG part compares the training form with ``backbones.reparameterize_model`` (eval mode, 2D,
batch 8, 224^2 by default): the fused form must be at least 1.5x faster.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

SIZES = {2: (256, 256), 3: (96, 96, 96)}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_ms(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _measure(name: str, dims: int, batch: int, repeats: int, device: str, queue) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from backbones import build_backbone

    try:
        model = build_backbone(name, dims, in_chans=1).to(device)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        x1 = torch.randn(1, 1, *SIZES[dims], device=device)
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x1)
        gflops = counter.get_total_flops() / 1e9
        x = torch.randn(batch, 1, *SIZES[dims], device=device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        base = _rss_mb()
        with torch.no_grad():
            fwd = _median_ms(lambda: model(x), repeats, device)
        model.train()

        def step():
            feats = model(x)
            sum(f.float().mean() for f in feats.values()).backward()

        train_ms = _median_ms(step, repeats, device)
        peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
                else _rss_mb() - base)
        queue.put((name, dims, params, gflops, fwd, train_ms, peak, ""))
    except Exception as exc:  # report and go on with the other variants
        queue.put((name, dims, float("nan"), float("nan"), float("nan"), float("nan"), float("nan"),
                   f"{type(exc).__name__}: {exc}"[:120]))


def _in_process(target, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def table(variants: list[str], dims_list: list[int], batch: int, repeats: int, device: str) -> None:
    print(f"\n[backbones] device {device}, threads {torch.get_num_threads()}, batch {batch} for times "
          f"and memory, GFLOPs per sample; 2D {SIZES[2]}, 3D {SIZES[3]}")
    print("| variant | dims | params (M) | GFLOPs | forward (ms) | train step (ms) | peak mem (MB) |")
    print("|---|---|---|---|---|---|---|")
    for dims in dims_list:
        for name in variants:
            n, d, params, gflops, fwd, tr, peak, err = _in_process(
                _measure, name, dims, batch, repeats, device)
            if err:
                print(f"| {n} | {d}D | failed: {err} | | | | |")
            else:
                print(f"| {n} | {d}D | {params:.2f} | {gflops:.2f} | {fwd:.0f} | {tr:.0f} | {peak:.0f} |",
                      flush=True)


def repvgg(name: str, batch: int, size: int, repeats: int, device: str) -> None:
    from backbones import build_backbone, reparameterize_model

    torch.manual_seed(0)
    model = build_backbone(name, 2, in_chans=3).to(device).eval()
    fused = reparameterize_model(model)
    print(f"\n[repvgg] {name} 2D, batch {batch}, {size}x{size}, device {device}, eval mode, "
          f"median of {repeats}; both forms in the same memory format")
    for fmt_name, fmt in (("contiguous (NCHW)", torch.contiguous_format), ("channels_last", torch.channels_last)):
        model, fused = model.to(memory_format=fmt), fused.to(memory_format=fmt)
        x = torch.randn(batch, 3, size, size, device=device).to(memory_format=fmt)
        with torch.no_grad():
            diff = max(float((a - b).abs().max() / b.abs().max())
                       for a, b in zip(fused(x).values(), model(x).values()))
            t_train = _median_ms(lambda: model(x), repeats, device)
            t_fused = _median_ms(lambda: fused(x), repeats, device)
        ratio = t_train / t_fused
        print(f"  {fmt_name:18s} training form {t_train:.0f} ms, fused {t_fused:.0f} ms: speed-up {ratio:.2f}x "
              f"({'OK' if ratio >= 1.5 else 'BELOW'} the 1.5x target); max relative difference {diff:.1e}")


def main() -> None:
    from backbones import list_backbones

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("all", "table", "repvgg"), default="all")
    ap.add_argument("--variants", nargs="+", default=None, help="default: every registered variant")
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repvgg", default="repvgg_a0")
    args = ap.parse_args()
    print("command: python " + " ".join(sys.argv))
    if args.part in ("all", "table"):
        table(args.variants or list_backbones(), args.dims, args.batch, args.repeats, args.device)
    if args.part in ("all", "repvgg"):
        repvgg(args.repvgg, 8, 224, args.repeats, args.device)


if __name__ == "__main__":
    main()
