"""Shared test set-up: no network at albumentations import, repository root importable."""
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def point_options(**overrides):
    """A complete PointRend option dict for tests: ``hparam.PointRendConfig`` with detectron2's
    point head (no image features, no fine stem, coarse logits only at the input) and small point
    budgets, then ``overrides``."""
    import dataclasses

    from hparam import PointRendConfig

    base = PointRendConfig(train_num_points=64, subdivision_num_points=512, image_features="none",
                           fine_stem_channels=0, coarse_pred_each_layer=False)
    return {**dataclasses.asdict(base), **overrides}
