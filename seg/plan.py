"""Settings from the data: a fingerprint of the training cases and the plan that follows from it.

nnU-Net's central idea, in our own rules: what depends on the data (target spacing, patch, intensity
normalisation, mirroring and rotation axes, the 2D slice axis, PointRend's point budgets) is decided
from a fingerprint of the training cases, shown to the user, and can be overridden field by field.
Every field of ``hparam.py`` that accepts ``"auto"`` is resolved here, each by one small rule::

    fingerprint = compute_fingerprint(cases, cfg.data)      # one pass over the cases, plain data
    plan = make_plan(fingerprint, cfg, level_strides(cfg), device=device)  # [Decision(field, ...)]
    cfg = apply_plan(cfg, plan)                             # a copy with no "auto" left

One input is not the data's: the patch budget follows the device training runs on (on CUDA its
memory, ``plan_patch_budget``), and its decision names that device.

Axes are array axes in torchio order (X, Y, Z), as everywhere in ``seg``; spacings are per axis in
that order.  Orientation codes name the patient direction each array axis points to (nibabel's
convention: an identity NIfTI affine is "RAS").
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from backbones import backbone_options, build_backbone
from datasets import arrays
from heads import as_feature_info
from seg.dataset_json import channel_normalization
from seg.files import write_bytes_atomic

log = logging.getLogger(__name__)

AUTO = "auto"
FINGERPRINT_VERSION = 2
#: voxels sampled per case and channel for the intensity statistics (nnU-Net samples 10,000 too)
SAMPLES_PER_CASE = 10_000
#: spacing ratio above which data count as anisotropic (nnU-Net's threshold)
ANISOTROPY_RATIO = 3.0
#: cropping to the non-zero box must remove more than this share for non-zero masking (nnU-Net's
#: rule: median relative size after cropping < 3/4)
NONZERO_CROP_SHARE = 0.25
#: a patch axis may exceed the median case by this share when rounded up to a stride
PAD_TOLERANCE = 0.25
#: 3D: the patch sees at least this share of the median case's voxels; on larger volumes the target
#: spacing grows until it does (nnU-Net plans its low-resolution stage at 25 %; on the atrium phantom
#: 25 % left false positives on look-alikes that 50 % removed; 100 % gained nothing: docs/figures.md)
CONTEXT_SHARE = 0.5
#: the factor the spacing grows by per try (nnU-Net's), and the most it may grow in all
CONTEXT_STEP, CONTEXT_MAX_FACTOR = 1.03, 4.0
#: ... and never so far that the thinnest class (its median thickness, 2 x volume / surface) is
#: fewer voxels thick than this: thin structures (a cortical ribbon, vessels, walls) keep the grid
#: that resolves them, compact targets (an atrium, a tumour) give up resolution they do not need
MIN_THICKNESS_VOXELS = 4
#: patch budgets in voxels on a CPU (and any device whose memory is not planned): 3D 64x64x32 (a
#: training step of the default model ~0.7 s and < 2 GB on a 2-core CPU), 2D 2^15 (about 160x192)
PATCH_BUDGET = {3: 131_072, 2: 32_768}
#: CUDA: bytes a float32 training step of the default model holds per voxel of batch x patch (the
#: batch, the activations autograd keeps for the backward, their gradients, the point head's
#: per-point features).  MEASURED on CPU, where the tensors have the sizes they have on CUDA:
#: ``python benchmarks/step_memory.py`` (torch.profiler's allocator events, a line through 5 sizes
#: per dims; docs/configuration.md, "The patch budget on a GPU").  Other models differ: set
#: data.patch_voxel_budget for a wider one
STEP_BYTES_PER_VOXEL = {3: 517, 2: 1229}
#: CUDA: share of the device's memory the plan fills (ASSUMED: the caching allocator's fragmentation,
#: typically 10-20 %, and cuDNN algorithms choosing larger workspaces take the rest).  Autocast
#: (train.amp) roughly halves the convolutions' saved activations, but norms, softmax and losses stay
#: float32; the rule keeps the float32 figure, the difference being headroom (nnU-Net's planner is as
#: cautious: it plans for a fixed 8 GB target whatever the card)
DEVICE_MEMORY_SHARE = 0.8
#: CUDA: bytes that do not grow with the patch (ASSUMED): the CUDA context and kernels (0.5-1 GiB),
#: cuDNN/cuBLAS workspaces, and the model's weights, gradients and AdamW moments (measured: 113 MiB
#: for the default 3D model, 71 MiB in 2D)
DEVICE_FIXED_BYTES = 2 * 2 ** 30
#: CUDA budgets are a multiple of PATCH_BUDGET / BUDGET_STEPS (devices whose memory differs a little
#: plan the same patch), at least PATCH_BUDGET and at most MAX_BUDGET_FACTOR x it: 3D 256^3, 2D 2048^2,
#: the largest patch nnU-Net's planner starts from (beyond it the patch holds the whole median case of
#: nearly every data set, and a step only grows slower)
BUDGET_STEPS, MAX_BUDGET_FACTOR = 4, 128
#: training points per patch: one per 32 patch cells (4,096 at 64x64x32, ~1,024 at 160x192), >= 256
TRAIN_POINT_SHARE, MIN_TRAIN_POINTS = 1 / 32, 256
#: subdivision points per step as a share of the patch cells (the measured defaults: 3D 6,144 of
#: 64x64x32, benchmarks/pointrend.py; 2D about 8,192 of 160x192)
SUBDIVISION_SHARE = {3: 3 / 64, 2: 1 / 4}
#: batch size: patches per step fill the patch budget (our rule: nnU-Net sizes its batch from a
#: memory estimate of its network), at least 2, and together cover at most 5 % of the training
#: set's voxels (nnU-Net's floor and cap; it counts the voxels after cropping and rounds the cap)
MIN_BATCH, MAX_BATCH_SHARE = 2, 0.05
#: CT: integer intensities reaching this value (air is -1000 HU) are read as Hounsfield units
CT_MIN_HU = -500.0

_WORLD = (("R", "L"), ("A", "P"), ("I", "S"))  # LPS world axes: (negative, positive) direction


# ----------------------------------------------------------------------------- fingerprint
def orientation_code(direction: Sequence[float]) -> str:
    """Patient direction each array axis points to, from a row-major direction matrix (LPS world).

    >>> orientation_code([-1, 0, 0, 0, -1, 0, 0, 0, 1])   # a NIfTI file with an identity affine
    'RAS'
    """
    d = int(round(math.sqrt(len(direction))))
    m = np.asarray(direction, float).reshape(d, d)
    code = ""
    for j in range(d):  # column j: direction of array axis j in world coordinates
        i = int(np.argmax(np.abs(m[:, j])))
        code += _WORLD[i][int(m[i, j] > 0)] if i < 3 else "?"
    return code


def nonzero_crop_ratio(image: np.ndarray) -> float:
    """Volume of the bounding box of the non-zero voxels (any channel) over the image volume."""
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        return 1.0
    extent = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
              for ax in range(mask.ndim)]
    return float(np.prod([e[-1] - e[0] + 1 for e in extent]) / mask.size)


def class_thickness(label: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Mean thickness (mm) of each class present: 2 x volume / surface, the surface counted as voxel
    faces between the class and the rest (the edge of the array counts too).

    A slab of thickness t (faces on both sides) gives t; a ball of diameter d gives d/3 measured on
    its true surface (voxel faces overcount an oblique surface by up to 1.5x, so a little less).
    """
    sp = np.asarray(spacing, float)
    voxel = float(np.prod(sp))
    out = {}
    for k in np.unique(label):
        mask = np.pad(label == k, 1)
        area = sum(float(np.count_nonzero(np.diff(mask, axis=a))) * voxel / sp[a] for a in range(mask.ndim))
        out[str(int(k))] = 2.0 * float(np.count_nonzero(mask)) * voxel / max(area, 1e-12)
    return out


