"""Metrics against closed forms, MONAI (test-only reference), an EDT reference, and properties."""
from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from seg import metrics as M
from seg.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI deprecation noise

SPACINGS = {2: (1.0, 1.5), 3: (1.0, 1.5, 1.8)}  # anisotropic, with 2 * min > max (see _cuboid_case)
SHAPES = {2: (31, 26), 3: (19, 17, 12)}


def _blob(rng: np.random.Generator, shape: tuple[int, ...], frac: float = 0.6) -> np.ndarray:
    x = ndimage.gaussian_filter(rng.random(shape), 1.5)
    return x > np.quantile(x, frac)


def _pair(seed: int, dims: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return _blob(rng, SHAPES[dims]), _blob(rng, SHAPES[dims])


# ---------------------------------------------------------------------------------------------------
# Closed forms: a cuboid A against A dilated by one voxel on every side (B)
# ---------------------------------------------------------------------------------------------------
def _cuboid_case(dims: int) -> tuple[np.ndarray, np.ndarray, tuple, np.ndarray, np.ndarray]:
    """Returns (A, B, spacing, d_A->B, d_B->A) with the distances derived by hand.

    With 2 * min(spacing) > max(spacing) and spacing sorted ascending:
    - an edge voxel of A whose outside neighbours lie along the axes S is s_{min S} from B's shell, and
      there are 2 * prod_{a<k}(n_a - 2) * prod_{a>k} n_a of them with min S = k;
    - a shell voxel of B outside A's range along the axes T is sqrt(sum_{a in T} s_a^2) from A's edge,
      and there are 2^|T| * prod_{a not in T} n_a of them.
    """
    n = (9, 12, 7)[:dims]
    s = SPACINGS[dims]
    A = np.zeros(tuple(k + 6 for k in n), bool)
    A[tuple(slice(3, 3 + k) for k in n)] = True
    B = ndimage.binary_dilation(A, np.ones((3,) * dims, bool))
    d_ab = np.concatenate([
        np.full(2 * math.prod(n[a] - 2 for a in range(k)) * math.prod(n[k + 1:]), s[k]) for k in range(dims)])
    d_ba = []
    for size in range(1, dims + 1):
        for T in itertools.combinations(range(dims), size):
            count = 2 ** size * math.prod(n[a] for a in range(dims) if a not in T)
            d_ba.append(np.full(count, math.sqrt(sum(s[a] ** 2 for a in T))))
    return A, B, s, d_ab, np.concatenate(d_ba)


@pytest.mark.parametrize("dims", [2, 3])
def test_cuboid_closed_form(dims):
    A, B, s, d_ab, d_ba = _cuboid_case(dims)
    sd = M.surface_distances(A, B, s)
    np.testing.assert_allclose(np.sort(sd.pred_to_ref), d_ab, rtol=1e-12)
    np.testing.assert_allclose(np.sort(sd.ref_to_pred), d_ba, rtol=1e-12)
    hd = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    assert M.hd95(A, B, s) == pytest.approx(hd, rel=1e-12)
    assert M.hd95(A, B, s, percentile=100) == pytest.approx(math.sqrt(sum(x * x for x in s)), rel=1e-12)
    n_a, n_b = d_ab.size, d_ba.size
    assert M.assd(A, B, s) == pytest.approx((d_ab.sum() + d_ba.sum()) / (n_a + n_b), rel=1e-12)
    # tau between s0 and s1: only the distances equal to s0 count
    hits_a, hits_b = np.sum(d_ab == s[0]), np.sum(d_ba == s[0])
    assert M.normalized_surface_dice(A, B, s, 1.2) == pytest.approx((hits_a + hits_b) / (n_a + n_b))
    p, r = hits_a / n_a, hits_b / n_b
    assert M.boundary_f_score(A, B, s, 1.2) == pytest.approx(2 * p * r / (p + r))
    vol_a, vol_b = A.sum(), B.sum()
    assert M.dice(A, B) == pytest.approx(2 * vol_a / (vol_a + vol_b))
    assert M.iou(A, B) == pytest.approx(vol_a / vol_b)


def test_rectangle_boundary_iou_closed_form():
    # A: 9x12 at spacing (1, 1.5); B: A grown by one. With d = 2 mm the band of a rectangle is its first
    # two rows (2 * 1.0 <= 2) and first column (1.5 <= 2 < 3.0) on each side.
    A, B, s, _, _ = _cuboid_case(2)
    band_a = 4 * 12 + 2 * (9 - 4)
    band_b = 4 * 14 + 2 * (11 - 4)
    inter = 2 * 12  # A's first and last rows lie in B's second rows
    assert M.boundary_iou(A, B, s, width_mm=2.0) == pytest.approx(inter / (band_a + band_b - inter))
    assert M.boundary_iou(A, B, s, width_mm=1.0) == 0.0  # 1-voxel rings never meet


@pytest.mark.parametrize("dims", [2, 3])
def test_shifted_cuboid(dims):
    """B = A shifted by t voxels along axis 0: Dice (n0 - t) / n0, Hausdorff t * s0."""
    s, t, n0 = SPACINGS[dims], 2, 9
    A = np.zeros(SHAPES[dims], bool)
    A[(slice(4, 4 + n0),) + (slice(3, 10),) * (dims - 1)] = True
    B = np.roll(A, t, axis=0)
    assert M.dice(A, B) == pytest.approx((n0 - t) / n0)
    assert M.iou(A, B) == pytest.approx((n0 - t) / (n0 + t))
    assert M.hd95(A, B, s, percentile=100) == pytest.approx(t * s[0])


def test_sphere_vs_shifted_sphere_hausdorff():
    """A ball and its translate by t voxels: the Hausdorff distance is at most t*s0 (each edge voxel has
    its translate on the other edge) and equals it at the far pole."""
    s = (0.8, 1.3, 2.1)
    grid = np.meshgrid(*[np.arange(n) for n in (31, 25, 17)], indexing="ij")
    ball = sum(((g - c) * sp / 9.0) ** 2 for g, c, sp in zip(grid, (12, 12, 8), s)) <= 1
    shifted = np.roll(ball, 3, axis=0)
    sd = M.surface_distances(ball, shifted, s)
    assert sd.ref_to_pred.max() <= 3 * s[0] + 1e-9 and sd.pred_to_ref.max() <= 3 * s[0] + 1e-9
    assert M.hd95(ball, shifted, s, percentile=100) == pytest.approx(3 * s[0])
    assert M.hd95(ball, shifted, s) <= 3 * s[0]


# ---------------------------------------------------------------------------------------------------
# Agreement with MONAI's voxel-based definitions (the chosen reference), random shapes
# ---------------------------------------------------------------------------------------------------
def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x[None, None].astype(np.float32))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_against_monai(dims, seed):
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice
    pred, ref = _pair(seed, dims)
    s = SPACINGS[dims] if seed == 0 else tuple(np.random.default_rng(seed).uniform(0.4, 2.5, dims))
    # MONAI returns float32, hence a relative tolerance of 1e-6
    for pct in (95, 100):
        want = compute_hausdorff_distance(_t(pred), _t(ref), percentile=pct, spacing=s).item()
        assert M.hd95(pred, ref, s, percentile=pct) == pytest.approx(want, rel=1e-6)
    want = compute_average_surface_distance(_t(pred), _t(ref), symmetric=True, spacing=s).item()
    assert M.assd(pred, ref, s) == pytest.approx(want, rel=1e-6)
    sd = M.surface_distances(pred, ref, s)
    all_d = np.concatenate([sd.pred_to_ref, sd.ref_to_pred])
    for tau in (0.7, 1.6, 3.1):
        assert np.min(np.abs(all_d - tau)) > 1e-5  # no distance on the threshold (float32 in MONAI)
        want = compute_surface_dice(_t(pred), _t(ref), [tau], spacing=s, include_background=True).item()
        assert M.normalized_surface_dice(pred, ref, s, tau) == pytest.approx(want, rel=1e-6)


