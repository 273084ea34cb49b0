#!/usr/bin/env python
"""Validation quality of our default model vs a MONAI UNet for the same wall-clock time.

    python benchmarks/quality.py [--dims 3 2] [--ours-run runs/demo3d runs/demo2d] [--set key=value ...]

Ours is the default ``hparam.py`` model trained as ``python train_seg.py`` trains it (or a finished
run of it, ``--ours-run``); the MONAI UNet then gets the same wall-clock time (``train.max_minutes``,
with an iteration count sized so its LR schedule ends within it).  Both go through the very same
training loop (seg.train.train: data, augmentation, loss CE + Dice, AdamW schedule, sliding-window
validation on the demo's validation slabs).  The MONAI UNet has channels 16-32-64-128,
strides 2, two residual units (a benchmark-only dependency).  Prints mean foreground Dice and
Boundary IoU per class of the final validation.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
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


def run(name: str, dims: int, overrides: list[str], factory=None, minutes: float = 0.0,
        iterations: int | None = None) -> dict:
    folder = f"runs/bench_quality/{name}_{dims}d"
    shutil.rmtree(folder, ignore_errors=True)  # a fresh run: the loop appends to existing logs
    sets = [f"data.spatial_dims={dims}", f"train.output_dir='{folder}'",
            f"train.max_minutes={minutes}", *overrides]
    if iterations:
        sets.append(f"train.iterations={iterations}")
    cfg = apply_overrides(load_config(), sets)
    res = train(cfg, progress=False, model_factory=factory)
    return {**from_run(res.output_dir, dims), "name": name}


def from_run(folder: Path, dims: int) -> dict:
    """The figures of a finished run: its last validation and its training-loop wall time (steps and
    validations, the time ``train.max_minutes`` bounds)."""
    with open(folder / "train_log.csv") as f:
        last = list(csv.DictReader(f))[-1]
    with open(folder / "val_log.csv") as f:
        val = list(csv.DictReader(f))[-1]
    return {"name": "ours", "dims": dims, "iterations": int(last["iteration"]),
            "minutes": float(last["seconds"]) / 60, **{k: float(v) for k, v in val.items()}}


def step_and_validation_seconds(dims: int, overrides: list[str], factory, steps: int = 60,
                                val_every: int = 30, warmup: int = 5) -> tuple[float, float]:
    """Seconds per training step and per validation of ``factory``'s model, measured in the real loop.

    A short run of ``steps`` iterations validating every ``val_every``: from its ``train_log.csv``
    the step time is the mean gap between iterations within a segment (after ``warmup``), and the
    validation time is the mean extra gap after each validation (which includes the next segment's
    fresh data stream, as in the full run).
    """
    run("calibrate", dims, [*overrides, f"train.val_every={val_every}"], factory,
        iterations=steps)
    with open(Path(f"runs/bench_quality/calibrate_{dims}d") / "train_log.csv") as f:
        seconds = [float(r["seconds"]) for r in csv.DictReader(f)]
    gaps = {it: seconds[it - 1] - seconds[it - 2] for it in range(2, len(seconds) + 1)}  # before `it`
    after_val = [g for it, g in gaps.items() if (it - 1) % val_every == 0]
    plain = [g for it, g in gaps.items() if (it - 1) % val_every and it > warmup]
    step_s = sum(plain) / len(plain)
    return step_s, sum(after_val) / len(after_val) - step_s


def iterations_for_budget(budget_s: float, step_s: float, val_s: float, val_every: int) -> int:
    """Most iterations whose steps plus validations (every ``val_every`` and at the end) fit the budget.

    Leaves 3 % of the budget as slack for timing noise; ``train.max_minutes`` is the hard stop anyway.
    """
    iters = int((0.97 * budget_s - val_s) / (step_s + val_s / val_every))
    return max(1, iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[3, 2])
    ap.add_argument("--ours-run", nargs="*", default=[],
                    help="finished default runs to reuse, one per --dims, in the same order")
    ap.add_argument("--set", nargs="*", default=[], help="overrides applied to both runs")
    ap.add_argument("--unet-iterations", type=int, nargs="*", default=[],
                    help="the UNet's iteration counts, one per --dims, instead of sizing them from "
                         "the calibration run (the budget is still a hard stop)")
    args = ap.parse_args()
    print("command: python " + " ".join(sys.argv), flush=True)
    factory = lambda c: MonaiUNet(c.data.spatial_dims, c.data.in_channels, c.data.num_classes)  # noqa: E731
    names = load_config().data.class_names[1:]
    for i, dims in enumerate(args.dims):
        ours = from_run(Path(args.ours_run[i]), dims) if i < len(args.ours_run) else \
            run("ours", dims, args.set)
        # Same wall-clock budget for the UNet; its schedule is sized from its measured step and
        # validation times so that steps and validations fill the budget (a hard stop as well).
        budget_s = ours["minutes"] * 60
        if i < len(args.unet_iterations):
            iters = args.unet_iterations[i]
        else:
            step_s, val_s = step_and_validation_seconds(dims, args.set, factory)
            val_every = apply_overrides(load_config(), args.set).train.val_every
            iters = iterations_for_budget(budget_s, step_s, val_s, val_every)
            print(f"{dims}D UNet: {step_s * 1000:.0f} ms/step, {val_s:.1f} s/validation -> {iters} "
                  f"iterations in {budget_s / 60:.1f} min", flush=True)
        unet = run("monai_unet", dims, args.set, factory, minutes=ours["minutes"], iterations=iters)
        print(f"\n{dims}D, validation slabs, same wall-clock budget ({ours['minutes']:.1f} min):")
        print("| model | iterations | minutes | " + " | ".join(f"Dice {n}" for n in names)
              + " | mean Dice | mean Boundary IoU |")
        print("|---|---|---|" + "---|" * (len(names) + 2))
        for r in (ours, unet):
            print(f"| {r['name']} | {r['iterations']} | {r['minutes']:.1f} | "
                  + " | ".join(f"{r[f'dice/{n}']:.4f}" for n in names)
                  + f" | {r['dice/mean']:.4f} | {r['boundary_iou/mean']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