def _sample(values: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return values if values.size <= n else rng.choice(values, n, replace=False)


def case_fingerprint(image: np.ndarray, label: np.ndarray, meta: Any, seed: int) -> dict[str, Any]:
    """Facts about one case (image (C, *S) raw intensities, label (*S) class indices)."""
    rng = np.random.default_rng(seed)
    fg = label > 0
    channels = []
    for c in range(image.shape[0]):
        ch = image[c]
        every = _sample(ch.ravel(), SAMPLES_PER_CASE, rng).astype(np.float64)
        channels.append({
            "min": float(ch.min()), "max": float(ch.max()),
            "integer": bool(np.all(every == np.rint(every))),
            "sample_all": every.tolist(),
            "sample_foreground": _sample(ch[fg].ravel(), SAMPLES_PER_CASE, rng).astype(float).tolist()})
    counts = np.bincount(label.ravel().astype(np.int64))
    return {
        "size": [int(s) for s in label.shape], "spacing": [float(s) for s in meta.spacing],
        "direction": [float(v) for v in meta.direction],
        "orientation": orientation_code(meta.direction),
        "nonzero_share": float(np.mean(np.any(image != 0, axis=0))),
        "nonzero_crop_ratio": nonzero_crop_ratio(image),
        "class_thickness_mm": class_thickness(label, meta.spacing),
        "class_voxels": {str(k): int(v) for k, v in enumerate(counts) if v},
        "channels": channels,
    }


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "p00_5": float("nan"), "p99_5": float("nan")}
    return {"mean": float(values.mean()), "std": float(values.std()),
            "p00_5": float(np.percentile(values, 0.5)), "p99_5": float(np.percentile(values, 99.5))}