def _edt_reference(pred, ref, s):
    """Independent path: scipy erosion edges + dense EDT with sampling (DeepMind-style lookup)."""
    e_p, e_r = (m & ~ndimage.binary_erosion(m) for m in (pred, ref))
    d_pr = ndimage.distance_transform_edt(~e_r, sampling=s)[e_p]
    d_rp = ndimage.distance_transform_edt(~e_p, sampling=s)[e_r]
    return d_pr, d_rp


@pytest.mark.parametrize("dims", [2, 3])
def test_boundary_f_against_edt_reference(dims):
    pred, ref = _pair(3, dims)
    s = SPACINGS[dims]
    d_pr, d_rp = _edt_reference(pred, ref, s)
    for tau in (0.9, 2.2):
        p, r = np.mean(d_pr <= tau), np.mean(d_rp <= tau)
        assert M.boundary_f_score(pred, ref, s, tau) == pytest.approx(2 * p * r / (p + r), abs=1e-12)


@pytest.mark.parametrize("dims", [2, 3])
def test_overlap_against_monai(dims):
    from monai.metrics import compute_dice, compute_iou
    pred, ref = _pair(4, dims)
    assert M.dice(pred, ref) == pytest.approx(compute_dice(_t(pred), _t(ref)).item(), rel=1e-6)
    assert M.iou(pred, ref) == pytest.approx(compute_iou(_t(pred), _t(ref)).item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# Boundary IoU
# ---------------------------------------------------------------------------------------------------
def _band_reference(mask, s, width):
    inside = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=s)[(slice(1, -1),) * mask.ndim]
    return (mask & ~ndimage.binary_erosion(mask)) | (mask & (inside <= width + 1e-9))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("width", [0.5, 2.0, 3.7])
