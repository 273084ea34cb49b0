#!/usr/bin/env python
"""Validation quality of our default model vs a MONAI UNet for the same wall-clock time.

    python benchmarks/quality.py [--minutes 6] [--dims 3 2] [--set key=value ...]

Both models go through the very same training loop (seg.train.train: data, augmentation, loss
CE + Dice, AdamW schedule, sliding-window validation on the demo's validation slabs), each for
``--minutes`` of wall-clock time (train.max_minutes).  The MONAI UNet has channels 16-32-64-128,
strides 2, two residual units (a benchmark-only dependency).  Prints mean foreground Dice and
Boundary IoU per class of the final validation.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from seg.config import apply_overrides, load_config  # noqa: E402
from seg.losses import masked_cross_entropy, soft_dice_loss  # noqa: E402
from seg.train import train  # noqa: E402


class MonaiUNet(nn.Module):
    """MONAI's UNet behind our model interface (forward / forward_train / loss)."""

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        from monai.networks.nets import UNet
        self.net = UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                        channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_train(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        ce, dice = masked_cross_entropy(logits, labels), soft_dice_loss(logits, labels)
        return {"coarse_ce": ce, "coarse_dice": dice, "total": ce + dice}


def run(name: str, dims: int, minutes: float, overrides: list[str], factory=None) -> dict:
    cfg = apply_overrides(load_config(), [
        f"data.spatial_dims={dims}", f"train.max_minutes={minutes}", "train.iterations=100000",
        f"train.output_dir='runs/bench_quality/{name}_{dims}d'", *overrides])
    t0 = time.time()
    res = train(cfg, progress=False, model_factory=factory)
    return {"name": name, "dims": dims, "iterations": res.iterations, "minutes": (time.time() - t0) / 60,
            **res.last_metrics}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--dims", type=int, nargs="+", default=[3, 2])
    ap.add_argument("--set", nargs="*", default=[], help="overrides applied to both runs")
    args = ap.parse_args()
    rows = []
    for dims in args.dims:
        ours = run("ours", dims, args.minutes, args.set)
        cfg = load_config()
        unet = run("monai_unet", dims, args.minutes, args.set,
                   factory=lambda c: MonaiUNet(c.data.spatial_dims, c.data.in_channels, c.data.num_classes))
        rows += [ours, unet]
        names = cfg.data.class_names[1:]
        print(f"\n{dims}D, {args.minutes} min each, validation slabs:")
        print("| model | iterations | " + " | ".join(f"Dice {n}" for n in names)
              + " | mean Dice | mean Boundary IoU |")
        print("|---|---|" + "---|" * (len(names) + 2))
        for r in (ours, unet):
            print(f"| {r['name']} | {r['iterations']} | "
                  + " | ".join(f"{r[f'dice/{n}']:.4f}" for n in names)
                  + f" | {r['dice/mean']:.4f} | {r['boundary_iou/mean']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