def summarise(cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Dataset-level fingerprint from per-case facts (``case_fingerprint``), JSON-friendly."""
    names = sorted(cases)
    per = [cases[n] for n in names]
    n_channels = len(per[0]["channels"])
    channels = []
    for c in range(n_channels):
        fg = np.concatenate([np.asarray(p["channels"][c]["sample_foreground"]) for p in per])
        every = np.concatenate([np.asarray(p["channels"][c]["sample_all"]) for p in per])
        channels.append({"foreground": _percentiles(fg),
                         "all": {**_percentiles(every), "p01": float(np.percentile(every, 1))},
                         "min": min(p["channels"][c]["min"] for p in per),
                         "max": max(p["channels"][c]["max"] for p in per),
                         "integer": all(p["channels"][c]["integer"] for p in per)})
    voxel_mm3 = [float(np.prod(p["spacing"])) for p in per]
    classes = sorted({int(k) for p in per for k in p["class_voxels"]})
    volumes = {str(k): float(np.median([p["class_voxels"].get(str(k), 0) * v for p, v in zip(per, voxel_mm3)]))
               for k in classes}
    orientations: dict[str, int] = {}
    for p in per:
        orientations[p["orientation"]] = orientations.get(p["orientation"], 0) + 1
    facts = {n: {k: v for k, v in cases[n].items() if k != "channels"} for n in names}
    return {
        "num_cases": len(per), "spatial_dims": len(per[0]["size"]), "channels": channels,
        "sizes": [p["size"] for p in per], "spacings": [p["spacing"] for p in per],
        "median_size": [float(v) for v in np.median([p["size"] for p in per], axis=0)],
        "median_spacing": [float(v) for v in np.median([p["spacing"] for p in per], axis=0)],
        "orientations": orientations,
        "direction": per[0]["direction"] if len(orientations) == 1 else _most_common_direction(per),
        "nonzero_share": float(np.median([p["nonzero_share"] for p in per])),
        "nonzero_crop_ratio": float(np.median([p["nonzero_crop_ratio"] for p in per])),
        "class_thickness_mm_median": {
            str(k): float(np.median([p["class_thickness_mm"].get(str(k), 0.0) for p in per])) for k in classes},
        "label_values": classes,
        "class_volume_mm3_median": volumes,
        "cases": facts,
    }


def _most_common_direction(per: list[dict[str, Any]]) -> list[float]:
    codes = [p["orientation"] for p in per]
    best = max(set(codes), key=codes.count)
    return next(p["direction"] for p in per if p["orientation"] == best)


def cases_key(cases: Sequence[Any], data_cfg: Any) -> str:
    """Hash of the case files (names, sizes, modification times) and the settings that change a
    fingerprint, so a cached fingerprint is reused only for the same data."""
    h = hashlib.sha256()
    for case in cases:
        for p in (*case.images, case.label):
            st = os.stat(p)
            h.update(f"{case.name}|{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns};".encode())
    h.update(repr((sorted((data_cfg.label_remap or {}).items()), FINGERPRINT_VERSION)).encode())
    return h.hexdigest()


def compute_fingerprint(cases: Sequence[Any], data_cfg: Any, cache: str | os.PathLike | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """The fingerprint of ``cases`` (one pass, a progress bar), reused from ``cache`` when it holds
    the fingerprint of the same files; written there (atomically) otherwise.

    Args:
        cases: ``datasets.Case`` objects.
        data_cfg: ``hparam.DataConfig`` (for ``label_remap``).
        cache: JSON file to read and write, or None.
        progress: show a tqdm bar.
    """
    key = cases_key(cases, data_cfg)
    if cache is not None and Path(cache).is_file():
        try:
            cached = json.loads(Path(cache).read_text())
            if isinstance(cached, dict) and cached.get("key") == key:
                return cached
        except (OSError, ValueError, RecursionError):
            pass  # an unreadable or foreign cache is computed again (and replaced)
    per_case = {}
    for i, case in enumerate(tqdm(cases, desc="fingerprint", unit="case", disable=not progress,
                                  leave=False, dynamic_ncols=True)):
        image, meta = arrays.read_case_image(case.images)
        raw, _ = arrays.read_label_raw(case.label)
        per_case[case.name] = case_fingerprint(image, arrays.as_class_indices(raw, data_cfg.label_remap), meta, i)
    fingerprint = {"version": FINGERPRINT_VERSION, "key": key, **summarise(per_case)}
    if cache is not None:
        write_json_atomic(fingerprint, cache)
    return fingerprint


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (``seg.files.write_bytes_atomic``)."""
    write_bytes_atomic(path, json.dumps(obj, indent=1))


# ----------------------------------------------------------------------------- rules
def plan_target_spacing(spacings: Sequence[Sequence[float]], sizes: Sequence[Sequence[int]]
                        ) -> tuple[float, ...]:
    """The median spacing per axis; on anisotropic data the thick axis keeps a thick spacing.

    When the median thick-axis spacing exceeds ``ANISOTROPY_RATIO`` times the others and that axis
    has few voxels (fewer than a third of the others'), its target is the 10th percentile of its
    spacings (not below the other axes' target), so the thickest cases are not blown up in-plane
    ratios and the thin ones are not thinned to voxels that do not exist.  nnU-Net's rule, except
    what the voxel test counts: nnU-Net takes the median of the native sizes after cropping to the
    non-zero box, this rule the median size resampled to the median spacing, uncropped (the same
    decision on every demo data set; docs/configuration.md, "The plan").
    """
    sp, sz = np.asarray(spacings, float), np.asarray(sizes, float)
    target = np.median(sp, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    if not others:
        return tuple(float(t) for t in target)
    median_size = np.median(sz * sp / target, axis=0)
    aniso_spacing = target[worst] > ANISOTROPY_RATIO * max(target[others])
    aniso_voxels = median_size[worst] * ANISOTROPY_RATIO < min(median_size[others])
    if aniso_spacing and aniso_voxels:
        target[worst] = max(float(np.percentile(sp[:, worst], 10)), float(max(target[others])))
    return tuple(round(float(t), 6) for t in target)


def resampled_median_size(spacings: Sequence[Sequence[float]], sizes: Sequence[Sequence[int]],
                          target: Sequence[float]) -> tuple[float, ...]:
    """Median case size (voxels per axis) after resampling every case to ``target``."""
    sp, sz = np.asarray(spacings, float), np.asarray(sizes, float)
    return tuple(float(v) for v in np.median(sz * sp / np.asarray(target, float), axis=0))


def _round_up_axis(median: float, levels: Sequence[int]) -> int:
    """``median`` rounded up to a multiple of the largest stride level that pads it by at most
    ``PAD_TOLERANCE`` (the finest level when none does)."""
    for s in sorted(set(levels), reverse=True):
        size = int(math.ceil(median / s) * s)
        if size <= median * (1 + PAD_TOLERANCE):
            return size
    s = min(levels)
    return int(math.ceil(median / s) * s)


def plan_patch_size(median_size: Sequence[float], spacing: Sequence[float],
                    level_strides: Sequence[Sequence[int]], budget: int) -> tuple[int, ...]:
    """The training patch: the median case, rounded up to the model's strides, within ``budget``.

    1. Each axis covers the median case, rounded up to a multiple of the largest stride level of the
       model that adds at most ``PAD_TOLERANCE`` (a 36-voxel axis with levels 4..32 becomes 40, not 64).
    2. While the patch has more than ``budget`` voxels, the axis with the largest physical extent
       (mm; ties: the larger share of the median case) shrinks to the next lower multiple of the
       model's total stride on that axis.  An axis that is short (few thick slices) stays whole and the
       other axes shrink, so a short z keeps a large in-plane patch.
    3. Budget left over goes back to the shrunk axes, in steps of half their total stride (physically
       smallest first): 64x64x24 becomes 80x64x24 within 131,072 voxels.

    Args:
        median_size: median case size per axis at the target spacing.
        spacing: the target spacing per axis (mm).
        level_strides: per-axis strides of the model's feature levels (fine to coarse).
        budget: maximum number of voxels.
    """
    dims = len(median_size)
    per_axis = [[int(s[a]) for s in level_strides] for a in range(dims)]
    total = [max(p) for p in per_axis]
    whole = [_round_up_axis(max(1.0, m), per_axis[a]) for a, m in enumerate(median_size)]
    patch = list(whole)
    while math.prod(patch) > budget:
        shrinkable = [a for a in range(dims) if patch[a] > total[a]]
        if not shrinkable:
            break
        axis = max(shrinkable, key=lambda a: (patch[a] * spacing[a], patch[a] / max(median_size[a], 1)))
        patch[axis] = (patch[axis] - 1) // total[axis] * total[axis]
    while True:  # 3. budget left over: shrunk axes grow back by half the total stride
        room = [a for a in range(dims) if patch[a] + max(1, total[a] // 2) <= whole[a]
                and math.prod(patch) // patch[a] * (patch[a] + max(1, total[a] // 2)) <= budget]
        if not room:
            return tuple(patch)
        axis = min(room, key=lambda a: patch[a] * spacing[a])
        patch[axis] += max(1, total[axis] // 2)


def plan_context_spacing(spacing: Sequence[float], median_size: Sequence[float],
                         level_strides: Sequence[Sequence[int]], budget: int,
                         patch_size: Sequence[int] | None = None, thinnest_mm: float = math.inf
                         ) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """A target spacing at which the planned patch sees ``CONTEXT_SHARE`` of the median case.

    A patch that sees a small part of a large volume cannot tell the target from structures that
    look like it elsewhere in the view.  While the patch (``plan_patch_size`` within ``budget``)
    holds less than ``CONTEXT_SHARE`` of the median case's voxels, the spacing grows by
    ``CONTEXT_STEP``: first only the axes finer than half the coarsest one (thin in-plane axes of
    thick-slice data), then all of them; never beyond ``CONTEXT_MAX_FACTOR`` times the start, nor
    beyond ``thinnest_mm / MIN_THICKNESS_VOXELS`` on a growing axis.  The coarser grid is what
    the network sees; predictions are resampled back to every input's own grid.

    Args:
        spacing: the target spacing from ``plan_target_spacing`` (mm per axis).
        median_size: the median case (voxels per axis) at ``spacing``.
        level_strides: per-axis strides of the model's feature levels.
        budget: patch budget in voxels.
        patch_size: a patch fixed by the user (else planned at each spacing).
        thinnest_mm: the thinnest foreground class's median thickness (``class_thickness``).

    Returns:
        (spacing, patch): unchanged when the patch already sees enough.
    """
    start = np.asarray(spacing, float)
    extent = np.asarray(median_size, float) * start       # mm
    current, grown = start.copy(), False
    while True:
        size = extent / current
        patch = tuple(patch_size) if patch_size is not None else plan_patch_size(
            size, current, level_strides, budget)
        if math.prod(patch) >= CONTEXT_SHARE * float(np.prod(size)):
            return (_spacing_mm(current) if grown else tuple(spacing)), patch
        fine = current.max() / current > 2
        step = np.where(fine if fine.any() else np.ones_like(fine), CONTEXT_STEP, 1.0)
        limit = np.minimum(CONTEXT_MAX_FACTOR * start, thinnest_mm / MIN_THICKNESS_VOXELS)
        if np.any((step > 1) & (current * step > limit)):
            return (_spacing_mm(current) if grown else tuple(spacing)), patch
        current, grown = current * step, True


def thinnest_class_mm(fp: dict[str, Any]) -> float:
    """The median thickness (mm) of the thinnest foreground class (``class_thickness``)."""
    values = [v for k, v in fp["class_thickness_mm_median"].items() if int(k) > 0]
    return min(values) if values else math.inf


def _spacing_mm(values: Sequence[float]) -> tuple[float, ...]:
    """Spacings rounded up to 0.1 micrometre (a readable plan; never finer than the rule's)."""
    return tuple(math.ceil(float(v) * 1e4 - 1e-6) / 1e4 for v in values)


def is_anisotropic(spacing: Sequence[float]) -> bool:
    """Thickest spacing more than ``ANISOTROPY_RATIO`` times the thinnest."""
    return max(spacing) > ANISOTROPY_RATIO * min(spacing)


def plan_normalization(channel: dict[str, Any], nonzero_crop_ratio: float, named: str | None = None) -> str:
    """The normalisation scheme of one channel.

    A channel named in ``dataset.json`` takes the scheme of its name (``named``:
    ``seg.dataset_json.channel_normalization``), as in nnU-Net; its 'zscore' (every name but CT,
    noNorm, rescale_to_0_1, rgb_to_0_1) still takes the crop rule below, as nnU-Net masks its z-score.
    A channel no ``dataset.json`` names (``named`` None):

    * 'ct' when the intensities are integers reaching ``CT_MIN_HU`` (Hounsfield units: air is -1000):
      clip to the foreground's 0.5-99.5 percentiles, z-score with the foreground mean and std of the
      whole training set (nnU-Net's CT scheme);
    * 'zscore_nonzero' when cropping to the box of the non-zero voxels would remove more than
      ``NONZERO_CROP_SHARE`` of the median case (nnU-Net's rule: zero is then 'outside', e.g. a
      skull-stripped brain in a large field of view); statistics over the non-zero voxels, zero stays 0;
    * 'zscore' (per image, over every voxel) otherwise: MRI and the rest.  A skull-on head with air
      stored as 0 gets this, so air becomes the darkest value, not the tissue mean.
    """
    if named not in (None, "zscore"):
        return named
    if named is None and channel["integer"] and channel["min"] <= CT_MIN_HU:
        return "ct"
    if nonzero_crop_ratio < 1.0 - NONZERO_CROP_SHARE:
        return "zscore_nonzero"
    return "zscore"


def plan_slice_axis(spacing: Sequence[float], direction: Sequence[float]) -> int:
    """The 2D slice axis: the thickest axis; when no axis is thicker than the others by 1 %, the array
    axis closest to the patient's inferior-superior direction (axial slices)."""
    sp = np.asarray(spacing, float)
    thick = int(np.argmax(sp))
    if sp[thick] > 1.01 * max(np.delete(sp, thick)):
        return thick
    d = len(sp)
    m = np.asarray(direction, float).reshape(d, d)
    return int(np.argmax(np.abs(m[min(2, d - 1), :])))


def plan_mirror_axes(spatial_dims: int) -> tuple[int, ...]:
    """Every axis of the network's input (nnU-Net mirrors all; restrict for left/right labels)."""
    return tuple(range(spatial_dims))


def plan_rotation_axes(spacing: Sequence[float]) -> tuple[int, ...]:
    """Axes rotated about: all three on (near-)isotropic data, only the thick axis (in-plane
    rotation) on anisotropic data, where a rotation out of plane mixes 5 mm slices."""
    if is_anisotropic(spacing):
        return (int(np.argmax(spacing)),)
    return tuple(range(len(spacing)))


def plan_batch_size(patch: Sequence[int], budget: int, dataset_voxels: float) -> int:
    """Patches per step: as many as the patch budget holds (``budget // patch``; small 2D slices get
    large batches, a budget-sized 3D patch gets the minimum), at least ``MIN_BATCH``, and no more
    than cover ``MAX_BATCH_SHARE`` of the training set's voxels (in the network's dimensions:
    slices count as voxels of their volume).  Floor and cap are nnU-Net's; the budget rule is ours
    (nnU-Net scales a reference batch by its network's estimated GPU memory)."""
    cells = math.prod(patch)
    cap = int(dataset_voxels * MAX_BATCH_SHARE // cells)
    return max(MIN_BATCH, min(budget // cells, cap))


def plan_train_points(patch: Sequence[int]) -> int:
    """Training points per patch: ``TRAIN_POINT_SHARE`` of its cells (multiple of 64), >= 256."""
    return max(MIN_TRAIN_POINTS, int(round(math.prod(patch) * TRAIN_POINT_SHARE / 64)) * 64)


def plan_subdivision_points(patch: Sequence[int], train_points: int) -> int:
    """Points re-rendered per subdivision step: ``SUBDIVISION_SHARE`` of the patch cells, >= the
    training points."""
    share = SUBDIVISION_SHARE[len(patch)]
    return max(train_points, int(round(math.prod(patch) * share / 64)) * 64)


def device_memory(device: torch.device | str) -> tuple[str, int] | None:
    """(model name, total bytes) of a CUDA device; None for any other device (its budget is fixed)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return props.name, int(props.total_memory)


def cuda_patch_budget(spatial_dims: int, total_bytes: int) -> int:
    """The patch budget of a CUDA device with ``total_bytes`` of memory.

    A budget-sized patch trains ``MIN_BATCH`` at a time and smaller ones fill the budget
    (``plan_batch_size``), so a step holds at most ``MIN_BATCH`` x budget voxels; the budget is what
    ``DEVICE_MEMORY_SHARE`` of the device, less ``DEVICE_FIXED_BYTES``, holds at
    ``STEP_BYTES_PER_VOXEL``, rounded down to a multiple of ``PATCH_BUDGET / BUDGET_STEPS``, at least
    ``PATCH_BUDGET`` (today's CPU budget) and at most ``MAX_BUDGET_FACTOR`` x it.
    """
    base = PATCH_BUDGET[spatial_dims]
    usable = DEVICE_MEMORY_SHARE * total_bytes - DEVICE_FIXED_BYTES
    voxels = int(usable // (MIN_BATCH * STEP_BYTES_PER_VOXEL[spatial_dims]))
    step = base // BUDGET_STEPS
    return min(max(voxels // step * step, base), MAX_BUDGET_FACTOR * base)


def plan_patch_budget(spatial_dims: int, device: torch.device | str) -> tuple[int, str]:
    """The patch budget (voxels) for training on ``device``, and why: CUDA from its memory
    (``cuda_patch_budget``), any other device ``PATCH_BUDGET``."""
    device = torch.device(device)
    found = device_memory(device)
    if found is None:
        return PATCH_BUDGET[spatial_dims], f"{device}: fixed budget " + (
            "(on a CPU the step's time, not memory, limits the patch)" if device.type == "cpu"
            else "(memory not planned on this device type)")
    name, total = found
    budget, base = cuda_patch_budget(spatial_dims, total), PATCH_BUDGET[spatial_dims]
    gib = total / 2 ** 30
    rule = (f"({DEVICE_MEMORY_SHARE:.0%} x {gib:.1f} GiB - {DEVICE_FIXED_BYTES / 2 ** 30:.0f} GiB) / ({MIN_BATCH} "
            f"patches x {STEP_BYTES_PER_VOXEL[spatial_dims]:,} B per voxel, measured fp32 step)")
    bound = {base: ", raised to the CPU budget",
             MAX_BUDGET_FACTOR * base: f", capped at {MAX_BUDGET_FACTOR} x the CPU budget"}
    return budget, f"{device} {name}, {gib:.1f} GiB: {rule}{bound.get(budget, '')}"


# ----------------------------------------------------------------------------- the plan
@dataclasses.dataclass
class Decision:
    """One planned setting: the config field, its value, 'auto' or 'user', and why."""

    field: str
    value: Any
    source: str
    why: str


def level_strides(cfg: Any) -> list[tuple[int, ...]]:
    """Per-axis strides of the feature levels of the configured backbone (built, not trained)."""
    d, m = cfg.data, cfg.model
    net = build_backbone(m.backbone, d.spatial_dims, d.in_channels, **backbone_options(m.backbone, m.backbone_kwargs))
    return [f.stride for f in as_feature_info(net.feature_info, d.spatial_dims)]


PLANNED_FIELDS = ("data.patch_voxel_budget", "data.target_spacing", "data.slice_axis", "data.patch_size",
                  "train.batch_size", "data.normalization", "data.mirror_axes", "data.rotation_axes",
                  "model.pointrend.train_num_points", "model.pointrend.subdivision_num_points")


def unresolved(cfg: Any) -> list[str]:
    """The planned fields of ``cfg`` still set to 'auto'."""
    out = []
    for name in PLANNED_FIELDS:
        obj = cfg
        for part in name.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, str) and obj == AUTO:
            out.append(name)
    return out


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == AUTO


def _pick(decisions: list[Decision], field: str, current: Any, auto_value: Any, why: str,
          user_why: str = "set in the config") -> Any:
    """Record ``field``: the rule's value when the config says 'auto', else the user's."""
    if isinstance(current, str) and current == AUTO:
        decisions.append(Decision(field, auto_value, "auto", why))
        return auto_value
    decisions.append(Decision(field, current, "user", user_why))
    return current


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    return "x".join(f"{v:.{digits}g}" for v in values)


def make_plan(fp: dict[str, Any], cfg: Any, strides: Sequence[Sequence[int]],
              described: Sequence[tuple[str, Any, str, str]] = (), device: torch.device | str = "cpu"
              ) -> list[Decision]:
    """Resolve every 'auto' field of ``cfg`` from the fingerprint ``fp`` and the training ``device``.

    Args:
        fp: ``compute_fingerprint`` result.
        cfg: ``hparam.Config`` (not changed).
        strides: ``level_strides(cfg)``: the model's per-axis strides per feature level.
        described: the rows ``seg.dataset_json.describe_data`` returned for ``cfg``, shown first.
        device: the device training runs on (``train.device`` resolved): sets the patch budget.

    Returns:
        One ``Decision`` per planned field, in the order they depend on each other.
    """
    d, pr = cfg.data, cfg.model.pointrend
    # what the data describe (seg.dataset_json.describe_data): shown and recorded with the plan
    out: list[Decision] = [Decision(*x) for x in described]
    vol_dims = fp["spatial_dims"]
    budget = _pick_budget(out, d.patch_voxel_budget, d.spatial_dims, device)
    spacing = plan_target_spacing(fp["spacings"], fp["sizes"])
    why = (f"median of {fp['num_cases']} cases ({_fmt(fp['median_spacing'])} mm)"
           + ("; anisotropic: thick axis from its 10th percentile" if tuple(spacing) != tuple(
               round(s, 6) for s in fp["median_spacing"]) else ""))
    if d.spatial_dims == 3 and vol_dims == 3:
        fine = resampled_median_size(fp["spacings"], fp["sizes"], spacing)
        user_patch = None if _is_auto(d.patch_size) else d.patch_size
        thinnest = thinnest_class_mm(fp)
        coarse, patch = plan_context_spacing(spacing, fine, strides, budget, user_patch, thinnest)
        if coarse != tuple(spacing):
            first = user_patch or plan_patch_size(fine, spacing, strides, budget)
            before = math.prod(first) / math.prod(fine)
            after = math.prod(patch) / math.prod(resampled_median_size(fp["spacings"], fp["sizes"], coarse))
            why += (f"; x{max(c / s for c, s in zip(coarse, spacing)):.2f} coarser (large field of view): "
                    f"the patch saw {before:.0%} of the median case, now {after:.0%} (goal {CONTEXT_SHARE:.0%}; "
                    f"the thinnest class, {thinnest:.3g} mm, >= {MIN_THICKNESS_VOXELS} voxels thick)")
            spacing = coarse
        elif math.prod(patch) < CONTEXT_SHARE * math.prod(fine):
            why += (f"; kept although the patch sees {math.prod(patch) / math.prod(fine):.0%} of the median "
                    f"case: the thinnest class ({thinnest:.3g} mm) needs this grid")
    target = _pick(out, "data.target_spacing", d.target_spacing, spacing, why)
    grid_spacing = tuple(target) if target is not None else tuple(fp["median_spacing"])
    median = resampled_median_size(fp["spacings"], fp["sizes"], grid_spacing)
    slice_axis = _pick(out, "data.slice_axis", d.slice_axis,
                       plan_slice_axis(grid_spacing, fp["direction"]) if vol_dims == 3 else 2,
                       "thickest axis (ties: closest to inferior-superior, "
                       f"orientation {'/'.join(fp['orientations'])})")
    in_plane = [a for a in range(vol_dims) if not (d.spatial_dims == 2 and vol_dims == 3 and a == slice_axis)]
    net_median = [median[a] for a in in_plane]
    patch = plan_patch_size(net_median, [grid_spacing[a] for a in in_plane], strides, budget)
    patch = _pick(out, "data.patch_size", d.patch_size, patch,
                  f"median case {_fmt(net_median)} voxels at the target spacing, rounded up to the "
                  f"model's strides, within {budget:,} voxels")
    dataset_voxels = fp["num_cases"] * math.prod(median)
    _pick(out, "train.batch_size", cfg.train.batch_size,
          plan_batch_size(patch, budget, dataset_voxels),
          f"patches filling {budget:,} voxels, >= {MIN_BATCH}, <= {MAX_BATCH_SHARE:.0%} of the "
          "training voxels")
    named = channel_normalization(d.channel_names) or [None] * len(fp["channels"])
    norms = [plan_normalization(ch, fp["nonzero_crop_ratio"], n) for n, ch in zip(named, fp["channels"])]
    norm = norms[0] if len(set(norms)) == 1 else norms
    _pick(out, "data.normalization", d.normalization, norm, _normalization_why(fp, norms, named, d.channel_names))
    _pick(out, "data.mirror_axes", d.mirror_axes, plan_mirror_axes(d.spatial_dims),
          "all axes (restrict for left/right label pairs)")
    rotation = plan_rotation_axes(grid_spacing) if d.spatial_dims == 3 else (slice_axis,)
    _pick(out, "data.rotation_axes", d.rotation_axes, rotation,
          ("anisotropic: in-plane only" if is_anisotropic(grid_spacing) else "isotropic: all axes")
          if d.spatial_dims == 3 else "2D: in-plane")
    n_train = _pick(out, "model.pointrend.train_num_points", pr.train_num_points,
                    plan_train_points(patch), f"1/{round(1 / TRAIN_POINT_SHARE)} of the patch cells")
    _pick(out, "model.pointrend.subdivision_num_points", pr.subdivision_num_points,
          plan_subdivision_points(patch, n_train),
          f"{SUBDIVISION_SHARE[d.spatial_dims]:.3g} of the patch cells per step")
    return out


def _pick_budget(decisions: list[Decision], current: int | str, spatial_dims: int,
                 device: torch.device | str) -> int:
    """Record ``data.patch_voxel_budget``: ``plan_patch_budget`` for 'auto', else the user's; the
    device named either way."""
    value, why = plan_patch_budget(spatial_dims, device)
    return _pick(decisions, "data.patch_voxel_budget", current, value, why,
                 f"set in the config (training on {torch.device(device)})")


def _normalization_why(fp: dict[str, Any], norms: list[str], named: Sequence[str | None] = (),
                       channel_names: Sequence[str] | None = None) -> str:
    if named and named[0] is not None:
        return f"channel named {channel_names[0]!r} in dataset.json (nnU-Net's scheme for that name)"
    ch = fp["channels"][0]
    if norms[0] == "ct":
        return f"integer intensities down to {ch['min']:.0f} (Hounsfield units): clip to foreground 0.5-99.5 %"
    crop = 1 - fp["nonzero_crop_ratio"]
    return (f"cropping to the non-zero box removes {crop:.0%} of the median case "
            f"({'>' if norms[0] == 'zscore_nonzero' else '<='} {NONZERO_CROP_SHARE:.0%})")


def _set(cfg: Any, field: str, value: Any) -> None:
    obj, parts = cfg, field.split(".")
    for part in parts[:-1]:
        obj = getattr(obj, part)
    setattr(obj, parts[-1], value)


def apply_plan(cfg: Any, plan: Sequence[Decision]) -> Any:
    """A copy of ``cfg`` with every planned field set (the caller's object is not changed)."""
    out = copy.deepcopy(cfg)
    for decision in plan:
        if decision.field not in PLANNED_FIELDS:
            continue  # described by the data (seg.dataset_json), already set
        value = decision.value
        _set(out, decision.field, tuple(value) if isinstance(value, list) and
             decision.field != "data.normalization" else value)
    return out


def intensity_statistics(fp: dict[str, Any]) -> list[dict[str, float]]:
    """Per-channel foreground statistics the 'ct' scheme needs (stored in the checkpoint)."""
    return [{"mean": ch["foreground"]["mean"], "std": ch["foreground"]["std"],
             "clip_low": ch["foreground"]["p00_5"], "clip_high": ch["foreground"]["p99_5"]}
            for ch in fp["channels"]]


def plan_record(fp: dict[str, Any], plan: Sequence[Decision]) -> dict[str, Any]:
    """JSON-friendly ``RUN/plan.json`` content: the fingerprint summary and the decisions."""
    summary = {k: v for k, v in fp.items() if k not in ("sizes", "spacings", "key", "cases")}
    return {"fingerprint": summary, "decisions": [dataclasses.asdict(x) for x in plan]}


def format_tables(fp: dict[str, Any], plan: Sequence[Decision]) -> str:
    """The short tables printed at the start of training: what the data are, what was decided."""
    sizes = np.asarray(fp["sizes"])
    lines = [f"fingerprint of {fp['num_cases']} training case(s):",
             f"  size      min {_fmt(sizes.min(0))}  median {_fmt(fp['median_size'])}  max {_fmt(sizes.max(0))}",
             f"  spacing   median {_fmt(fp['median_spacing'])} mm; orientation "
             + ", ".join(f"{k} ({v})" for k, v in fp["orientations"].items()),
             f"  non-zero  {fp['nonzero_share']:.0%} of voxels; box of non-zero voxels "
             f"{fp['nonzero_crop_ratio']:.0%} of the volume (medians)"]
    for c, ch in enumerate(fp["channels"]):
        f = ch["foreground"]
        lines.append(f"  channel {c} range {ch['min']:.4g}..{ch['max']:.4g}{' (integers)' if ch['integer'] else ''};"
                     f" foreground mean {f['mean']:.4g} std {f['std']:.4g}, 0.5-99.5 % {f['p00_5']:.4g}..{f['p99_5']:.4g}")
    lines.append("  label volumes (median mm3): " + ", ".join(
        f"{k}: {v:.0f}" for k, v in fp["class_volume_mm3_median"].items())
        + "; thickness (median mm): " + ", ".join(
            f"{k}: {v:.3g}" for k, v in fp["class_thickness_mm_median"].items() if int(k) > 0))
    width = max(len(x.field) for x in plan)
    source_width = max(len(x.source) for x in plan)
    lines.append("plan (override any field with --set FIELD=VALUE):")
    for x in plan:
        value = "None" if x.value is None else (x.value if isinstance(x.value, str) else json.dumps(x.value))
        lines.append(f"  {x.field:<{width}}  {str(value):<22} {x.source:<{source_width}}  {x.why}")
    return "\n".join(lines)
