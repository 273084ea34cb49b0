"""PointRend inference modes compared: (a) coarse logits upsampled, (b) adaptive subdivision,
(c) the point head evaluated densely at every output cell.

For each mode: point-head evaluations per sample, wall time and peak memory of the part after
backbone + coarse head (identical for all modes; timed once separately), and quality on a synthetic
case (foreground Dice, and accuracy in a +-2-cell band around the true boundary).

The model is trained for ``--train-steps`` steps (with the point head) on small synthetic patches
of blobs, then run on one large synthetic input (2D 512^2, 3D 128^3 by default).  ``--checkpoint``
(a checkpoint of seg.checkpoint) skips the training; evaluation on real cases (``--data``) is a
hook for the lead to wire (``load_cases``).

Peak memory: CUDA allocator peak on GPU; on CPU the growth of the peak resident set size (VmHWM,
reset through /proc/self/clear_refs after malloc_trim), i.e. approximate.

Example:
    python benchmarks/pointrend.py --dims 2 3 --train-steps 40
"""
from __future__ import annotations

import argparse
import ctypes
import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from heads import FeatureInfo  # noqa: E402
from seg import ops  # noqa: E402
from seg.model import SegmentationModel, assemble_model, build_model  # noqa: E402

MODES = ("coarse", "subdivision", "dense")


