#!/usr/bin/env python
"""Validation Dice against training minutes, from the logs of finished runs.

    python benchmarks/curve.py runs/demo [runs/other ...] [--png docs/curve.png] [--label NAME ...]

For every validation of each run (``val_log.csv``) the training-loop time at that iteration
(``train_log.csv``'s ``seconds``: steps and the validations before it) and the per-class and mean
Dice; printed as a Markdown table, and drawn to ``--png`` when given.  Times are those of the
machine the run was made on, and only comparable between runs made there alone.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def read(run: Path) -> list[dict]:
    """[{iteration, minutes, dice/<class>..., dice/mean, boundary_iou/mean}] of one run."""
    with open(run / "train_log.csv") as f:
        seconds = {int(r["iteration"]): float(r["seconds"]) for r in csv.DictReader(f)}
    with open(run / "val_log.csv") as f:
        rows = list(csv.DictReader(f))
    return [{**{k: float(v) for k, v in r.items()}, "iteration": int(r["iteration"]),
             "minutes": seconds.get(int(r["iteration"]), float("nan")) / 60} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--label", nargs="*", default=[], help="one name per run (default: the folder)")
    ap.add_argument("--png", type=Path, help="also draw the curves to this PNG")
    args = ap.parse_args()
    print("command: python " + " ".join(sys.argv))
    curves = {}
    for i, run in enumerate(args.runs):
        name = args.label[i] if i < len(args.label) else run.name
        curves[name] = rows = read(run)
        dice = [k for k in rows[0] if k.startswith("dice/") and k != "dice/mean"]
        print(f"\n{name}:\n| iteration | minutes | " + " | ".join(k[5:] for k in dice)
              + " | mean Dice | mean Boundary IoU |\n|---|---|" + "---|" * (len(dice) + 2))
        for r in rows:
            print(f"| {r['iteration']} | {r['minutes']:.1f} | " + " | ".join(f"{r[k]:.4f}" for k in dice)
                  + f" | {r['dice/mean']:.4f} | {r['boundary_iou/mean']:.4f} |")
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for name, rows in curves.items():
            ax.plot([r["minutes"] for r in rows], [r["dice/mean"] for r in rows], marker="o", label=name)
        ax.set_xlabel("training minutes (loop time)")
        ax.set_ylabel("mean validation Dice")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        args.png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png)
        print(f"\nwritten {args.png}")


if __name__ == "__main__":
    main()
