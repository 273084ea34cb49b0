"""Properties P1-P10 of docs/pointrend.md for seg/pointrend.py, each in 2D and 3D (float64)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from heads.point_head import StandardPointHead
from seg import pointrend as pr
from seg.losses import masked_cross_entropy

SIZES = {2: (5, 7), 3: (3, 5, 4)}  # non-cubic, (H, W) / (D, H, W)
DIMS = [2, 3]


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _interp(x, size):
    mode = {2: "bilinear", 3: "trilinear"}[x.ndim - 2]
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


def _to_index(coords, size):
    """x-first normalised coords (N, P, d) -> integer indices per tensor axis (N, P, d)."""
    axes = coords.flip(-1)  # (z, y, x) tensor axis order
    lengths = torch.tensor(size, dtype=coords.dtype)
    return torch.floor(axes * lengths).long()


# P1 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_p1_cell_centres_reproduce_map(d, mode, padding):
    size = SIZES[d]
    f = _rand(2, 3, *size, seed=1)
    centres = pr.generate_regular_grid_point_coords(2, size, dtype=torch.float64)
    assert centres.shape == (2, math.prod(size), d)
    out = pr.point_sample(f, centres, mode=mode, padding_mode=padding)
    torch.testing.assert_close(out, f.flatten(2), atol=1e-12, rtol=0)


@pytest.mark.parametrize("d", DIMS)
def test_regular_grid_is_x_first(d):
    size = SIZES[d]
    c = pr.generate_regular_grid_point_coords(1, size, dtype=torch.float64)[0]
    # the second point steps along the last (x) axis
    assert c[1, 0] - c[0, 0] == pytest.approx(1 / size[-1])
    torch.testing.assert_close(c[1, 1:], c[0, 1:])
    assert pr.generate_regular_grid_point_coords(3, 4).shape == (3, 16, 2)


# P2 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", DIMS)
def test_p2_nearest_labels_and_ignore(d):
    size = SIZES[d]
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 4, (2, *size), generator=g)
    labels[labels == 3] = 255
    coords = torch.rand(2, 200, d, generator=g, dtype=torch.float64)
    idx = _to_index(coords, size)
    expected = torch.stack([labels[n][tuple(idx[n].T)] for n in range(2)])
    got = pr.sample_point_labels(labels, coords)
    assert got.dtype == torch.int64
    torch.testing.assert_close(got, expected)
    assert (got == 255).any()


# P3 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", DIMS)
def test_p3_interpolate_consistency(d):
    size = SIZES[d]
    big = tuple(2 * s for s in size)
    f = _rand(1, 2, *size, seed=3).abs() + 1.0  # positive: zero padding always changes border
    ref = _interp(f, big).flatten(2)
    centres = pr.generate_regular_grid_point_coords(1, big, dtype=torch.float64)
    torch.testing.assert_close(pr.point_sample(f, centres), ref, atol=1e-12, rtol=0)  # border
    zeros = pr.point_sample(f, centres, padding_mode="zeros")
    lo = 0.5 / torch.tensor(size[::-1], dtype=torch.float64)  # half a source cell, x-first
    interior = ((centres[0] >= lo) & (centres[0] <= 1 - lo)).all(-1)
    torch.testing.assert_close(zeros[..., interior], ref[..., interior], atol=1e-12, rtol=0)
    assert ((zeros[..., ~interior] - ref[..., ~interior]).abs() > 1e-6).all()


@pytest.mark.parametrize("d", DIMS)
def test_p3_zero_padding_halves_border(d):
    c = 3.0
    f = torch.full((1, 1, *SIZES[d]), c, dtype=torch.float64)
    u = torch.full((1, 1, d), 0.5, dtype=torch.float64)
    u[..., 0] = 0.0  # x on the border, other axes at the centre
    assert pr.point_sample(f, u, padding_mode="zeros").item() == pytest.approx(c / 2)
    assert pr.point_sample(f, u).item() == pytest.approx(c)  # our default: border


# P4 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", DIMS)
def test_p4_training_sampler(d):
    n, k, beta, r = 40, 3, 0.75, 2
    coarse = _rand(r, 3, *SIZES[d], seed=4)
    coords = pr.get_uncertain_point_coords_with_randomness(
        coarse, pr.calculate_uncertainty, n, k, beta, torch.Generator().manual_seed(7))
    assert coords.shape == (r, n, d) and coords.dtype == torch.float64
    assert ((coords >= 0) & (coords < 1)).all()
    g = torch.Generator().manual_seed(7)
    candidates = torch.rand(r, n * k, d, generator=g, dtype=torch.float64)
    n_imp = int(beta * n)
    coverage = torch.rand(r, n - n_imp, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(coords[:, n_imp:], coverage, atol=0, rtol=0)
    unc = pr.calculate_uncertainty(pr.point_sample(coarse, candidates))[:, 0]
    for i in range(r):
        match = (coords[i, :n_imp, None, :] == candidates[i, None]).all(-1)  # (n_imp, M)
        assert (match.sum(1) == 1).all()  # every important point is one candidate
        chosen = match.any(0)
        assert unc[i][chosen].min() >= unc[i][~chosen].max()


# P5 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", DIMS)
def test_p5_beta_zero_is_uniform_and_logit_free(d):
    a, b = _rand(1, 3, *SIZES[d], seed=5), _rand(1, 3, *SIZES[d], seed=6)
    pts = [pr.get_uncertain_point_coords_with_randomness(
        x, pr.calculate_uncertainty, 2000, 3, 0.0, torch.Generator().manual_seed(1)) for x in (a, b)]
    torch.testing.assert_close(pts[0], pts[1], atol=0, rtol=0)
    for axis in range(d):
        assert stats.kstest(pts[0][0, :, axis].numpy(), "uniform").pvalue > 0.01


@pytest.mark.parametrize("d", DIMS)
def test_p5_k1_beta1_is_candidate_permutation(d):
    coarse = _rand(1, 3, *SIZES[d], seed=8)
    pts = pr.get_uncertain_point_coords_with_randomness(
        coarse, pr.calculate_uncertainty, 50, 1, 1.0, torch.Generator().manual_seed(3))
    cands = torch.rand(1, 50, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    key = lambda t: np.array(sorted(map(tuple, t[0].numpy())))  # noqa: E731
    np.testing.assert_array_equal(key(pts), key(cands))


@pytest.mark.parametrize("d", DIMS)
def test_p5_importance_concentrates_on_edge(d):
    size = (6,) * (d - 1) + (8,)
    logit = torch.where(torch.arange(8) < 4, 5.0, -5.0).to(torch.float64)  # step at x = 0.5
    coarse = torch.stack([logit, -logit]).view(1, 2, *([1] * (d - 1)), 8).expand(1, 2, *size)
    coarse = coarse.contiguous()
    g = torch.Generator().manual_seed(0)
    imp = pr.get_uncertain_point_coords_with_randomness(
        coarse, pr.calculate_uncertainty, 50, 10, 1.0, g)  # ~62 of 500 candidates in the band
    uni = pr.get_uncertain_point_coords_with_randomness(
        coarse, pr.calculate_uncertainty, 50, 10, 0.0, g)
    dist = lambda p: (p[..., 0] - 0.5).abs().mean()  # noqa: E731
    assert dist(imp) < 1 / 16 < 0.2 < dist(uni)  # the transition band is |x - .5| < 1/16


# P6 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", DIMS)
def test_p6_uncertainty_after_interpolation(d):
    step = torch.tensor([-1.0, 1.0], dtype=torch.float64).view(1, 1, *([1] * (d - 1)), 2)
    edge = torch.full((1, 1, d), 0.5, dtype=torch.float64)
    assert pr.calculate_uncertainty(pr.point_sample(step, edge)).item() == 0.0
    # interpolating the uncertainty instead would give -1
    assert pr.point_sample(pr.calculate_uncertainty(step), edge).item() == -1.0
    pts = pr.get_uncertain_point_coords_with_randomness(
        step, pr.calculate_uncertainty, 10, 20, 1.0, torch.Generator().manual_seed(0))
    assert (pts[..., 0] - 0.5).abs().max() < 0.05


@pytest.mark.parametrize("d", DIMS)
def test_p6_semantic_uncertainty_sign_and_ties(d):
    logits = _rand(2, 4, *SIZES[d], seed=9)
    logits[:, 0] = logits[:, 1] = logits.max(1).values + 1  # tie between the top two
    logits[1] = _rand(4, *SIZES[d], seed=10)
    u = pr.calculate_uncertainty(logits)
    assert u.shape == (2, 1, *SIZES[d]) and (u <= 0).all()
    assert (u[0] == 0).all() and (u[1] < 0).all()
    top = logits[1].sort(0, descending=True).values
    torch.testing.assert_close(u[1, 0], top[1] - top[0])


# P7 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", DIMS)
def test_p7_on_grid_selection_and_decoding(d):
    size = SIZES[d]
    cells = math.prod(size)
    g = torch.Generator().manual_seed(11)
    umap = torch.randperm(2 * cells, generator=g).to(torch.float64).view(2, 1, *size)  # distinct
    idx, coords = pr.get_uncertain_point_coords_on_grid(umap, 9)
    assert idx.shape == (2, 9) and coords.shape == (2, 9, d)
    expected = umap.view(2, -1).argsort(dim=1, descending=True)[:, :9]
    torch.testing.assert_close(idx, expected)
    ijk = _to_index(coords, size)  # round trip: centres -> (z, y, x) -> flat index
    flat = torch.zeros_like(idx)
    for axis, length in enumerate(size):
        flat = flat * length + ijk[..., axis]
    torch.testing.assert_close(flat, idx)
    torch.testing.assert_close(pr.point_sample(umap, coords)[:, 0],
                               umap.view(2, -1).gather(1, idx))
    assert pr.get_uncertain_point_coords_on_grid(umap, 10 * cells)[0].shape == (2, cells)


# P8 / P9 / P10: subdivision --------------------------------------------------------------------
def _point_fn(d, k=3, seed=12):
    """A random point head on random fine features and the ORIGINAL coarse logits."""
    torch.manual_seed(seed)
    head = StandardPointHead(4, k, num_fc=2, fc_dim=8).double()
    torch.nn.init.normal_(head.predictor.weight, std=1.0)
    fine = [_rand(2, 4, *(2 * s for s in SIZES[d]), seed=seed)]
    coarse = _rand(2, k, *SIZES[d], seed=seed + 1)
    return coarse, (lambda c: pr.point_head_logits(head, fine, coarse, c))


@pytest.mark.parametrize("d", DIMS)
def test_p8_subdivision_locality(d):
    coarse, fn = _point_fn(d)
    logits = coarse
    for step in range(2):  # the 2nd step must still use the original coarse features
        size = tuple(s * 2 ** (step + 1) for s in SIZES[d])
        new, n = pr.subdivision_step(logits, fn, 11, size)
        up = _interp(logits, size).flatten(2)
        idx, coords = pr.get_uncertain_point_coords_on_grid(
            pr.calculate_uncertainty(_interp(logits, size)), 11)
        flat = new.flatten(2)
        mask = torch.ones_like(up[:, 0], dtype=torch.bool).scatter(1, idx, False)
        torch.testing.assert_close(flat[mask[:, None].expand_as(flat)],
                                   up[mask[:, None].expand_as(up)], atol=0, rtol=0)
        sel = flat.gather(2, idx[:, None].expand(-1, flat.shape[1], -1))
        torch.testing.assert_close(sel, fn(coords), atol=1e-12, rtol=0)
        assert n == 11
        logits = new


@pytest.mark.parametrize("d", DIMS)
def test_p9_dense_equivalence(d):
    coarse, fn = _point_fn(d)
    big = tuple(2 * s for s in SIZES[d])
    cells = math.prod(big)
    step, n = pr.subdivision_step(coarse, fn, cells, big)
    dense = pr.dense_point_inference(fn, 2, big, dtype=torch.float64, chunk=7)
    torch.testing.assert_close(step, dense, atol=1e-12, rtol=0)
    assert n == cells
    # D2's init-resolution doubling: start densely on the 4x grid == two dense steps from coarse
    out = tuple(8 * s for s in SIZES[d])
    four = tuple(4 * s for s in SIZES[d])
    budget = math.prod(four)
    ours, n_ours = pr.subdivision_inference(coarse, fn, out, budget)
    d2 = pr.dense_point_inference(fn, 2, four, dtype=torch.float64)
    d2, n_d2 = pr.subdivision_inference(d2, fn, out, budget)
    torch.testing.assert_close(ours, d2, atol=1e-12, rtol=0)
    assert n_ours == cells + budget + budget and n_d2 == budget


def test_p10_point_budget_paper_numbers():
    fn = lambda c: torch.zeros(1, 1, c.shape[1], dtype=torch.float64)  # noqa: E731
    coarse = _rand(1, 1, 7, 7)
    out, n = pr.subdivision_inference(coarse, fn, (224, 224), 784)
    assert out.shape == (1, 1, 224, 224) and n == 3332  # 196 + 4 * 784 (paper)
    _, n3 = pr.subdivision_inference(_rand(1, 1, 28, 28), fn, (224, 224), 784)
    assert 784 + n3 == 3136  # detectron2's schedule: dense 28^2 then 3 steps


@pytest.mark.parametrize("d", DIMS)
def test_p10_budget_and_final_size(d):
    coarse = _rand(1, 2, *SIZES[d])
    fn = lambda c: torch.zeros(1, 2, c.shape[1], dtype=torch.float64)  # noqa: E731
    out_size = tuple(s * 8 for s in SIZES[d])
    sizes = pr.subdivision_sizes(SIZES[d], out_size)
    assert sizes == [tuple(s * 2 ** t for s in SIZES[d]) for t in (1, 2, 3)]
    out, n = pr.subdivision_inference(coarse, fn, out_size, 50)
    assert out.shape[2:] == out_size
    assert n == sum(min(50, math.prod(s)) for s in sizes)


def test_anisotropic_and_non_power_of_two_schedule():
    # per-axis factors: D needs one x2 step, H and W two -> (1, 2, 2) on the second step
    assert pr.subdivision_sizes((4, 5, 6), (8, 20, 24)) == [(8, 10, 12), (8, 20, 24)]
    # 7 -> 97: x2 steps, the last one lands exactly on the output
    assert pr.subdivision_sizes((7,), (97,)) == [(14,), (28,), (56,), (97,)]
    assert pr.subdivision_sizes((6, 6), (6, 6)) == []
    assert pr.subdivision_sizes((3, 4), (24, 32), steps=2) == [(6, 8), (12, 16)]
    fn = lambda c: torch.zeros(1, 2, c.shape[1], dtype=torch.float64)  # noqa: E731
    out, _ = pr.subdivision_inference(_rand(1, 2, 3, 4, 5), fn, (5, 31, 37), 30, steps=2)
    assert out.shape == (1, 2, 5, 31, 37)


@pytest.mark.parametrize("d", DIMS)
def test_point_loss_all_ignored_is_finite(d):
    logits = _rand(2, 3, 17, seed=13).requires_grad_()
    loss = masked_cross_entropy(logits, torch.full((2, 17), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
    labels = torch.randint(0, 3, (2, 17))
    labels[0, :5] = 255
    ref = F.cross_entropy(logits, labels, ignore_index=255)
    torch.testing.assert_close(masked_cross_entropy(logits, labels), ref)


# regions (boxes): the mask head's per-object extension ----------------------------------------
@pytest.mark.parametrize("d", DIMS)
def test_box_points_sample_the_crop(d):
    """A regular grid inside a cell-aligned box reproduces the crop's cells (P1 on the crop)."""
    size = (6, 9, 8)[-d:]
    f = _rand(2, 3, *size, seed=20)
    lo_idx, hi_idx = (1, 2, 3)[-d:], (4, 8, 7)[-d:]  # tensor axis order
    crop = tuple(h - l for l, h in zip(lo_idx, hi_idx))
    box = torch.tensor([l / s for l, s in zip(lo_idx, size)][::-1]
                       + [h / s for h, s in zip(hi_idx, size)][::-1], dtype=torch.float64)
    boxes = torch.stack([box, box, pr.whole_input_boxes(1, d, dtype=torch.float64)[0][0]])
    batch_index = torch.tensor([1, 0, 1])
    grid = pr.generate_regular_grid_point_coords(3, crop, dtype=torch.float64)
    out = pr.point_sample_fine_grained_features([f, 2 * f], boxes, batch_index, grid)
    assert out.shape == (3, 6, math.prod(crop))
    sl = (slice(None),) + tuple(slice(l, h) for l, h in zip(lo_idx, hi_idx))
    torch.testing.assert_close(out[0, :3], f[1][sl].flatten(1), atol=1e-12, rtol=0)
    torch.testing.assert_close(out[1, 3:], 2 * f[0][sl].flatten(1), atol=1e-12, rtol=0)
    whole = pr.point_sample(f[1:], pr.box_to_image_coords(grid[2:], boxes[2:]))
    torch.testing.assert_close(out[2:, :3], whole, atol=1e-12, rtol=0)