def test_boundary_band_against_edt(dims, width):
    pred, ref = _pair(5, dims)
    s = SPACINGS[dims]
    for m in (pred, ref):
        np.testing.assert_array_equal(M.boundary_band(m, s, width), _band_reference(m, s, width))
    want = M.iou(_band_reference(pred, s, width), _band_reference(ref, s, width))
    assert M.boundary_iou(pred, ref, s, width) == pytest.approx(want)


@pytest.mark.parametrize("dims", [2, 3])
def test_boundary_iou_properties(dims):
    pred, ref = _pair(6, dims)
    s = SPACINGS[dims]
    assert M.boundary_iou(pred, pred, s) == 1.0
    inradius = max(ndimage.distance_transform_edt(np.pad(m, 1), sampling=s).max() for m in (pred, ref))
    assert M.boundary_iou(pred, ref, s, width_mm=inradius) == pytest.approx(M.iou(pred, ref))
    assert M.boundary_iou(pred, ref, s, width_mm=0.5 * inradius) != pytest.approx(M.iou(pred, ref))


def test_mask_touching_the_image_border():
    m = np.zeros((7, 9), bool)
    m[:4, :] = True  # touches three borders: those voxels are edge voxels
    np.testing.assert_array_equal(M.edge_voxels(m), m & ~ndimage.binary_erosion(m))
    assert M.boundary_band(m, None, 0.5).sum() == m.sum() - 2 * 7  # all but rows 1-2, cols 1-7
    assert M.hd95(m, m, None) == 0.0


# ---------------------------------------------------------------------------------------------------
# Empty-mask conventions (docs/metrics.md table)
# ---------------------------------------------------------------------------------------------------
EMPTY_TABLE = {  # metric: (both empty, ref empty & pred not, pred empty & ref not)
    "dice": (math.nan, 0.0, 0.0),
    "iou": (math.nan, 0.0, 0.0),
    "boundary_iou": (math.nan, 0.0, 0.0),
    "boundary_f": (math.nan, 0.0, 0.0),
    "nsd": (math.nan, 0.0, 0.0),
    "hd95": (math.nan, math.inf, math.inf),
    "assd": (math.nan, math.inf, math.inf),
}


@pytest.mark.parametrize("dims", [2, 3])
def test_empty_mask_table(dims):
    s = SPACINGS[dims]
    empty = np.zeros(SHAPES[dims], np.uint8)
    full = empty.copy()
    full[(slice(2, 6),) * dims] = 1
    cases = [(empty, empty), (full, empty), (empty, full)]  # (pred, ref)
    for i, (pred, ref) in enumerate(cases):
        got = M.evaluate_case(pred, ref, s, labels=[1])[1]
        for name, expected in EMPTY_TABLE.items():
            np.testing.assert_equal(got[name], expected[i], err_msg=f"{name}, case {i}")