class StubBackbone(nn.Module):
    """Plain strided-conv backbone (strides 4, 8, 16, 32) used while ``backbones`` is missing."""

    def __init__(self, spatial_dims: int, in_chans: int = 1, channels=(32, 64, 96, 128)) -> None:
        super().__init__()
        self.stages, self.feature_info, cin = nn.ModuleList(), [], in_chans
        for i, c in enumerate(channels):
            k = 4 if i == 0 else 3
            stride = 4 if i == 0 else 2
            self.stages.append(nn.Sequential(
                ops.conv(spatial_dims, cin, c, k, stride=stride, padding=0 if i == 0 else 1),
                ops.norm("group", spatial_dims, c), nn.GELU()))
            self.feature_info.append(FeatureInfo(f"stage{i}", c, (4 * 2 ** i,) * spatial_dims))
            cin = c

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for info, stage in zip(self.feature_info, self.stages):
            x = out[info.name] = stage(x)
        return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 3])
    p.add_argument("--size2d", type=int, default=512)
    p.add_argument("--size3d", type=int, default=128)
    p.add_argument("--backbone", default="convnext_atto", help="registered name, or 'stub'")
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--patch2d", type=int, default=128)
    p.add_argument("--patch3d", type=int, default=48)
    p.add_argument("--subdivision-points", type=int, default=None, help="None: auto rule")
    p.add_argument("--checkpoint", default=None, help="trained model (skips the training)")
    p.add_argument("--data", default=None, help="real cases (not wired yet)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_or_load_model(args: argparse.Namespace, dims: int) -> SegmentationModel:
    """The model under test: a checkpoint, or a fresh model with the point head."""
    if args.checkpoint:
        from seg.checkpoint import load_for_inference
        return load_for_inference(args.checkpoint).model
    pointrend = {"subdivision_num_points": args.subdivision_points}
    name = args.backbone
    if name != "stub":
        try:
            return build_model(dims, 1, 2, backbone=name, pointrend=pointrend)
        except ImportError as exc:
            print(f"# backbones not importable ({exc}); using the stub backbone")
    return assemble_model(StubBackbone(dims), dims, 2, "deeplab", None, pointrend)


def synthetic_case(dims: int, size: int, seed: int, radius=(6.0, 14.0),
                   density: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ellipsoidal blobs of a fixed physical scale: image (1, 1, *S), label (1, *S)."""
    g = torch.Generator().manual_seed(seed)
    shape = (size,) * dims
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape],
                                      indexing="ij"))
    label = torch.zeros(shape, dtype=torch.bool)
    count = max(1, round(density * math.prod(shape) / (2 * radius[1]) ** dims))
    for _ in range(count):
        centre = torch.rand(dims, generator=g) * torch.tensor(shape)
        radii = radius[0] + torch.rand(dims, generator=g) * (radius[1] - radius[0])
        dist = (((grid - centre.view(-1, *[1] * dims)) / radii.view(-1, *[1] * dims)) ** 2).sum(0)
        label |= dist < 1
    image = label.float() + 0.3 * torch.randn(shape, generator=g)
    return image[None, None], label.long()[None]


def load_cases(args: argparse.Namespace, dims: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation cases: one synthetic case (``--data`` is the hook for real ones)."""
    if args.data:
        raise SystemExit("--data is not wired yet: the lead connects it to seg.io")
    size = args.size2d if dims == 2 else args.size3d
    yield synthetic_case(dims, size, args.seed + 1000)


def quick_train(model: SegmentationModel, dims: int, patch: int, steps: int, seed: int) -> None:
    """A few AdamW steps on synthetic patches so the coarse logits and point head mean something."""
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for step in range(steps):
        pairs = [synthetic_case(dims, patch, seed + 2 * step + i) for i in range(2)]
        images, labels = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        losses = model.loss(model.forward_train(images, labels), labels)
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"#   train step {step}: " + ", ".join(f"{k} {v.item():.3f}"
                                                      for k, v in losses.items()))
    model.eval()


def measure(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float, float]:
    """Run ``fn`` once: (result, seconds, peak extra memory in MiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _proc_status("VmHWM")
    return out, seconds, (peak - base) / 2 ** 20


def _proc_status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def quality(logits: torch.Tensor, label: torch.Tensor) -> tuple[float, float]:
    """Foreground Dice and accuracy within +-2 cells of the true boundary."""
    pred = logits.argmax(1)
    inter = ((pred == 1) & (label == 1)).sum().item()
    dice = 2 * inter / max(1, (pred == 1).sum().item() + (label == 1).sum().item())
    fg = label[:, None].float()
    pool = ops.max_pool(label.ndim - 1, 5, stride=1, padding=2)
    band = (pool(fg) - (-pool(-fg))).bool()[:, 0]
    return dice, (pred == label)[band].float().mean().item()


def run_dims(args: argparse.Namespace, dims: int, device: torch.device) -> None:
    torch.manual_seed(args.seed)
    model = build_or_load_model(args, dims).to(device)
    if not args.checkpoint and args.train_steps:
        print(f"# {dims}D: training {args.train_steps} steps on "
              f"{args.patch2d if dims == 2 else args.patch3d}^{dims} patches")
        quick_train(model, dims, args.patch2d if dims == 2 else args.patch3d, args.train_steps,
                    args.seed)
    model.eval()
    for image, label in load_cases(args, dims):
        image, label = image.to(device), label.to(device)
        size = tuple(image.shape[2:])
        with torch.no_grad():
            (features, coarse), t_bb, m_bb = measure(
                lambda: model._features_and_coarse(image), device)
        print(f"\n{dims}D input {'x'.join(map(str, size))}: backbone + coarse head "
              f"{t_bb:.2f} s, {m_bb:.0f} MiB; coarse logits {tuple(coarse.shape[2:])}")
        print(f"{'mode':<12} {'point evals':>12} {'/ dense':>8} {'time s':>8} {'peak MiB':>9} "
              f"{'dice':>6} {'band acc':>9}")
        dense_evals = math.prod(size)
        for mode in MODES:
            logits, seconds, peak = measure(
                lambda: model.infer_from_features(features, coarse, size, mode), device)
            evals = model.last_point_evaluations
            dice, band = quality(logits, label)
            print(f"{mode:<12} {evals:>12d} {evals / dense_evals:>8.4f} {seconds:>8.2f} "
                  f"{peak:>9.0f} {dice:>6.3f} {band:>9.3f}")
            del logits


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"# device {device}, torch {torch.__version__}, threads {args.threads}")
    for dims in args.dims:
        run_dims(args, dims, device)


if __name__ == "__main__":
    main()
