"""The training stream: preprocessed cases -> torchio queue of patches -> batches, 2D and 3D alike.

One pipeline serves both: each case is loaded with ``load_case_arrays`` (the preprocessing inference
applies), padded to at least the patch, wrapped in a ``tio.Subject`` and (3D) augmented by torchio; a
``tio.Queue`` keeps ``queue_length`` patches from several volumes drawn by ``ForegroundSampler``.  A 2D
patch is a slice patch of size 1 along ``slice_axis`` (native 2D images get that axis inserted), squeezed
and augmented with albumentations.  The stream is infinite and fully determined by its seed.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torchio as tio
from torch.utils.data import Dataset

from datasets.arrays import load_case_arrays
from datasets.augment import Augment2D, augmentation_3d
from datasets.cases import Case
from datasets.rng import SeededStream
from datasets.sampling import ForegroundSampler, pad_to_at_least

Batch = dict[str, torch.Tensor]


def sample_shape(data_cfg: Any) -> tuple[int, int, int]:
    """The (X, Y, Z) block the sampler draws: the 3D patch, or the 2D patch with 1 at ``slice_axis``."""
    if data_cfg.spatial_dims == 3:
        return tuple(int(p) for p in data_cfg.patch_size)
    size = [int(p) for p in data_cfg.patch_size]
    size.insert(data_cfg.slice_axis, 1)
    return tuple(size)


def label_tensor(label: np.ndarray, num_classes: int) -> torch.Tensor:
    """A compact integer tensor for a label map (uint8 up to 256 classes)."""
    return torch.from_numpy(label.astype(np.uint8 if num_classes <= 256 else np.int32))


class CaseDataset(Dataset):
    """Cases as padded (and optionally augmented) torchio subjects, read lazily.

    Args:
        cases: the training cases.
        data_cfg: ``hparam.DataConfig``.
        transform: torchio transform applied to each subject (3D augmentation), or None.
    """

    def __init__(self, cases: Sequence[Case], data_cfg: Any, transform: tio.Transform | None = None) -> None:
        self.cases, self.data_cfg, self.transform = list(cases), data_cfg, transform
        self.size = sample_shape(data_cfg)

    def __len__(self) -> int:
        return len(self.cases)

    def dry_iter(self) -> list[Case]:
        """The cases, unloaded (``tio.Queue`` counts samples per item with it)."""
        return self.cases

    def __getitem__(self, index: int) -> tio.Subject:
        d = self.data_cfg
        arrays = load_case_arrays(self.cases[index], d)
        image, label, spacing = arrays.image, arrays.label[None], list(arrays.spacing)
        if image.ndim == 3:  # native 2D image (C, X, Y): a one-slice volume along slice_axis
            image, label = np.expand_dims(image, d.slice_axis + 1), np.expand_dims(label, d.slice_axis + 1)
            spacing.insert(d.slice_axis, 1.0)
        image, label = pad_to_at_least(image, self.size), pad_to_at_least(label, self.size)
        affine = np.diag([*spacing, 1.0])
        subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(image), affine=affine),
                              label=tio.LabelMap(tensor=label_tensor(label, d.num_classes), affine=affine),
                              name=arrays.name)
        return self.transform(subject) if self.transform is not None else subject


def build_queue(cases: Sequence[Case], data_cfg: Any) -> tio.Queue:
    """The torchio queue of training patches (3D augmentation inside, when switched on)."""
    transform = augmentation_3d(data_cfg) if data_cfg.spatial_dims == 3 else None
    sampler = ForegroundSampler(sample_shape(data_cfg), data_cfg.foreground_ratio,
                                lookalike_ratio=data_cfg.lookalike_ratio)
    return tio.Queue(CaseDataset(cases, data_cfg, transform), max_length=max(1, data_cfg.queue_length),
                     samples_per_volume=max(1, data_cfg.samples_per_volume), sampler=sampler,
                     num_workers=data_cfg.num_workers, start_background=False)


def _example_3d(patch: tio.Subject) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, X, Y, Z) float image and (X, Y, Z) long label of a patch."""
    return patch["image"].data.float(), as_long(patch["label"].data[0])


def as_long(label: torch.Tensor) -> torch.Tensor:
    """Class indices as int64 (torchio's spatial transforms return label maps as float32)."""
    return (label.round() if label.is_floating_point() else label).long()


class _Example2D:
    """Squeeze a slice patch to 2D and augment it: (C, a, b) float image and (a, b) long label."""

    def __init__(self, data_cfg: Any, seed: int) -> None:
        self.axis = data_cfg.slice_axis
        self.augment = Augment2D(data_cfg, seed)

    def __call__(self, patch: tio.Subject) -> tuple[torch.Tensor, torch.Tensor]:
        image = patch["image"].data.squeeze(self.axis + 1).numpy()
        label = patch["label"].data[0].squeeze(self.axis).numpy()
        image, label = self.augment(image, label)
        return torch.from_numpy(image).float(), torch.from_numpy(label.astype(np.int64))


def _batches(queue: tio.Queue, batch_size: int, example: Any) -> Iterator[Batch]:
    """Endless batches of ``batch_size`` patches.

    ``tio.Queue.__getitem__`` ignores its index and pops the next patch (refilling itself from the
    subjects when empty), so this is the queue read in order, with no epoch boundary to handle.
    """
    while True:
        images, labels = zip(*(example(queue[0]) for _ in range(batch_size)))
        yield {"image": torch.stack(images), "label": torch.stack(labels)}


def build_train_loader(cases: Sequence[Case], data_cfg: Any, batch_size: int, seed: int) -> Iterator[Batch]:
    """An endless, seed-determined stream of training batches.

    Args:
        cases: training cases (see ``find_cases``).
        data_cfg: ``hparam.DataConfig``.
        batch_size: patches per batch.
        seed: the stream's seed: the same seed gives the same batches, whatever the caller does with
            the global random generators between them.

    Returns:
        Iterator of {"image": (B, C, *patch) float32, "label": (B, *patch) int64}, patch axes in
        torchio order ((X, Y, Z) in 3D; the two axes other than ``slice_axis`` in 2D).
    """
    if not cases:
        raise ValueError("no training cases")
    if data_cfg.spatial_dims == 3:
        example = _example_3d
    else:
        example = _Example2D(data_cfg, seed)

    def factory() -> Iterator[Batch]:
        return _batches(build_queue(cases, data_cfg), batch_size, example)
    return SeededStream(factory, seed)
