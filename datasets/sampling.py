"""Patch sampling with foreground oversampling, for torchio subjects of any (padded) size.

``ForegroundSampler`` draws a share ``foreground_ratio`` of its patches around a labelled voxel (class
chosen uniformly among the foreground classes present, as nnU-Net does, so small classes are seen as
often as large ones), a share ``lookalike_ratio`` of the others around a *look-alike*: an unlabelled
voxel whose intensity lies within the case's foreground intensities (5th-95th percentile, every
channel), where a model that has seen too little background labels tissue that only looks like the
target; and the rest uniformly.  Unlike ``tio.LabelSampler``, foreground next to the border
is reachable: the patch is centred on the voxel, then shifted inside the volume, so it always contains
the chosen voxel.  2D training uses the same sampler with a patch of size 1 along the slice axis.
All randomness comes from torch's global generator (made private by ``datasets.rng.SeededStream``).
"""
from __future__ import annotations

import logging
from typing import Iterator, Sequence

import numpy as np
import torch
import torchio as tio

log = logging.getLogger(__name__)


def pad_to_at_least(array: np.ndarray, size: Sequence[int], value: float = 0) -> np.ndarray:
    """Pad the spatial axes of a (C, *S) array symmetrically (``diff // 2`` before) to at least ``size``.

    Inference pads small inputs the same way, with 0 (the mean of a z-scored image).
    """
    diffs = [max(0, int(p) - s) for s, p in zip(array.shape[1:], size)]
    if not any(diffs):
        return array
    pad = [(0, 0)] + [(d // 2, d - d // 2) for d in diffs]
    return np.pad(array, pad, mode="constant", constant_values=value)


def crop_subject(subject: tio.Subject, start: Sequence[int], size: Sequence[int]) -> tio.Subject:
    """A new subject holding the (C, *size) block at ``start`` of every image (copies, not views)."""
    index = (slice(None),) + tuple(slice(int(s), int(s) + int(n)) for s, n in zip(start, size))
    images = {}
    for name, image in subject.get_images_dict(intensity_only=False).items():
        affine = image.affine.copy()
        affine[:3, 3] += affine[:3, :3] @ np.asarray(start, dtype=float)  # origin of the patch
        images[name] = type(image)(tensor=image.data[index].clone(), affine=affine)
    return tio.Subject(**images)


class ForegroundSampler(tio.data.PatchSampler):
    """Random patches, a share of them centred on labelled voxels.

    Args:
        patch_size: (X, Y, Z) patch size; 2D slices use 1 along the slice axis.
        foreground_ratio: probability that a patch is centred on a foreground voxel (label > 0).
        label_name: the subject's label map.
        lookalike_ratio: probability that a patch not centred on foreground is centred on a look-alike
            (background within the case's foreground intensity range).
        image_name: the subject's image (for the look-alikes).
        max_locations: foreground voxels kept per class and subject (a random subset; bounds memory).
    """

    def __init__(self, patch_size: Sequence[int], foreground_ratio: float, label_name: str = "label",
                 max_locations: int = 100_000, lookalike_ratio: float = 0.0, image_name: str = "image") -> None:
        super().__init__(tuple(int(p) for p in patch_size))
        self.foreground_ratio = float(foreground_ratio)
        self.lookalike_ratio = float(lookalike_ratio)
        self.image_name = image_name
        self.label_name = label_name
        self.max_locations = max_locations

    def __call__(self, subject: tio.Subject, num_patches: int | None = None) -> Iterator[tio.Subject]:
        shape = np.array(subject.spatial_shape)
        if np.any(self.patch_size > shape):
            raise RuntimeError(f"patch {tuple(self.patch_size)} larger than the padded volume {tuple(shape)}")
        return self._generate_patches(subject, num_patches)

    def _generate_patches(self, subject: tio.Subject, num_patches: int | None = None
                          ) -> Iterator[tio.Subject]:
        shape = torch.as_tensor(subject.spatial_shape)
        size = torch.as_tensor(self.patch_size.astype(np.int64))
        label = subject[self.label_name].data[0]
        locations = self.foreground_locations(label)
        lookalikes = self.lookalike_locations(subject[self.image_name].data, label) \
            if locations and self.lookalike_ratio > 0 else None
        drawn = 0
        while num_patches is None or drawn < num_patches:
            r = torch.rand(()).item() if locations else 1.0  # (no draw without foreground, as before)
            centre = None
            if locations and r < self.foreground_ratio:
                cls_locs = locations[int(torch.randint(len(locations), ()))]
                centre = cls_locs[int(torch.randint(len(cls_locs), ()))]
            elif lookalikes is not None and lookalikes.numel() and \
                    r < self.foreground_ratio + self.lookalike_ratio * (1 - self.foreground_ratio):
                centre = lookalikes[int(torch.randint(lookalikes.numel(), ()))]
            if centre is not None:
                centre = torch.as_tensor(np.unravel_index(int(centre), tuple(shape.tolist())))
                start = (centre - size // 2).clamp(min=0)
                start = torch.minimum(start, shape - size)
            else:
                start = (torch.rand(3) * (shape - size + 1).double()).long()
            drawn += 1
            yield crop_subject(subject, start.tolist(), self.patch_size.tolist())

    def lookalike_locations(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Flat indices of unlabelled voxels whose every channel lies within the 5th-95th percentile
        of the case's foreground intensities (subsampled to ``max_locations``)."""
        fg = (label > 0).reshape(-1)
        flat = image.reshape(image.shape[0], -1).float()
        inside = ~fg
        for channel in flat:
            values = channel[fg]
            if values.numel() > self.max_locations:
                values = values[torch.randperm(values.numel())[: self.max_locations]]
            lo, hi = torch.quantile(values, torch.tensor([0.05, 0.95])).tolist()
            inside &= (channel >= lo) & (channel <= hi)
        locs = torch.nonzero(inside).squeeze(1)
        if locs.numel() > self.max_locations:
            locs = locs[torch.randperm(locs.numel())[: self.max_locations]]
        return locs

    def foreground_locations(self, label: torch.Tensor) -> list[torch.Tensor]:
        """Flat indices of foreground voxels, one tensor per foreground class present (subsampled)."""
        flat = label.reshape(-1)
        fg = torch.nonzero(flat > 0).squeeze(1)
        if fg.numel() == 0:
            if self.foreground_ratio > 0:
                log.debug("no foreground in this volume: its patches are drawn uniformly")
            return []
        values = flat[fg]
        out = []
        for v in torch.unique(values):
            locs = fg[values == v]
            if locs.numel() > self.max_locations:
                locs = locs[torch.randperm(locs.numel())[: self.max_locations]]
            out.append(locs)
        return out