@pytest.mark.parametrize("d", DIMS)
def test_boxes_from_labels(d):
    size = (7, 9, 11)[-d:]
    labels = torch.zeros(2, *size, dtype=torch.long)
    a = (slice(1, 3), slice(2, 5), slice(0, 4))[-d:]
    b = (slice(4, 7), slice(6, 9), slice(7, 11))[-d:]
    labels[(0,) + a] = 1
    labels[(0,) + b] = 1  # a second component of class 1
    labels[(1,) + a] = 2
    labels[(1,) + b] = 255  # ignored: no region
    boxes, batch, classes = pr.boxes_from_labels(labels, 3)
    def ref(sl):
        return [s.start / n for s, n in zip(sl, size)][::-1] + [s.stop / n for s, n in zip(sl, size)][::-1]
    expected = torch.tensor([ref(a), ref(b), ref(a)], dtype=torch.float32)
    order = torch.argsort(boxes[:, 0] + 10 * batch.float())
    torch.testing.assert_close(boxes[order], expected[[0, 1, 2]])
    assert batch[order].tolist() == [0, 0, 1] and classes[order].tolist() == [1, 1, 2]
    jit, _, _ = pr.boxes_from_labels(labels, 3, jitter=0.2, generator=torch.Generator().manual_seed(0))
    assert ((jit >= 0) & (jit <= 1)).all() and (jit[:, d:] > jit[:, :d]).all()
    assert (jit - boxes).abs().max() > 0
    empty, eb, _ = pr.boxes_from_labels(torch.zeros(1, *size, dtype=torch.long), 3)
    assert empty.shape == (0, 2 * d) and eb.shape == (0,)


