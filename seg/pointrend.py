"""PointRend point sampling, selection and subdivision as pure, dims-generic functions.

Names follow detectron2's ``projects/PointRend/point_rend/point_features.py`` (see
``docs/pointrend.md``); the code is our own and works for 2D (N, C, H, W) and 3D
(N, C, D, H, W) tensors alike, the number of spatial axes being taken from the tensor rank.

Coordinate conventions (used by every function here):
    * Point coordinates are normalised to [0, 1] per axis over the whole tensor extent.
    * They are stored **x-first**, as ``grid_sample`` wants: (x, y) in 2D and (x, y, z) in 3D,
      with x <-> W (last axis), y <-> H, z <-> D.  ``coords[..., 0]`` indexes the *last* axis.
    * ``align_corners=False`` everywhere: cell j of an axis of length L covers [j/L, (j+1)/L) and its
      centre (j + 0.5)/L maps exactly onto index j.

Padding (deliberate difference from detectron2, docs/pointrend.md §1): ``point_sample``
defaults to ``padding_mode="border"``, not grid_sample's ``"zeros"``.  With "zeros" a sample taken
less than half a cell from the border is blended with zeros (a constant map c reads c/2 at u=0), so
border logits look uncertain during training and refined cells disagree with
``F.interpolate(align_corners=False)``.  Medical patches are cut at arbitrary places, so their
borders must not attract points.  With "border" point sampling of a map equals ``F.interpolate``
everywhere (property P3, tested).  Pass ``padding_mode="zeros"`` to reproduce detectron2.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from seg.ops import resize

#: the label value ignored by point targets and losses
IGNORE_INDEX = 255

PointFn = Callable[[torch.Tensor], torch.Tensor]


def point_sample(input: torch.Tensor, coords: torch.Tensor, **kwargs) -> torch.Tensor:
    """Sample ``input`` at normalised, x-first point coordinates (grid_sample wrapper).

    Args:
        input: (N, C, *S) feature, logit or label map (2 or 3 spatial axes).
        coords: (N, P, d) points or (N, *G, d) grid in [0, 1], x-first; d = input.ndim - 2.
        **kwargs: grid_sample options; defaults ``mode="bilinear"`` (trilinear for 5-D input),
            ``padding_mode="border"`` and ``align_corners=False``.

    Returns:
        (N, C, P) for point lists, (N, C, *G) for grids.
    """
    d = input.ndim - 2
    if coords.shape[-1] != d:
        raise ValueError(f"coords last dim {coords.shape[-1]} != spatial dims {d}")
    kwargs.setdefault("padding_mode", "border")
    kwargs.setdefault("align_corners", False)
    point_list = coords.ndim == 3
    grid = 2.0 * coords.to(input.dtype) - 1.0
    if point_list:  # (N, P, d) -> (N, P, 1, [1,] d)
        grid = grid.view(grid.shape[0], grid.shape[1], *([1] * (d - 1)), d)
    out = F.grid_sample(input, grid, **kwargs)
    return out.reshape(out.shape[0], out.shape[1], -1) if point_list else out


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of logits: top2 - top1 over classes (<= 0, 0 at ties); -|logit| for 1 channel.

    Uses **logits**, as detectron2/mmseg do (the paper's text says probabilities; the rankings
    differ).  Higher means more uncertain.

    Args:
        logits: (R, C, ...) with classes on axis 1.

    Returns:
        (R, 1, ...) uncertainty.
    """
    if logits.shape[1] == 1:
        return -logits.abs()
    top2 = logits.topk(2, dim=1).values  # (R, 2, ...), sorted descending
    return top2[:, 1:2] - top2[:, 0:1]


