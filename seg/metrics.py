"""Overlap and boundary-quality metrics for 2D and 3D masks with per-axis spacing.

One definition per metric (see ``docs/metrics.md``); the surface-distance family follows MONAI's
voxel-based definition so it can be pinned against ``monai.metrics`` in the tests:

- **Edge voxels** of a mask M: voxels of M with at least one face neighbour outside M (the image
  border counts as outside), i.e. ``M & ~binary_erosion(M)`` with the cross-shaped structuring element.
- **Distances**: Euclidean, in mm (coordinates scaled by ``spacing``), from every edge voxel of one mask
  to the nearest edge voxel of the other (exact, KD-tree; equal to an EDT with ``sampling=spacing``).
- **HD95**: max of the two directed 95th percentiles (linear interpolation, like ``np.percentile``).
- **ASSD**: mean of the pooled distances of both directions.
- **NSD at tau**: fraction of edge voxels of both masks whose distance to the other edge is <= tau.
- **Boundary F-score at tau**: P = fraction of predicted edge voxels within tau of the reference edge,
  R = the converse, F = 2PR / (P + R).
- **Boundary IoU** (Cheng et al. 2021, mm version): IoU of the inner bands, the band of M being its edge
  voxels plus every voxel of M within ``width_mm`` of a voxel outside M.

Arrays are in any axis order as long as ``spacing`` is in the same order (the project uses (X, Y[, Z])).
Empty masks: both empty gives NaN for every metric; one empty gives 0 for the overlap-type metrics
(Dice, IoU, Boundary IoU, boundary F, NSD) and ``inf`` for the distances (HD95, ASSD).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from seg.errors import ConfigError
from seg.registry import unknown_name_message

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_METRICS", "DEFAULT_OPTIONS", "HIGHER_IS_BETTER", "MetricAccumulator", "SurfaceDistances",
    "assd", "boundary_band", "boundary_f_score", "boundary_iou", "dice", "edge_voxels", "evaluate_case",
    "evaluate_case_with_distances", "hd95", "iou", "normalized_surface_dice", "surface_distances",
    "validate_options",
]

DEFAULT_METRICS: tuple[str, ...] = ("dice", "iou", "boundary_iou", "boundary_f", "hd95", "assd", "nsd")
# Default options of evaluate_case (all lengths in mm).
DEFAULT_OPTIONS: dict[str, float] = {
    "width_mm": 2.0,  # Boundary IoU inner-band width d
    "tolerance_mm": 2.0,  # boundary F-score tolerance (theta)
    "nsd_tolerance_mm": 2.0,  # normalised surface Dice tolerance (tau)
    "percentile": 95.0,  # robust Hausdorff percentile
}
# Direction of each metric, for the report (worst cases, colour of the box plots).
HIGHER_IS_BETTER: dict[str, bool] = {
    "dice": True, "iou": True, "boundary_iou": True, "boundary_f": True, "nsd": True,
    "hd95": False, "assd": False,
}
_EPS = 1e-9  # relative slack on "distance <= tolerance" so that exact lattice distances count as inside


# ----------------------------------------------------------------------------------------------------
# Validation and cropping helpers
# ----------------------------------------------------------------------------------------------------
def _as_mask(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2D or 3D mask, got shape {x.shape}")
    return x.astype(bool, copy=False)


def _check_pair(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validates a mask pair and returns (pred, ref, spacing) as (bool, bool, float64 array)."""
    pred, ref = _as_mask(pred, "pred"), _as_mask(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {pred.shape} vs {ref.shape}")
    spacing = np.ones(pred.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (pred.ndim,) or not np.all(spacing > 0):
        raise ValueError(f"spacing must be {pred.ndim} positive numbers, got {tuple(spacing)}")
    return pred, ref, spacing


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Tight bounding box of the True voxels as slices, or None for an empty mask."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _crop_pad(mask: np.ndarray, box: tuple[slice, ...], margin: Sequence[int]) -> np.ndarray:
    """Crops ``mask`` to ``box`` grown by ``margin`` voxels per axis, zero-padding outside the image."""
    out = np.zeros([s.stop - s.start + 2 * m for s, m in zip(box, margin)], dtype=bool)
    src, dst = [], []
    for s, m, n in zip(box, margin, mask.shape):
        lo, hi = max(s.start - m, 0), min(s.stop + m, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - (s.start - m), hi - (s.start - m)))
    out[tuple(dst)] = mask[tuple(src)]
    return out


def _shift_and(out: np.ndarray, mask: np.ndarray, axis: int) -> None:
    """In place: out &= mask shifted by +1 and by -1 along ``axis`` (voxels beyond the border: False)."""
    lo = [slice(None)] * mask.ndim
    hi = [slice(None)] * mask.ndim
    lo[axis], hi[axis] = slice(None, -1), slice(1, None)
    out[tuple(hi)] &= mask[tuple(lo)]
    out[tuple(lo)] &= mask[tuple(hi)]
    edge = [slice(None)] * mask.ndim
    for idx in (0, -1):
        edge[axis] = idx
        out[tuple(edge)] = False


def _erode_cross(mask: np.ndarray) -> np.ndarray:
    """Binary erosion with the face-connected cross; outside the array counts as background."""
    out = mask.copy()
    for axis in range(mask.ndim):
        _shift_and(out, mask, axis)
    return out


def edge_voxels(mask: np.ndarray) -> np.ndarray:
    """Edge voxels of a mask: voxels of it with a face neighbour outside it (or outside the image).

    Args:
        mask: (*spatial) boolean mask, 2D or 3D.

    Returns:
        (*spatial) boolean array, the same as ``mask & ~scipy.ndimage.binary_erosion(mask)``.
    """
    mask = _as_mask(mask, "mask")
    return mask & ~_erode_cross(mask)


# ----------------------------------------------------------------------------------------------------
# Overlap metrics
# ----------------------------------------------------------------------------------------------------
def _overlap_counts(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int]:
    pred, ref = _as_mask(pred, "pred"), _as_mask(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {pred.shape} vs {ref.shape}")
    inter = int(np.count_nonzero(pred & ref))
    return inter, int(np.count_nonzero(pred)), int(np.count_nonzero(ref))


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Volumetric Dice 2|P∩R| / (|P| + |R|); NaN if both masks are empty, 0 if one is.

    Args:
        pred: (*spatial) predicted mask (nonzero = foreground).
        ref: (*spatial) reference mask.
    """
    inter, n_pred, n_ref = _overlap_counts(pred, ref)
    return math.nan if n_pred + n_ref == 0 else 2.0 * inter / (n_pred + n_ref)


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """Jaccard index |P∩R| / |P∪R|; NaN if both masks are empty, 0 if one is."""
    inter, n_pred, n_ref = _overlap_counts(pred, ref)
    union = n_pred + n_ref - inter
    return math.nan if union == 0 else inter / union


# ----------------------------------------------------------------------------------------------------
# Boundary IoU
# ----------------------------------------------------------------------------------------------------
def _box_dilate(mask: np.ndarray, radius: Sequence[int]) -> np.ndarray:
    """Binary dilation by a (2r+1) box, separable (one 1D maximum filter per axis)."""
    out = mask.view(np.uint8)
    for axis, r in enumerate(radius):
        if r > 0:
            out = ndimage.maximum_filter1d(out, 2 * r + 1, axis=axis, mode="constant", cval=0)
    return out.astype(bool)


def boundary_band(mask: np.ndarray, spacing: Sequence[float] | None = None,
                  width_mm: float = DEFAULT_OPTIONS["width_mm"]) -> np.ndarray:
    """Inner boundary band of a mask: its edge voxels plus its voxels within ``width_mm`` of the outside.

    Exact Euclidean distance between voxel centres (the outside of the image counts as background), so
    the band equals ``edge_voxels(M) | (M & (distance_transform_edt(M, sampling=spacing) <= width_mm))``,
    computed only near the boundary: a KD-tree over the outer edge answers for the candidate voxels.

    Args:
        mask: (*spatial) boolean mask.
        spacing: voxel size in mm per axis (array axis order); None for 1.
        width_mm: band width d in mm.

    Returns:
        (*spatial) boolean band, a subset of ``mask``.
    """
    mask, _, spacing = _check_pair(mask, mask, spacing)
    band = np.zeros_like(mask)
    box = _bbox(mask)
    if box is None:
        return band
    radius = [int(math.floor(width_mm / s * (1 + _EPS))) for s in spacing]
    margin = [r + 1 for r in radius]
    m = _crop_pad(mask, box, margin)
    inner_edge = m & ~_erode_cross(m)
    outer_edge = ~m & ~_erode_cross(~m)  # background voxels with a face neighbour in the mask
    candidates = m & ~inner_edge & _box_dilate(outer_edge, radius)
    local = inner_edge.copy()
    if candidates.any():
        tree = cKDTree(np.argwhere(outer_edge) * spacing)
        dist = tree.query(np.argwhere(candidates) * spacing, k=1, workers=-1)[0]
        local[candidates] = dist <= width_mm * (1 + _EPS)
    # paste back: the crop started ``margin`` voxels before the box
    src = tuple(slice(m_, m_ + s.stop - s.start) for s, m_ in zip(box, margin))
    band[box] = local[src]
    return band


def boundary_iou(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None,
                 width_mm: float = DEFAULT_OPTIONS["width_mm"]) -> float:
    """Boundary IoU: |B(P) ∩ B(R)| / |B(P) ∪ B(R)| with B the inner band of width ``width_mm``.

    Args:
        pred: (*spatial) predicted mask.
        ref: (*spatial) reference mask.
        spacing: voxel size in mm per axis (array axis order).
        width_mm: band width d in mm (default 2 mm; the edge voxels are always in the band).

    Returns:
        The score in [0, 1]; NaN if both masks are empty, 0 if exactly one is.
    """
    pred, ref, spacing = _check_pair(pred, ref, spacing)
    return iou(boundary_band(pred, spacing, width_mm), boundary_band(ref, spacing, width_mm))


# ----------------------------------------------------------------------------------------------------
# Surface distances
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SurfaceDistances:
    """Edge voxels of a mask pair and their distances (mm) to the other mask's edge.

    Attributes:
        pred_to_ref: (n_pred,) distance of each predicted edge voxel to the reference edge.
        ref_to_pred: (n_ref,) distance of each reference edge voxel to the predicted edge.
        pred_coords: (n_pred, ndim) integer voxel indices of the predicted edge voxels.
        ref_coords: (n_ref, ndim) integer voxel indices of the reference edge voxels.
    """

    pred_to_ref: np.ndarray
    ref_to_pred: np.ndarray
    pred_coords: np.ndarray
    ref_coords: np.ndarray

    @property
    def both_empty(self) -> bool:
        return self.pred_to_ref.size == 0 and self.ref_to_pred.size == 0


def _nearest(points: np.ndarray, queries: np.ndarray) -> np.ndarray:
    if queries.shape[0] == 0:
        return np.zeros(0)
    if points.shape[0] == 0:
        return np.full(queries.shape[0], np.inf)
    return cKDTree(points, leafsize=32).query(queries, k=1, workers=-1)[0]


def surface_distances(pred: np.ndarray, ref: np.ndarray,
                      spacing: Sequence[float] | None = None) -> SurfaceDistances:
    """Distances between the edge voxels of two masks (see the module docstring).

    Only the bounding box of both masks (plus one voxel) is touched, and distances come from a KD-tree
    over edge-voxel coordinates, so the cost follows the surface size, not the image size.

    Args:
        pred: (*spatial) predicted mask.
        ref: (*spatial) reference mask.
        spacing: voxel size in mm per axis (array axis order); None for 1.
    """
    pred, ref, spacing = _check_pair(pred, ref, spacing)
    box = _bbox(pred | ref)
    if box is None:
        empty = np.zeros((0, pred.ndim), dtype=np.int64)
        return SurfaceDistances(np.zeros(0), np.zeros(0), empty, empty)
    margin = [1] * pred.ndim
    offset = np.array([s.start - 1 for s in box])
    coords = []
    for mask in (pred, ref):
        m = _crop_pad(mask, box, margin)
        coords.append(np.argwhere(m & ~_erode_cross(m)))
    pts = [c * spacing for c in coords]
    return SurfaceDistances(pred_to_ref=_nearest(pts[1], pts[0]), ref_to_pred=_nearest(pts[0], pts[1]),
                            pred_coords=coords[0] + offset, ref_coords=coords[1] + offset)


def _one_empty(sd: SurfaceDistances) -> bool:
    return sd.pred_to_ref.size == 0 or sd.ref_to_pred.size == 0


def hd95_from(sd: SurfaceDistances, percentile: float = 95.0) -> float:
    """Robust Hausdorff distance from precomputed distances (NaN both empty, inf one empty)."""
    if sd.both_empty:
        return math.nan
    if _one_empty(sd):
        return math.inf
    return float(max(np.percentile(sd.pred_to_ref, percentile), np.percentile(sd.ref_to_pred, percentile)))


def assd_from(sd: SurfaceDistances) -> float:
    """Average symmetric surface distance (pooled mean) from precomputed distances."""
    if sd.both_empty:
        return math.nan
    if _one_empty(sd):
        return math.inf
    total = sd.pred_to_ref.sum() + sd.ref_to_pred.sum()
    return float(total / (sd.pred_to_ref.size + sd.ref_to_pred.size))


def nsd_from(sd: SurfaceDistances, tolerance_mm: float) -> float:
    """Normalised surface Dice at ``tolerance_mm`` from precomputed distances."""
    if sd.both_empty:
        return math.nan
    tol = tolerance_mm * (1 + _EPS)
    hits = np.count_nonzero(sd.pred_to_ref <= tol) + np.count_nonzero(sd.ref_to_pred <= tol)
    return hits / (sd.pred_to_ref.size + sd.ref_to_pred.size)


def boundary_f_from(sd: SurfaceDistances, tolerance_mm: float) -> float:
    """Boundary F-score at ``tolerance_mm`` from precomputed distances."""
    if sd.both_empty:
        return math.nan
    if _one_empty(sd):
        return 0.0
    tol = tolerance_mm * (1 + _EPS)
    precision = np.count_nonzero(sd.pred_to_ref <= tol) / sd.pred_to_ref.size
    recall = np.count_nonzero(sd.ref_to_pred <= tol) / sd.ref_to_pred.size
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None,
         percentile: float = 95.0) -> float:
    """95th-percentile Hausdorff distance in mm (MONAI voxel-based definition).

    Args:
        pred: (*spatial) predicted mask.
        ref: (*spatial) reference mask.
        spacing: voxel size in mm per axis (array axis order).
        percentile: the percentile (100 gives the Hausdorff distance).

    Returns:
        max(P95(d(pred edge -> ref edge)), P95(d(ref edge -> pred edge))); NaN both empty, inf one empty.
    """
    return hd95_from(surface_distances(pred, ref, spacing), percentile)


def assd(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Average symmetric surface distance in mm: mean over the edge voxels of both masks of the
    distance to the other edge. NaN both empty, inf one empty."""
    return assd_from(surface_distances(pred, ref, spacing))


def normalized_surface_dice(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None,
                            tolerance_mm: float = DEFAULT_OPTIONS["nsd_tolerance_mm"]) -> float:
    """Normalised surface Dice at tau = ``tolerance_mm`` (edge voxels counted, not surfel areas).

    Returns:
        (#pred edge within tau + #ref edge within tau) / (#pred edge + #ref edge); NaN both empty,
        0 one empty.
    """
    return nsd_from(surface_distances(pred, ref, spacing), tolerance_mm)


def boundary_f_score(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None,
                     tolerance_mm: float = DEFAULT_OPTIONS["tolerance_mm"]) -> float:
    """Boundary F-score 2PR/(P+R) at ``tolerance_mm`` over edge voxels; NaN both empty, 0 one empty."""
    return boundary_f_from(surface_distances(pred, ref, spacing), tolerance_mm)


# ----------------------------------------------------------------------------------------------------
# Per-case evaluation over integer label maps
# ----------------------------------------------------------------------------------------------------
def validate_options(metrics: Sequence[str], options: Mapping[str, Any]) -> dict[str, float]:
    """Checks metric and option names (ConfigError with close matches); returns options with defaults."""
    for name in metrics:
        if name not in HIGHER_IS_BETTER:
            raise ConfigError(unknown_name_message("metric (--metrics)", name, HIGHER_IS_BETTER))
    for key in options:
        if key not in DEFAULT_OPTIONS:
            raise ConfigError(unknown_name_message("metric option", key, DEFAULT_OPTIONS))
    return {**DEFAULT_OPTIONS, **{k: float(v) for k, v in options.items()}}


def _label_metrics(pred: np.ndarray, ref: np.ndarray, spacing: np.ndarray, metrics: Sequence[str],
                   opt: Mapping[str, float]) -> tuple[dict[str, float], SurfaceDistances | None]:
    surface = {"boundary_f", "hd95", "assd", "nsd"}
    sd = surface_distances(pred, ref, spacing) if surface.intersection(metrics) else None
    compute = {
        "dice": lambda: dice(pred, ref),
        "iou": lambda: iou(pred, ref),
        "boundary_iou": lambda: boundary_iou(pred, ref, spacing, opt["width_mm"]),
        "boundary_f": lambda: boundary_f_from(sd, opt["tolerance_mm"]),
        "hd95": lambda: hd95_from(sd, opt["percentile"]),
        "assd": lambda: assd_from(sd),
        "nsd": lambda: nsd_from(sd, opt["nsd_tolerance_mm"]),
    }
    return {name: float(compute[name]()) for name in metrics}, sd


def evaluate_case_with_distances(
        pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], labels: Sequence[int],
        metrics: Sequence[str] = DEFAULT_METRICS, **options: float,
) -> tuple[dict[int, dict[str, float]], dict[int, SurfaceDistances | None]]:
    """``evaluate_case`` that also returns each label's ``SurfaceDistances`` (None when no surface
    metric was asked for), e.g. to find the slices with the largest boundary error."""
    opt = validate_options(metrics, options)
    pred, ref = np.asarray(pred), np.asarray(ref)
    _, _, spacing_arr = _check_pair(pred, ref, spacing)
    results, distances = {}, {}
    for lab in labels:
        results[int(lab)], distances[int(lab)] = _label_metrics(pred == lab, ref == lab, spacing_arr, metrics, opt)
    return results, distances


def evaluate_case(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], labels: Sequence[int],
                  metrics: Sequence[str] = DEFAULT_METRICS, **options: float) -> dict[int, dict[str, float]]:
    """Metrics per foreground label for one case.

    Args:
        pred: (*spatial) integer label map, 2D or 3D.
        ref: (*spatial) integer reference label map.
        spacing: voxel size in mm per axis, in the arrays' axis order.
        labels: the label values to evaluate (absent from both maps gives NaN everywhere).
        metrics: names among ``DEFAULT_METRICS``.
        **options: ``width_mm``, ``tolerance_mm``, ``nsd_tolerance_mm``, ``percentile``
            (defaults in ``DEFAULT_OPTIONS``).

    Returns:
        ``{label: {metric: value}}``.
    """
    return evaluate_case_with_distances(pred, ref, spacing, labels, metrics, **options)[0]