# image features (our extension: input intensities at and around the points) ----------------------
@pytest.mark.parametrize("d", DIMS)
def test_image_point_features_closed_form_on_a_ramp(d):
    size = SIZES[d] if d == 2 else (4, 6, 5)
    slopes = [3.0, -2.0, 0.5][:d]  # per x-first axis
    axes = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in size], indexing="ij")
    ramp = sum(a * g for a, g in zip(slopes, reversed(axes)))  # sum_x-first slope * index
    images = torch.stack([ramp, 10 * ramp + 1])[None]  # (1, 2, *size): two channels
    # interior voxel centres, x-first normalised
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randint(1, s - 1, (9,), generator=g) for s in reversed(size)], -1)
    coords = ((idx.double() + 0.5) / torch.tensor(list(reversed(size)), dtype=torch.float64))[None]
    offsets = pr.image_offsets("neighbourhood", d)
    assert len(offsets) == 2 * d + 1 and offsets[0] == (0,) * d
    feats = pr.image_point_features(images, coords, offsets)
    assert feats.shape == (1, 2 * len(offsets), 9)
    for o, off in enumerate(offsets):
        expected = sum(a * (idx[:, i] + off[i]) for i, a in enumerate(slopes)).double()
        torch.testing.assert_close(feats[0, o], expected)                      # channel 0
        torch.testing.assert_close(feats[0, len(offsets) + o], 10 * expected + 1)  # channel 1
    assert pr.image_offsets("point", d) == [(0,) * d] and pr.image_offsets("none", d) == []
    with pytest.raises(ValueError, match="image_features"):
        pr.image_offsets("patch", d)


@pytest.mark.parametrize("d", DIMS)
def test_image_point_features_clamp_at_the_border(d):
    size = SIZES[d]
    images = _rand(1, 1, *size)
    corner = torch.full((1, 1, d), 0.5) / torch.tensor(list(reversed(size)))  # centre of voxel 0
    feats = pr.image_point_features(images, corner.double(), pr.image_offsets("neighbourhood", d))
    first = images.reshape(-1)[0]
    # every "-1" neighbour of voxel 0 is clamped to voxel 0 itself
    for o, off in enumerate(pr.image_offsets("neighbourhood", d)):
        if min(off) < 0:
            torch.testing.assert_close(feats[0, o, 0], first)
