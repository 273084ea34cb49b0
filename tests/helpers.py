"""Helpers the tests share (not tests themselves): synthetic cases, a tiny run's configuration,
PointRend options.  ``conftest.py`` puts this folder and the repository root on ``sys.path``."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from hparam import Config, PointRendConfig
from seg.config import apply_overrides


def write_case(folder: Path, name: str, rng: np.random.Generator, ext: str = ".nii.gz",
               shape=(34, 38, 36), spacing=(1.2, 1.0, 1.5)) -> None:
    """A synthetic 3-class case: a sphere (class 2) inside a larger sphere (class 1)."""
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    c = [s / 2 + rng.uniform(-3, 3) for s in shape]
    r = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
    label = np.where(r < 8, 2, np.where(r < 14, 1, 0)).astype(np.uint8)
    image = (label * 40.0 + rng.normal(0, 8, shape) + 10).astype(np.float32)
    for arr, sub in ((image, "images"), (label, "labels")):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(spacing)
        img.SetOrigin((-10.0, 5.0, 2.5))
        (folder / sub).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(folder / sub / f"{name}{ext}"))


def tiny_sets(root: Path, out: Path, dims: int, iterations: int = 3) -> list[str]:
    """The ``--set`` overrides of a tiny, fast run on ``root``'s synthetic cases."""
    return [
        f"data.root='{root}'", "data.images_dir=images", "data.labels_dir=labels",
        "data.val_images_dir=None", "data.val_labels_dir=None", "data.split_file=None",
        "data.val_fraction=0.25",
        f"data.spatial_dims={dims}", f"data.patch_size={(32, 32, 32) if dims == 3 else (32, 32)}",
        "data.class_names=['bg','outer','inner']", "data.samples_per_volume=2", "data.queue_length=4",
        "data.normalization=zscore", "data.augment_affine=False",
        f"model.pointrend.train_num_points={256 if dims == 3 else 128}",
        f"model.pointrend.subdivision_num_points={2048 if dims == 3 else 512}",
        "model.pointrend.fc_dim=32",
        f"train.iterations={iterations}", "train.val_every=2", "train.val_share=1.0", "train.batch_size=2",
        "train.warmup_iterations=1", f"train.output_dir='{out}'", "train.lr=1e-3",
    ]


def tiny_config(root: Path, out: Path, dims: int, iterations: int = 3) -> Config:
    return apply_overrides(Config(), tiny_sets(root, out, dims, iterations))


def point_options(**overrides):
    """A complete PointRend option dict for tests: ``hparam.PointRendConfig`` with detectron2's
    point head (no image features, coarse logits only at the input) and small point budgets, then
    ``overrides`` (``in_features`` None: the model's default levels, ``default_point_features``)."""
    base = PointRendConfig(train_num_points=64, subdivision_num_points=512, image_features="none",
                           coarse_pred_each_layer=False)
    return {**dataclasses.asdict(base), **overrides}


@contextlib.contextmanager
def captured(logger: str = "", level: int = logging.INFO) -> Iterator[tuple[list[str], io.StringIO]]:
    """(messages logged by ``logger`` at ``level`` and above, what is printed to stderr) while the block runs."""
    messages: list[str] = []
    handler = logging.Handler(level)
    handler.emit = lambda record: messages.append(record.getMessage())
    log = logging.getLogger(logger)
    old = log.level
    log.setLevel(level)
    log.addHandler(handler)
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            yield messages, err
    finally:
        log.removeHandler(handler)
        log.setLevel(old)
