"""Data augmentation chosen by the ``data.augment_*`` switches: torchio in 3D, albumentations in 2D.

3D transforms act on the whole (padded) volume before patches are drawn; 2D transforms act on each
slice patch, jointly on image and mask (mask interpolation nearest).  Labels come back as integers.

albumentations' intensity transforms expect images in [0, 1] (brightness/contrast and noise clip to
it, gamma is undefined for negative values), while our images are z-scored.  ``Augment2D`` therefore
rescales each channel of a patch to [0, 1] by its own min and max, applies brightness/contrast, gamma
and noise there (gamma on [0, 1] is nnU-Net's), and maps the result back to the original range.
"""
from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torchio as tio  # noqa: E402


def augmentation_3d(data_cfg: Any) -> tio.Compose | None:
    """The torchio transforms switched on in ``data_cfg`` (None when all are off)."""
    transforms: list[tio.Transform] = []
    if data_cfg.mirror_axes:
        transforms.append(tio.RandomFlip(axes=tuple(data_cfg.mirror_axes), flip_probability=0.5))
    if data_cfg.augment_affine:
        # (low, high) angle per axis: 15 degrees about the planned rotation axes, none about the others
        degrees = tuple(v for a in range(3) for v in ((-15, 15) if a in data_cfg.rotation_axes else (0, 0)))
        transforms.append(tio.RandomAffine(scales=0.15, degrees=degrees, default_pad_value="mean", p=0.5))
    if data_cfg.augment_elastic:
        transforms.append(tio.RandomElasticDeformation(num_control_points=7, max_displacement=4, p=0.25))
    if data_cfg.augment_intensity:
        transforms += [tio.RandomGamma(log_gamma=0.3, p=0.3),
                       tio.RandomBiasField(coefficients=0.3, p=0.2),
                       tio.RandomNoise(std=(0.0, 0.1), p=0.2)]
    return tio.Compose(transforms) if transforms else None


class Augment2D:
    """Seeded joint augmentation of a 2D (C, H, W) float image and its (H, W) integer mask.

    Args:
        data_cfg: ``hparam.DataConfig`` (its ``augment_*`` switches).
        seed: seed of albumentations' own generators.
    """

    def __init__(self, data_cfg: Any, seed: int) -> None:
        geometric: list[A.BasicTransform] = []
        # patch axes (a, b) are albumentations' (height, width): VerticalFlip mirrors a, HorizontalFlip b
        if 0 in data_cfg.mirror_axes:
            geometric.append(A.VerticalFlip(p=0.5))
        if 1 in data_cfg.mirror_axes:
            geometric.append(A.HorizontalFlip(p=0.5))
        if data_cfg.augment_affine:
            angle = 15 if data_cfg.rotation_axes else 0
            geometric.append(A.Affine(scale=(0.85, 1.15), rotate=(-angle, angle), translate_percent=(-0.05, 0.05),
                                      interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                                      border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.5))
        if data_cfg.augment_elastic:
            geometric.append(A.ElasticTransform(alpha=30, sigma=6, interpolation=cv2.INTER_LINEAR,
                                                mask_interpolation=cv2.INTER_NEAREST,
                                                border_mode=cv2.BORDER_CONSTANT, p=0.25))
        intensity: list[A.BasicTransform] = []
        if data_cfg.augment_intensity:
            intensity = [A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.15, p=0.3),
                         A.RandomGamma(gamma_limit=(70, 150), p=0.3),
                         A.GaussNoise(std_range=(0.0, 0.03), p=0.2)]
        self.geometric = A.Compose(geometric, seed=seed) if geometric else None
        self.intensity = A.Compose(intensity, seed=seed + 1) if intensity else None

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Augment (C, H, W) float32 ``image`` and (H, W) integer ``mask``; returns the same layouts."""
        img = np.ascontiguousarray(image.transpose(1, 2, 0), dtype=np.float32)  # (H, W, C)
        msk = np.ascontiguousarray(mask, dtype=np.uint8 if mask.max(initial=0) < 256 else np.uint16)
        if self.geometric is not None:
            out = self.geometric(image=img, mask=msk)
            img, msk = out["image"], out["mask"]
        if self.intensity is not None:
            img = self._intensity(img)
        return np.ascontiguousarray(img.transpose(2, 0, 1)), np.asarray(msk)

    def _intensity(self, img: np.ndarray) -> np.ndarray:
        """Intensity transforms on the image rescaled per channel to [0, 1], then mapped back."""
        lo = img.min(axis=(0, 1), keepdims=True)
        span = np.maximum(img.max(axis=(0, 1), keepdims=True) - lo, 1e-6)
        unit = ((img - lo) / span).astype(np.float32)
        unit = self.intensity(image=unit)["image"]
        return (unit * span + lo).astype(np.float32)
