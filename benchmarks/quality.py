#!/usr/bin/env python
"""Validation quality of our default model vs a MONAI UNet for the same wall-clock time.

    python benchmarks/quality.py [--dims 3 2] [--ours-run runs/demo3d runs/demo2d] [--nnunet-net]
                                 [--config data/demo/atrium_phantom/config.py] [--set key=value ...]

Ours is the default ``hparam.py`` model trained as ``python train_seg.py`` trains it (or a finished
run of it, ``--ours-run``); the MONAI UNet then gets the same wall-clock time of the training loop
(steps and validations; ``train.max_minutes``), with the same warm-up + cosine LR schedule driven by
the clock instead of the iteration count, so it ends with the budget.  Both go through the very same
training loop (seg.train.train: data, augmentation, loss CE + Dice, AdamW schedule, sliding-window
validation on the demo's validation slabs).  The MONAI UNet has channels 16-32-64-128,
strides 2, two residual units (a benchmark-only dependency).  Prints mean foreground Dice and
Boundary IoU per class of the final validation.

``--nnunet-net`` (3D) adds nnU-Net's own network as its planner configures it for the hippocampus
task's 3d_fullres plan: ``dynamic_network_architectures``' PlainConvUNet, 4 stages of 32-64-128-256
features, 3^3 kernels, strides 1-2-2-2, two convs per stage, instance norm, LeakyReLU, deep
supervision with nnU-Net's weights (1, 1/2, 1/4 normalised, the lowest output weighted 0), for the
same wall-clock through the same loop.  It is nnU-Net's *network* in our loop, not nnU-Net: batch
2 instead of 9, our augmentation, AdamW + cosine instead of SGD + poly, and minutes instead of
250,000 iterations.  Install it without its dependencies (it pins ``timm<1.0.23``; the network
does not use timm): ``pip install --no-deps dynamic_network_architectures==0.4.4``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from seg.config import apply_overrides, load_config  # noqa: E402
from seg.losses import ce_dice_losses, masked_cross_entropy, soft_dice_loss  # noqa: E402
from seg.train import described_config, train  # noqa: E402


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


class NnUNetPlainConvUNet(nn.Module):
    """nnU-Net's 3d_fullres network for the hippocampus plan, behind our model interface."""

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        norm = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[spatial_dims]
        self.net = PlainConvUNet(
            in_channels, 4, (32, 64, 128, 256), conv, 3, (1, 2, 2, 2), (2, 2, 2, 2), num_classes,
            (2, 2, 2), conv_bias=True, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True},
            nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
        raw = [0.5 ** i for i in range(3)]
        raw[-1] = 0.0  # nnU-Net v2 leaves out the lowest resolution output
        self.weights = [w / sum(raw) for w in raw]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.net.decoder.deep_supervision = False
        return self.net(x)

    def forward_train(self, x: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        self.net.decoder.deep_supervision = True
        return self.net(x)  # full resolution first

    def loss(self, outputs: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        ce, dice = ce_dice_losses(outputs, labels, self.weights)
        return {"coarse_ce": ce, "coarse_dice": dice, "total": ce + dice}


def run(name: str, dims: int, overrides: list[str], factory=None, minutes: float = 0.0,
        iterations: int | None = None, config: str | None = None) -> dict:
    tag = "" if config is None else Path(config).resolve().parent.name + "_"
    folder = f"runs/bench_quality/{tag}{name}_{dims}d"
    shutil.rmtree(folder, ignore_errors=True)  # a fresh run: the loop appends to existing logs
    sets = [f"data.spatial_dims={dims}", f"train.output_dir='{folder}'",
            f"train.max_minutes={minutes}", *overrides]
    if iterations:
        sets.append(f"train.iterations={iterations}")
    cfg = apply_overrides(load_config(config), sets)
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


@contextlib.contextmanager
def time_driven_schedule(budget_s: float):
    """Make the loop's LR schedule follow wall-clock time instead of the iteration count.

    Same shape as ours (linear warm-up over ``train.warmup_iterations`` steps, then cosine or poly
    decay), but the decay's progress is the elapsed fraction of ``budget_s`` since the scheduler was
    built (just before the loop starts), so the schedule ends when the budget does, whatever the
    step time. Patches ``seg.train.lr_lambda`` for the duration of the block.
    """
    import seg.train as st

    original = st.lr_lambda

    def timed(cfg_train):
        warm, start = cfg_train.warmup_iterations, time.monotonic()

        def factor(it: int) -> float:
            if it < warm:
                return (it + 1) / max(1, warm)
            return st.decay_factor(min(1.0, (time.monotonic() - start) / budget_s),
                                   cfg_train.schedule)
        return factor

    st.lr_lambda = timed
    try:
        yield
    finally:
        st.lr_lambda = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[3, 2])
    ap.add_argument("--ours-run", nargs="*", default=[],
                    help="finished default runs to reuse, one per --dims, in the same order")
    ap.add_argument("--set", nargs="*", default=[], help="overrides applied to both runs")
    ap.add_argument("--config", default=None, help="config file (default: hparam.py)")
    ap.add_argument("--nnunet-net", action="store_true",
                    help="3D: also nnU-Net's PlainConvUNet (hippocampus 3d_fullres plan) for the same time")
    args = ap.parse_args()
    print("command: python " + " ".join(sys.argv), flush=True)
    factory = lambda c: MonaiUNet(c.data.spatial_dims, c.data.in_channels, c.data.num_classes)  # noqa: E731
    names = described_config(apply_overrides(load_config(args.config), args.set)).data.class_names[1:]
    for i, dims in enumerate(args.dims):
        ours = from_run(Path(args.ours_run[i]), dims) if i < len(args.ours_run) else \
            run("ours", dims, args.set, config=args.config)
        # Same wall-clock budget for the UNet, its LR schedule driven by the clock so that it ends
        # with the budget; the stop comes at 99 % of it, leaving time for the final validation
        # (ours' loop time includes its final validation too).
        budget_s = ours["minutes"] * 60
        with time_driven_schedule(0.99 * budget_s):
            others = [run("monai_unet", dims, args.set, factory, minutes=0.99 * ours["minutes"],
                          iterations=10**7, config=args.config)]
        if args.nnunet_net and dims == 3:
            nnunet = lambda c: NnUNetPlainConvUNet(3, c.data.in_channels, c.data.num_classes)  # noqa: E731
            with time_driven_schedule(0.99 * budget_s):
                others.append(run("nnunet_plainconvunet", dims, args.set, nnunet,
                                  minutes=0.99 * ours["minutes"], iterations=10**7, config=args.config))
        print(f"\n{dims}D, validation slabs, same wall-clock budget ({ours['minutes']:.1f} min):")
        print("| model | iterations | minutes | " + " | ".join(f"Dice {n}" for n in names)
              + " | mean Dice | mean Boundary IoU |")
        print("|---|---|---|" + "---|" * (len(names) + 2))
        for r in (ours, *others):
            print(f"| {r['name']} | {r['iterations']} | {r['minutes']:.1f} | "
                  + " | ".join(f"{r[f'dice/{n}']:.4f}" for n in names)
                  + f" | {r['dice/mean']:.4f} | {r['boundary_iou/mean']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
