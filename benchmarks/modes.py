#!/usr/bin/env python
"""Where the points are: one trained run's validation Dice and Boundary IoU per inference mode.

    python benchmarks/modes.py RUN [key=value ...]      # e.g. python benchmarks/modes.py runs/demo

RUN/last.pt on the validation cases of the configuration (``hparam.py`` with the ``key=value``
overrides, planned as training plans it), whole-volume sliding window (overlap 0.5): the coarse head
alone, PointRend subdivision (the default) and the point head at every voxel (dense), each without and
with test-time mirroring over the training's mirror axes.  Prints mean Dice and Boundary IoU per
foreground class and the inference time.  Set NT=1 for one thread.
"""
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from seg.checkpoint import load_for_inference  # noqa: E402
from seg.config import apply_overrides, load_config  # noqa: E402
from seg.inference import sliding_window_inference  # noqa: E402
from seg.metrics import evaluate_case  # noqa: E402
from seg.train import planned_run, prepare_data  # noqa: E402


def main() -> None:
    run, sets = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(int(os.environ.get("NT", "2")))
    print("command: python " + " ".join(sys.argv))
    spec, cases = planned_run(apply_overrides(load_config(), sets))
    cfg = spec.config
    val = prepare_data(cfg, cases=cases).val_data
    bundle = load_for_inference(run / "last.pt")
    model, labels = bundle.model, list(range(1, len(bundle.class_names)))
    tta_axes = bundle.mirror_axes if bundle.mirror_axes is not None else True
    print("| mode | mirroring | " + " | ".join(f"Dice {n}" for n in bundle.class_names[1:])
          + " | " + " | ".join(f"BIoU {n}" for n in bundle.class_names[1:]) + " | seconds |")
    print("|---|---|" + "---|" * (2 * len(labels) + 1))
    for mode in ("coarse", "subdivision", "dense"):
        for tta in (False, True):
            if tta and mode == "dense":
                continue
            t0, dice, biou = time.time(), {k: [] for k in labels}, {k: [] for k in labels}
            for case in val:
                x = torch.from_numpy(case.image).float()[None]
                logits = sliding_window_inference(x, lambda y: model.forward_infer(y, mode), bundle.patch_size,
                                                  0.5, tta=tta_axes if tta else False, batch_size=2)[0]
                res = evaluate_case(logits.argmax(0).numpy(), case.label, case.spacing, labels,
                                    metrics=("dice", "boundary_iou"))
                for k in labels:
                    dice[k].append(res[k]["dice"])
                    biou[k].append(res[k]["boundary_iou"])
            print(f"| {mode} | {'yes' if tta else 'no'} | "
                  + " | ".join(f"{np.mean(dice[k]):.4f}" for k in labels) + " | "
                  + " | ".join(f"{np.mean(biou[k]):.4f}" for k in labels) + f" | {time.time() - t0:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
