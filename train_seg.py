#!/usr/bin/env python
"""Train a segmentation model: ``python train_seg.py [--config FILE] [--set key=value ...]``.

With no arguments it trains the default model of ``hparam.py`` on the embedded demo data.
Examples::

    python train_seg.py --set data.spatial_dims=2
    python train_seg.py --set model.backbone=repvgg_a0 model.head=mask train.iterations=500
    python train_seg.py --resume runs/demo/last.pt
    python train_seg.py --resume runs/demo/last.pt --set train.iterations=3000   # train it longer
    python train_seg.py --plan-only            # show what the data decide (fingerprint and plan), stop
    python train_seg.py --set data.fold=all    # every fold into OUTPUT_DIR/fold_<k>/, then python -m seg.crossval
    torchrun --nproc_per_node=4 train_seg.py --set train.batch_size=2   # DDP, 4 processes (docs/distributed.md)

Exit status: 0 done; 2 an input or configuration error, told in one line naming the file or field
(``--debug`` shows its traceback); 1 anything else (a bug: the traceback is shown).  With
``data.fold=all`` a failing fold is told in one line and the other folds still run; the status is then
2 (1 when a fold failed on a bug).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from seg.cli import add_common_flags, run_cli  # noqa: E402
from seg.errors import ConfigError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a config file defining get_config() (default: hparam.py)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override config fields, e.g. data.spatial_dims=2 train.iterations=100")
    ap.add_argument("--resume", "--c", dest="resume", metavar="CHECKPOINT",
                    help="continue a run from its last.pt with the run's own configuration (model, "
                         "optimiser, schedule, RNG); --set may only extend train.iterations or "
                         "train.max_minutes")
    ap.add_argument("--overwrite", action="store_true",
                    help="start a new run (or --plan-only) in an output folder that holds another run (its "
                         "checkpoints, logs and plan are deleted first)")
    ap.add_argument("--plan-only", action="store_true",
                    help="fingerprint the training cases, print the plan, write OUTPUT_DIR/plan.json, stop")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_common_flags(ap, unsafe_load=True)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # torchrun: only rank 0 logs and prints
    prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"{prefix}%(levelname)s %(name)s: %(message)s")
    return run_cli(lambda: run(args, rank, prefix), debug=args.debug, prefix=prefix)


def run(args: argparse.Namespace, rank: int = 0, prefix: str = "") -> int:
    """Plan or train as ``args`` say; user errors propagate (``seg.cli.run_cli`` reports them)."""
    # reason: --help stays instant (these modules load torch and every backbone, seconds)
    from seg import checkpoint, config, crossval, distributed, train as training

    if args.resume:
        if args.config or args.plan_only or args.overwrite:
            raise ConfigError("--resume continues a run with the configuration stored in its checkpoint: "
                              "it takes no --config, --plan-only or --overwrite")
        cfg, provenance = checkpoint.resume_config(config.load_config(None), args.resume, args.set,
                                                   args.unsafe_load)
    else:
        cfg, provenance = config.load_request(args.config, args.set)
        if cfg.data.fold == "all" and not args.plan_only:  # every fold, then the summary (docs/crossval.md)
            return crossval.train_folds(cfg, provenance, progress=not args.no_progress, overwrite=args.overwrite,
                                        unsafe_load=args.unsafe_load)
    if args.plan_only:
        training.planned_run(cfg, cfg.train.output_dir, progress=not args.no_progress,
                             overwrite=args.overwrite, provenance=provenance)
        print(f"plan written to {cfg.train.output_dir}/plan.json")
        return 0
    try:
        result = training.train(cfg, resume=args.resume, progress=not args.no_progress,
                                unsafe_load=args.unsafe_load, overwrite=args.overwrite, provenance=provenance)
    except distributed.RankFailure as exc:  # another process failed (its own traceback is in its output)
        print(f"{prefix}error: {exc}", file=sys.stderr)
        return 1
    if rank != 0:
        return 0
    print(f"done: {result.iterations} iterations, best mean validation Dice {result.best_dice:.4f}; "
          f"checkpoints in {result.output_dir}/ (best.pt, last.pt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