@pytest.mark.parametrize("dims", [2, 3])
def test_empty_conventions_match_monai(dims):
    """MONAI's Hausdorff (max) and NSD give the same NaN / inf / 0. (Its HD95 turns 'one empty' into NaN:
    torch.quantile interpolates inf - inf; we keep inf, like its Hausdorff and ASSD.)"""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice
    s = SPACINGS[dims]
    empty = np.zeros(SHAPES[dims], bool)
    full = empty.copy()
    full[(slice(2, 6),) * dims] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for pred, ref in [(empty, empty), (full, empty), (empty, full)]:
            want = compute_hausdorff_distance(_t(pred), _t(ref), spacing=s).item()
            np.testing.assert_equal(M.hd95(pred, ref, s, percentile=100), want)
            np.testing.assert_equal(M.hd95(pred, ref, s), want)
            want = compute_average_surface_distance(_t(pred), _t(ref), symmetric=True, spacing=s).item()
            np.testing.assert_equal(M.assd(pred, ref, s), want)
            want = compute_surface_dice(_t(pred), _t(ref), [1.0], spacing=s, include_background=True).item()
            np.testing.assert_equal(M.normalized_surface_dice(pred, ref, s, 1.0), want)


# ---------------------------------------------------------------------------------------------------
# evaluate_case and the accumulator
# ---------------------------------------------------------------------------------------------------
def test_evaluate_case_matches_single_mask_functions():
    rng = np.random.default_rng(7)
    x = ndimage.gaussian_filter(rng.random((21, 18, 11)), 1.5)
    ref = np.digitize(x, np.quantile(x, [0.4, 0.7]))
    pred = np.digitize(ndimage.shift(x, (1, 0, 0), order=0), np.quantile(x, [0.4, 0.7]))
    s = (0.9, 1.2, 2.0)
    out = M.evaluate_case(pred, ref, s, labels=[1, 2, 5], tolerance_mm=1.0, width_mm=1.5)
    assert set(out) == {1, 2, 5} and all(math.isnan(v) for v in out[5].values())
    for lab in (1, 2):
        p, r = pred == lab, ref == lab
        assert out[lab]["dice"] == M.dice(p, r)
        assert out[lab]["boundary_iou"] == M.boundary_iou(p, r, s, 1.5)
        assert out[lab]["boundary_f"] == M.boundary_f_score(p, r, s, 1.0)
        assert out[lab]["nsd"] == M.normalized_surface_dice(p, r, s, M.DEFAULT_OPTIONS["nsd_tolerance_mm"])
        assert out[lab]["hd95"] == M.hd95(p, r, s)
        assert out[lab]["assd"] == M.assd(p, r, s)


def test_evaluate_case_rejects_unknown_names():
    m = np.zeros((5, 6), np.uint8)
    with pytest.raises(ConfigError, match="Did you mean 'hd95'"):
        M.evaluate_case(m, m, (1, 1), [1], metrics=["hd96"])
    with pytest.raises(ConfigError, match="Did you mean 'width_mm'"):
        M.evaluate_case(m, m, (1, 1), [1], widht_mm=2)
    with pytest.raises(ValueError, match="spacing"):
        M.evaluate_case(m, m, (1, 1, 1), [1])


def test_accumulator_nan_aware():
    acc = M.MetricAccumulator()
    acc.add("a", {1: {"dice": 0.5, "hd95": 2.0}, 2: {"dice": math.nan, "hd95": math.nan}})
    acc.add("b", {1: {"dice": 0.7, "hd95": 4.0}, 2: {"dice": 0.2, "hd95": math.inf}})
    acc.add("c", {1: {"dice": math.nan, "hd95": 9.0}, 2: {"dice": 0.4, "hd95": 1.0}})
    s = acc.summary()
    assert s[1]["dice"] == pytest.approx({"mean": 0.6, "std": 0.1, "median": 0.6, "n": 2})
    assert s[1]["hd95"]["median"] == 4.0 and s[1]["hd95"]["n"] == 3
    assert s[2]["hd95"]["mean"] == math.inf and s[2]["hd95"]["median"] == math.inf
    assert s[2]["dice"]["std"] == pytest.approx(0.1)
    assert acc.cases == ["a", "b", "c"] and acc.labels() == [1, 2]