def get_uncertain_point_coords_with_randomness(
        coarse_logits: torch.Tensor, uncertainty_func: Callable[[torch.Tensor], torch.Tensor],
        num_points: int, oversample_ratio: float, importance_sample_ratio: float,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-time point selection (docs/pointrend.md §3), 2D or 3D.

    Draws M = int(N k) uniform candidates, samples the logits there (trilinear/bilinear), computes
    the uncertainty *of the sampled logits*, keeps the int(beta N) most uncertain candidates and
    appends N - int(beta N) fresh uniform points (in that order).

    Args:
        coarse_logits: (R, C, *S) logits.
        uncertainty_func: (R, C, P) -> (R, 1, P), higher = more uncertain.
        num_points: N, points per region.
        oversample_ratio: k >= 1.
        importance_sample_ratio: beta in [0, 1].
        generator: optional RNG; candidates are drawn first, then the coverage points.

    Returns:
        (R, N, d) coordinates in [0, 1), x-first, float32 at least.
    """
    if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
        raise ValueError("need oversample_ratio >= 1 and 0 <= importance_sample_ratio <= 1")
    r, d = coarse_logits.shape[0], coarse_logits.ndim - 2
    dtype = torch.promote_types(coarse_logits.dtype, torch.float32)  # no half-precision coords
    opts = dict(device=coarse_logits.device, dtype=dtype, generator=generator)
    with torch.no_grad():
        num_sampled = int(num_points * oversample_ratio)
        candidates = torch.rand(r, num_sampled, d, **opts)
        uncertainty = uncertainty_func(point_sample(coarse_logits.detach(), candidates))
        num_uncertain = int(importance_sample_ratio * num_points)
        idx = uncertainty[:, 0].topk(num_uncertain, dim=1).indices  # (R, n_imp)
        important = candidates.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))
        coverage = torch.rand(r, num_points - num_uncertain, d, **opts)
        return torch.cat([important, coverage], dim=1)


def cell_centres_from_index(idx: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Normalised x-first centres of cells given row-major flat indices.

    Args:
        idx: (R, P) flat indices into a grid of spatial ``size`` ((H, W) or (D, H, W)).
        size: spatial size in tensor axis order.

    Returns:
        (R, P, d) coordinates; decodes x = idx mod W, y = idx // W mod H, z = idx // (H W) (the
        ``mod H`` matters whenever D > 1, docs/pointrend.md §4).
    """
    coords, rest = [], idx
    for length in reversed(tuple(size)):  # last axis (x) first
        coords.append(((rest % length).to(torch.float64) + 0.5) / length)
        rest = torch.div(rest, length, rounding_mode="floor")
    return torch.stack(coords, dim=-1)


def get_uncertain_point_coords_on_grid(uncertainty_map: torch.Tensor,
                                       num_points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference-time selection: centres of the min(N, #cells) most uncertain cells (§4).

    Args:
        uncertainty_map: (R, 1, *S) uncertainty, higher = more uncertain.
        num_points: N.

    Returns:
        idx: (R, N') long flat row-major indices into S (for the scatter of the subdivision step).
        coords: (R, N', d) x-first normalised cell centres (float32 at least).
    """
    r, size = uncertainty_map.shape[0], uncertainty_map.shape[2:]
    n = min(int(num_points), math.prod(size))
    idx = uncertainty_map.reshape(r, -1).topk(n, dim=1).indices
    dtype = torch.promote_types(uncertainty_map.dtype, torch.float32)
    return idx, cell_centres_from_index(idx, size).to(dtype)


def generate_regular_grid_point_coords(r: int, size: int | Sequence[int], d: int | None = None,
                                       device: torch.device | str | None = None,
                                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Cell centres of a regular grid, ordered row-major over the spatial axes.

    Args:
        r: number of regions (batch).
        size: spatial size in tensor axis order ((H, W) / (D, H, W)) or one int with ``d``.
        d: number of spatial axes when ``size`` is an int (default 2, as detectron2).
        device, dtype: of the output.

    Returns:
        (r, prod(size), d) x-first coordinates; point i is cell i of ``x.flatten(2)``.
    """
    if isinstance(size, int):
        size = (size,) * (d or 2)
    axes = [(torch.arange(n, device=device, dtype=torch.float64) + 0.5) / n for n in size]
    mesh = torch.meshgrid(*axes, indexing="ij")  # each (*size), tensor axis order
    coords = torch.stack(mesh[::-1], dim=-1).reshape(1, -1, len(size))  # x-first
    return coords.to(dtype).expand(r, -1, -1).contiguous()


def sample_point_labels(labels: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Point targets: nearest-neighbour label at each point (the ignore label survives).

    Args:
        labels: (N, *S) integer label map.
        coords: (N, P, d) x-first normalised coordinates.

    Returns:
        (N, P) int64 labels.
    """
    values = point_sample(labels.unsqueeze(1).to(torch.float32), coords.to(torch.float32),
                          mode="nearest")
    return values[:, 0].round().long()


def point_head_logits(point_head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      fine_features: Sequence[torch.Tensor], coarse_logits: torch.Tensor,
                      coords: torch.Tensor,
                      neighbourhoods: Sequence[tuple[torch.Tensor, Sequence[Sequence[int]]]] = ()
                      ) -> torch.Tensor:
    """Evaluate a point head at ``coords``: fine features of every level concatenated on dim=1
    (not detectron2's latent dim=0) plus the *original* coarse logits sampled at the same points.

    Args:
        point_head: (fine (N, C_f, P), coarse (N, K, P)) -> (N, K, P).
        fine_features: list of (N, C_i, *S_i) maps, each sampled at the points.
        coarse_logits: (N, K, *S_c) original coarse prediction.
        coords: (N, P, d).
        neighbourhoods: (map, voxel offsets) pairs, each map sampled at the offsets from every point
            (``image_point_features``) and appended after ``fine_features``, in order; the model
            passes its input level here (``image_offsets``).

    Returns:
        (N, K, P) point logits.
    """
    fine = [point_sample(f, coords) for f in fine_features]
    fine += [image_point_features(level, coords, offsets) for level, offsets in neighbourhoods]
    fine = torch.cat(fine, dim=1)
    return point_head(fine, point_sample(coarse_logits, coords))


IMAGE_FEATURE_MODES = ("none", "point", "neighbourhood", "cube", "cube5")


def image_offsets(mode: str, d: int) -> list[tuple[int, ...]]:
    """Voxel offsets at which ``image_point_features`` samples the input for ``mode``.

    'none': no offsets; 'point': the point itself; 'neighbourhood': the point and its 2d face
    neighbours (one voxel either side along each axis), which carries the local intensity gradient;
    'cube': the 3^d voxels around and including the point (x-first, x fastest); 'cube5': the 5^d.
    """
    if mode not in IMAGE_FEATURE_MODES:
        raise ValueError(f"image_features must be one of {IMAGE_FEATURE_MODES}, got {mode!r}")
    if mode == "none":
        return []
    if mode in ("cube", "cube5"):
        r = 1 if mode == "cube" else 2
        return [tuple(reversed(o)) for o in itertools.product(range(-r, r + 1), repeat=d)]
    offsets = [(0,) * d]
    if mode == "neighbourhood":
        for axis in range(d):
            for step in (-1, 1):
                offsets.append(tuple(step if a == axis else 0 for a in range(d)))
    return offsets


def image_point_features(images: torch.Tensor, coords: torch.Tensor,
                         offsets: Sequence[Sequence[int]]) -> torch.Tensor:
    """Input intensities at the points and at voxel ``offsets`` from them (border-clamped).

    The backbone's finest level is stride 4 (PointRend's P2); structures a few voxels thick (a
    cortical ribbon, a vessel wall) are below its resolution, while the input itself is exact at
    every voxel.  Appending these samples to the fine-grained features lets the point head see the
    edge it is asked to place.

    Args:
        images: (N, C, *S) network input.
        coords: (N, P, d) normalised, x-first points.
        offsets: voxel offsets, x-first per point coordinate axis (``image_offsets``).

    Returns:
        (N, C * len(offsets), P).
    """
    if not offsets:
        return images.new_zeros(images.shape[0], 0, coords.shape[1])
    # one voxel in normalised x-first units: 1 / size of that axis (sizes are stored last-axis = x)
    voxel = torch.tensor([1.0 / s for s in reversed(images.shape[2:])], dtype=coords.dtype)
    # made on the CPU, then type_as(coords): a traced graph (seg.export) follows the input's device
    delta = (torch.tensor(offsets, dtype=coords.dtype) * voxel).type_as(coords)   # (O, d)
    p = coords.shape[1]
    pts = (coords.unsqueeze(1) + delta.view(1, -1, 1, coords.shape[-1])).flatten(1, 2)  # (N, O*P, d)
    sampled = point_sample(images, pts)                                    # (N, C, O*P)
    return sampled.view(images.shape[0], images.shape[1], len(offsets), p).flatten(1, 2)


def subdivision_sizes(coarse_size: Sequence[int], out_size: Sequence[int],
                      steps: int | None = None) -> list[tuple[int, ...]]:
    """Per-step grid sizes of the subdivision schedule, per axis.

    Auto (``steps=None``): axis a gets n_a = round(log2(out_a / coarse_a)) steps (at least one
    when the sizes differ); each step doubles it, except its last step, which goes exactly to
    ``out_a`` (so a non power-of-two ratio ends on the exact output grid, which the point head
    still refines).  Axes with fewer steps (anisotropic strides such as (1, 2, 2) per step) do them
    first.  With an explicit ``steps`` every axis doubles for min(steps, n_a) steps and the caller
    finishes with a plain resize (detectron2's fixed SUBDIVISION_STEPS).

    Returns:
        list of spatial sizes, one per step (empty when nothing is to be done).
    """
    plan = []
    for c, o in zip(coarse_size, out_size):
        n = 0 if c == o else max(1, round(math.log2(o / c)))
        plan.append(n if steps is None else min(n, steps))
    sizes = []
    for t in range(max(plan, default=0)):
        size = []
        for c, o, n in zip(coarse_size, out_size, plan):
            if t >= n:
                size.append(sizes[-1][len(size)] if sizes else c)
            elif steps is None and t == n - 1:
                size.append(o)
            else:
                size.append(c * 2 ** (t + 1))
        sizes.append(tuple(size))
    return sizes


def subdivision_step(logits: torch.Tensor, point_fn: PointFn, num_points: int,
                     size: Sequence[int]) -> tuple[torch.Tensor, int]:
    """One adaptive subdivision step (docs/pointrend.md §7).

    Upsample (bi/trilinear, align_corners=False) to ``size``, take the min(N, #cells) most
    uncertain cells of the *current* map, evaluate ``point_fn`` at their centres and scatter the
    result into all K channels; the other cells keep their interpolated values.

    Args:
        logits: (N, K, *S) current logits.
        point_fn: coords (N, P, d) -> (N, K, P) point logits.
        num_points: N per sample.
        size: target spatial size.

    Returns:
        (N, K, *size) refined logits and the number of point evaluations per sample.
    """
    logits = resize(logits, size, mode="linear")
    idx, coords = get_uncertain_point_coords_on_grid(calculate_uncertainty(logits), num_points)
    point_logits = point_fn(coords).to(logits.dtype)
    n, k = logits.shape[:2]
    flat = logits.reshape(n, k, -1).scatter(2, idx.unsqueeze(1).expand(-1, k, -1), point_logits)
    return flat.view_as(logits), idx.shape[1]


def subdivision_inference(coarse_logits: torch.Tensor, point_fn: PointFn,
                          out_size: Sequence[int], num_points: int,
                          steps: int | None = None) -> tuple[torch.Tensor, int]:
    """Adaptive subdivision from the coarse logits to ``out_size``.

    Args:
        coarse_logits: (N, K, *S_c).
        point_fn: coords (N, P, d) -> (N, K, P); should sample the *original* coarse logits.
        out_size: output spatial size.
        num_points: points per step and sample.
        steps: None = auto (see ``subdivision_sizes``), else a fixed number of x2 steps followed
            by an exact resize.

    Returns:
        (N, K, *out_size) logits and the total number of point evaluations per sample
        (sum over steps of min(N, cells_t), property P10).
    """
    logits, evaluations = coarse_logits, 0
    for size in subdivision_sizes(coarse_logits.shape[2:], out_size, steps):
        logits, n = subdivision_step(logits, point_fn, num_points, size)
        evaluations += n
    return resize(logits, out_size, mode="linear"), evaluations


def dense_point_inference(point_fn: PointFn, batch: int, out_size: Sequence[int],
                          device: torch.device | str | None = None,
                          dtype: torch.dtype = torch.float32,
                          chunk: int = 65536) -> torch.Tensor:
    """Evaluate ``point_fn`` at every cell centre of ``out_size`` (the costly reference).

    Returns:
        (batch, K, *out_size) logits.
    """
    coords = generate_regular_grid_point_coords(batch, tuple(out_size), device=device, dtype=dtype)
    parts = [point_fn(coords[:, i:i + chunk]) for i in range(0, coords.shape[1], chunk)]
    out = torch.cat(parts, dim=2)
    return out.view(batch, out.shape[1], *out_size)



# --- regions (boxes) ----------------------------------------------------------------------------
# A box is (lo_x, lo_y[, lo_z], hi_x, hi_y[, hi_z]) in normalised input coordinates, x-first like
# the points.  Points inside a region are "box-normalised" (u in [0, 1]^d over the box) and map to
# input coordinates as lo + u (hi - lo) (docs/pointrend.md §5).  Every backbone level covers the same
# input extent, so the mapped coordinates address every level directly (detectron2 instead divides
# pixel coordinates by each level's size / scale: the same thing in our normalised convention).

def box_to_image_coords(coords: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Map box-normalised points to input-normalised points.

    Args:
        coords: (R, P, d) box-normalised, x-first.
        boxes: (R, 2d) normalised boxes, x-first (lo..., hi...).

    Returns:
        (R, P, d) input-normalised coordinates.
    """
    d = coords.shape[-1]
    lo, hi = boxes[:, None, :d].to(coords.dtype), boxes[:, None, d:].to(coords.dtype)
    return lo + coords * (hi - lo)


def point_sample_fine_grained_features(features_list: Sequence[torch.Tensor], boxes: torch.Tensor,
                                       batch_index: torch.Tensor,
                                       coords: torch.Tensor) -> torch.Tensor:
    """Sample every level at box-normalised points of each region, concatenated on channels.

    Args:
        features_list: maps (N, C_i, *S_i) covering the input.
        boxes: (R, 2d) normalised boxes, x-first.
        batch_index: (R,) image of each region.
        coords: (R, P, d) box-normalised points.

    Returns:
        (R, sum C_i, P).
    """
    r, p, _ = coords.shape
    image_coords = box_to_image_coords(coords, boxes)
    channels = sum(f.shape[1] for f in features_list)
    ref = features_list[0]
    out = ref.new_zeros(r, channels, p)
    for n in torch.unique(batch_index).tolist():
        sel = (batch_index == n).nonzero()[:, 0]
        pts = image_coords[sel].reshape(1, -1, image_coords.shape[-1])  # all points of image n
        sampled = torch.cat([point_sample(f[n:n + 1], pts) for f in features_list], dim=1)
        out[sel] = sampled.view(channels, len(sel), p).transpose(0, 1)
    return out


def whole_input_boxes(n: int, d: int, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """One region per image covering the whole input: boxes (n, 2d), batch_index (n,)."""
    box = torch.tensor([0.0] * d + [1.0] * d, device=device, dtype=dtype)
    return box.expand(n, -1).clone(), torch.arange(n, device=device)


def boxes_from_labels(labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX,
                      jitter: float = 0.0, generator: torch.Generator | None = None,
                      min_cells: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Regions from the connected components of every foreground class (face connectivity).

    At training time pass the ground truth and a ``jitter`` (each side moves by up to
    ``jitter`` times the box extent, then clipped to [0, 1]); at inference pass the argmax of a
    first coarse pass.  The labels are moved to the CPU for scipy.

    Args:
        labels: (N, *S) integer label map.
        num_classes: K; classes 1..K-1 are foreground.
        ignore_index: ignored label (never a region).
        jitter: relative box jitter.
        generator: RNG for the jitter.
        min_cells: components smaller than this are dropped.

    Returns:
        boxes (R, 2d) float32 normalised x-first, batch_index (R,) int64, classes (R,) int64.
    """
    from scipy import ndimage

    lab = labels.detach().cpu().numpy()
    size = labels.shape[1:]
    rows, batch, classes = [], [], []
    for n in range(lab.shape[0]):
        for k in range(1, num_classes):
            comp, count = ndimage.label(lab[n] == k)
            for i, sl in enumerate(ndimage.find_objects(comp), start=1):
                if (comp[sl] == i).sum() < min_cells:
                    continue
                lo = [s.start / length for s, length in zip(sl, size)][::-1]  # x-first
                hi = [s.stop / length for s, length in zip(sl, size)][::-1]
                rows.append(lo + hi)
                batch.append(n)
                classes.append(k)
    d = len(size)
    boxes = torch.tensor(rows, dtype=torch.float32).view(-1, 2 * d)
    if jitter > 0 and len(rows):
        extent = (boxes[:, d:] - boxes[:, :d]).repeat(1, 2)
        noise = torch.rand(boxes.shape, generator=generator) * 2 - 1
        boxes = (boxes + jitter * extent * noise).clamp(0, 1)
        boxes[:, d:] = torch.maximum(boxes[:, d:], boxes[:, :d] + 1e-3).clamp(max=1)
    return (boxes.to(labels.device), torch.tensor(batch, dtype=torch.long, device=labels.device),
            torch.tensor(classes, dtype=torch.long, device=labels.device))