# ----------------------------------------------------------------------------------------------------
# Accumulator
# ----------------------------------------------------------------------------------------------------
class MetricAccumulator:
    """Collects ``evaluate_case`` results and reduces them per class and metric, ignoring NaN.

    ``inf`` (a distance where exactly one mask is empty) is kept, so a mean with one such case is inf;
    the median stays informative. ``n`` counts the non-NaN values.
    """

    def __init__(self) -> None:
        self.cases: list[str] = []
        self._rows: list[tuple[str, int, dict[str, float]]] = []

    def add(self, case_name: str, results: Mapping[int, Mapping[str, float]]) -> None:
        """Adds one case: ``results`` as returned by ``evaluate_case``."""
        self.cases.append(case_name)
        for label, values in results.items():
            self._rows.append((case_name, int(label), {k: float(v) for k, v in values.items()}))

    def rows(self) -> list[tuple[str, int, dict[str, float]]]:
        """All (case, label, {metric: value}) rows in insertion order."""
        return list(self._rows)

    def values(self, label: int, metric: str) -> np.ndarray:
        """(n_cases,) values of one metric for one label, NaN where missing."""
        return np.array([v.get(metric, math.nan) for _, lab, v in self._rows if lab == label], dtype=float)

    def labels(self) -> list[int]:
        return sorted({lab for _, lab, _ in self._rows})

    def subset(self, cases: Sequence[str]) -> "MetricAccumulator":
        """A new accumulator with the rows of ``cases`` only (e.g. one cross-validation fold's)."""
        keep, out = set(cases), MetricAccumulator()
        out.cases = [c for c in self.cases if c in keep]
        out._rows = [row for row in self._rows if row[0] in keep]
        return out

    def metrics(self) -> list[str]:
        names: dict[str, None] = {}
        for _, _, values in self._rows:
            names.update(dict.fromkeys(values))
        return list(names)

    def summary(self) -> dict[int, dict[str, dict[str, float]]]:
        """``{label: {metric: {"mean", "std", "median", "n"}}}`` with NaN-aware reductions."""
        return {lab: {m: _reduce(self.values(lab, m)) for m in self.metrics()} for lab in self.labels()}


def _reduce(values: Iterable[float]) -> dict[str, float]:
    v = np.asarray(list(values), dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "n": 0}
    with np.errstate(invalid="ignore"):  # inf - inf inside std
        std = float(np.std(v)) if np.all(np.isfinite(v)) else math.inf
        return {"mean": float(np.mean(v)), "std": std, "median": float(np.median(v)), "n": int(v.size)}
