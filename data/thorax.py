"""Synthetic bright-blood cardiac MRI: a large field of view in which the target, the left atrium, is a
small part of the scan and its look-alikes (the other chambers and the great vessels, the same blood
intensity, several joined to it) lie around it.

Built to reproduce a failure seen on a real left-atrium task: a model that sees too little context, or
too few patches away from the target, labels the other blood pools as atrium.  Every subject is drawn
from one seeded generator, so the data set is reproducible bit for bit::

    from data.thorax import make_subject
    s = make_subject(seed=7)          # s.image (X, Y, Z) uint8, s.label (0/1), s.anatomy (structure ids)

Anatomy (x towards the patient's left, y posterior, z superior: ITK's identity direction, LPS), in mm
around the heart, each subject with its own pose, size, shape and intensities:

* the **left atrium** (target, label 1): a flattened ellipsoid behind the other chambers, its appendage,
  and the first ``STUB_MM`` of the four pulmonary veins (cut square to each vein, as manual labels are);
* look-alikes of the same intensity: left ventricle (joined to the atrium through the mitral valve),
  right atrium and ventricle, ascending aorta and arch, descending aorta (just behind the atrium),
  pulmonary trunk and arteries (the right one runs over the atrium's roof), the venae cavae, the rest
  of the pulmonary veins, and bright fat;
* context: myocardium, mediastinal soft tissue, lungs, spine, oesophagus, chest wall.

Only position and shape tell the atrium from the right atrium (both atria with veins entering them)
and its veins from the pulmonary arteries.  ``anatomy`` stores one id per structure (``STRUCTURES``)
so a benchmark can count false positives inside each look-alike.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import ndimage

#: structure ids of the anatomy map (0: outside the body)
STRUCTURES = {
    "body": 1, "fat": 2, "lung": 3, "bone": 4, "myocardium": 5, "oesophagus": 6,
    "left_atrium": 10, "pulmonary_veins": 11, "left_ventricle": 12, "right_atrium": 13,
    "right_ventricle": 14, "aorta_ascending": 15, "aorta_descending": 16, "pulmonary_artery": 17,
    "venae_cavae": 18,
}
#: the blood pools (and fat) that share the atrium's intensity: where a false positive counts
LOOKALIKES = ("pulmonary_veins", "left_ventricle", "right_atrium", "right_ventricle", "aorta_ascending",
              "aorta_descending", "pulmonary_artery", "venae_cavae")
#: length of each pulmonary vein labelled as atrium, from where it leaves the atrium (mm)
STUB_MM = 10.0
#: mean tissue intensities relative to blood (bright-blood MRI)
TISSUE = {"blood": 1.0, "fat": 0.8, "body": 0.34, "myocardium": 0.24, "lung": 0.05, "bone": 0.46,
          "cortex": 0.1, "oesophagus": 0.3}


@dataclasses.dataclass
class Subject:
    """One synthetic subject: arrays in (X, Y, Z) order, ``spacing`` in mm, ``origin`` of voxel 0."""

    image: np.ndarray      # uint8 intensities
    label: np.ndarray      # uint8: 1 left atrium, 0 the rest
    anatomy: np.ndarray    # uint8 structure ids (STRUCTURES)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]


# ----------------------------------------------------------------------------- primitives
def _unit(v: Sequence[float]) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _frame(axis: Sequence[float]) -> np.ndarray:
    """A rotation matrix whose first column is ``axis`` (the other two any orthonormal pair)."""
    a = _unit(axis)
    helper = np.array([0.0, 0.0, 1.0]) if abs(a[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    b = _unit(np.cross(a, helper))
    return np.stack([a, b, np.cross(a, b)], axis=1)


def _rotation(rng: np.random.Generator, degrees: float) -> np.ndarray:
    """A random rotation of up to ``degrees`` about each world axis."""
    out = np.eye(3)
    for axis in range(3):
        t = math.radians(rng.uniform(-degrees, degrees))
        c, s = math.cos(t), math.sin(t)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = out @ r
    return out


class Space:
    """World coordinates (mm, heart frame) of every voxel, and shape tests on them."""

    def __init__(self, shape: Sequence[int], spacing: float, origin: np.ndarray, centre: np.ndarray,
                 rotation: np.ndarray, scale: float) -> None:
        axes = [origin[a] + spacing * np.arange(shape[a], dtype=np.float32) for a in range(3)]
        world = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1) - centre.astype(np.float32)
        # heart frame: undo the subject's rotation and scale
        self.p = (world @ rotation.astype(np.float32)) / np.float32(scale)
        self.shape = tuple(int(s) for s in shape)

    def ellipsoid(self, centre: Sequence[float], radii: Sequence[float], axis: Sequence[float] = (1, 0, 0),
                  grow: float = 0.0) -> np.ndarray:
        """Inside the ellipsoid (its first radius along ``axis``), radii grown by ``grow`` mm."""
        q = (self.p - np.asarray(centre, np.float32)) @ _frame(axis).astype(np.float32)
        r = np.asarray(radii, np.float32) + np.float32(grow)
        return np.einsum("...i,...i->...", q / r, q / r) <= 1.0

    def tube(self, points: Sequence[Sequence[float]], radius: float, grow: float = 0.0) -> np.ndarray:
        """Inside the tube of ``radius`` (+ ``grow``) mm around the polyline ``points``."""
        out = np.zeros(self.shape, bool)
        for a, b in zip(points[:-1], points[1:]):
            out |= self.segment_distance(a, b) <= radius + grow
        return out

    def segment_distance(self, a: Sequence[float], b: Sequence[float]) -> np.ndarray:
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        d = b - a
        t = np.clip(((self.p - a) @ d) / float(d @ d), 0.0, 1.0)
        return np.linalg.norm(self.p - a - t[..., None] * d, axis=-1)

    def along(self, a: Sequence[float], direction: Sequence[float]) -> np.ndarray:
        """Signed distance (mm, heart frame) of every voxel along ``direction`` from point ``a``."""
        return (self.p - np.asarray(a, np.float32)) @ _unit(direction).astype(np.float32)

    def cylinder_z(self, x: float, y: float, radius: float) -> np.ndarray:
        return (self.p[..., 0] - x) ** 2 + (self.p[..., 1] - y) ** 2 <= radius ** 2


# ----------------------------------------------------------------------------- anatomy
def _jitter(rng: np.random.Generator, v: Sequence[float], mm: float) -> list[float]:
    return [float(x) + rng.uniform(-mm, mm) for x in v]


def _radii(rng: np.random.Generator, v: Sequence[float], share: float = 0.15) -> list[float]:
    return [float(x) * rng.uniform(1 - share, 1 + share) for x in v]


def _exit_distance(centre: Sequence[float], radii: Sequence[float], start: Sequence[float],
                   direction: Sequence[float]) -> float:
    """Distance along ``direction`` from ``start`` to where the line leaves the (axis-aligned)
    ellipsoid (0 when ``start`` is already outside)."""
    c, r, s, u = (np.asarray(x, float) for x in (centre, radii, start, direction))
    u = _unit(u)
    a = np.sum((u / r) ** 2)
    b = 2 * np.sum((s - c) * u / r ** 2)
    cc = np.sum(((s - c) / r) ** 2) - 1
    disc = b * b - 4 * a * cc
    return max(0.0, (-b + math.sqrt(max(disc, 0.0))) / (2 * a))


def _anatomy(space: Space, rng: np.random.Generator) -> np.ndarray:
    """The structure-id map of one subject (``STRUCTURES``); the helpers draw from ``rng`` in order."""
    ids = np.full(space.shape, STRUCTURES["body"], np.uint8)
    _context(space, rng, ids)
    heart = _heart(space, rng, ids)
    vessels = _great_vessels(rng, heart["la"])
    _blood(space, rng, ids, heart, vessels)
    _target(space, rng, ids, heart["la"])
    return ids


def _context(space: Space, rng: np.random.Generator, ids: np.ndarray) -> None:
    """Chest wall fat, lungs, spine and oesophagus."""
    S, p = STRUCTURES, space.p
    ids[p[..., 1] < rng.uniform(-66, -58)] = S["fat"]
    lung_y = rng.uniform(14, 22)
    for side in (-1, 1):
        ids[space.ellipsoid([side * rng.uniform(64, 72), lung_y, 0], _radii(rng, [50, 62, 95], 0.1))] = S["lung"]
    spine = _jitter(rng, [0, 70], 3)
    ids[space.cylinder_z(spine[0], spine[1], rng.uniform(14, 18))] = S["bone"]
    ids[space.cylinder_z(*_jitter(rng, [-4, 46], 2), rng.uniform(5, 7))] = S["oesophagus"]


def _heart(space: Space, rng: np.random.Generator, ids: np.ndarray) -> dict[str, tuple]:
    """The chambers' walls (myocardium) and the epicardial fat; returns each chamber's
    (centre, radii, axis)."""
    S = STRUCTURES
    la = (_jitter(rng, [2, 22, 8], 3), _radii(rng, [24, 13, 15]), (1, 0, 0))
    lv_c, lv_ax, lv_r = _jitter(rng, [20, -12, -12], 3), _jitter(rng, [1, -0.9, -0.6], 0.2), _radii(rng, [30, 18, 18])
    rv_c, rv_ax, rv_r = _jitter(rng, [-6, -31, -14], 3), _jitter(rng, [1, -0.2, -0.3], 0.2), _radii(rng, [30, 10, 18])
    ra = (_jitter(rng, [-32, 0, 0], 3), _radii(rng, [17, 16, 20]), (1, 0, 0))
    lv, rv = (lv_c, lv_r, lv_ax), (rv_c, rv_r, rv_ax)
    walls = (space.ellipsoid(*lv, grow=rng.uniform(8, 11))
             | space.ellipsoid(*rv, grow=rng.uniform(3, 5))
             | space.ellipsoid(*ra, grow=rng.uniform(2.5, 3.5))
             | space.ellipsoid(*la, grow=rng.uniform(2.5, 3.5)))
    # epicardial fat: a patchy shell around the heart (as bright as blood in many MR sequences)
    shell = space.ellipsoid(*lv, grow=16) | space.ellipsoid(*rv, grow=9)
    patches = ndimage.gaussian_filter(rng.standard_normal(space.shape).astype(np.float32), 4) > 0.02
    ids[shell & ~walls & patches & (ids == S["body"])] = S["fat"]
    ids[walls] = S["myocardium"]
    return {"la": la, "lv": lv, "rv": rv, "ra": ra}


def _great_vessels(rng: np.random.Generator, la: tuple) -> list[tuple[list, float, str]]:
    """Centre lines, radii and structure names of the great vessels (look-alikes); the right
    pulmonary artery passes over the atrium's roof."""
    la_c, la_r, _ = la
    up = rng.uniform(-4, 4)
    aorta_desc = [[24 + up, 50, 60], [24 + up, 50, -70]]
    aorta_asc = [[8, -12, 2], [4, -8, 30], [10, 10, 46 + up], [24 + up, 44, 42], [24 + up, 50, 30]]
    pa = _jitter(rng, [6, -10, 34], 3)
    pulm_trunk = [[-2, -34, 2], [6, -24, 26], pa]
    lpa = [pa, _jitter(rng, [48, 8, 34], 4), _jitter(rng, [70, 20, 30], 6)]
    rpa = [pa, _jitter(rng, [-10, 14, la_c[2] + la_r[2] + 9], 2), _jitter(rng, [-46, 8, 32], 4),
           _jitter(rng, [-70, 18, 28], 6)]
    svc = [[-30, 4, 70], _jitter(rng, [-32, 2, 14], 2)]
    ivc = [[-24, 12, -70], _jitter(rng, [-30, 4, -14], 2)]
    return [(aorta_desc, rng.uniform(9.5, 12), "aorta_descending"),
            (aorta_asc, rng.uniform(11, 14), "aorta_ascending"),
            (pulm_trunk, rng.uniform(11, 14), "pulmonary_artery"),
            (lpa, rng.uniform(8, 10), "pulmonary_artery"), (rpa, rng.uniform(8, 10), "pulmonary_artery"),
            (svc, rng.uniform(8, 10), "venae_cavae"), (ivc, rng.uniform(10, 13), "venae_cavae")]


def _blood(space: Space, rng: np.random.Generator, ids: np.ndarray, heart: dict[str, tuple],
           vessels: list[tuple[list, float, str]]) -> None:
    """Vessel walls, then the blood of the chambers, the valves joining them, and the vessels."""
    S = STRUCTURES
    for points, radius, _ in vessels:
        ids[space.tube(points, radius, grow=1.5)] = S["myocardium"]
    (la_c, _, _), (lv_c, *_), (rv_c, *_), (ra_c, *_) = heart["la"], heart["lv"], heart["rv"], heart["ra"]
    ids[space.ellipsoid(*heart["lv"])] = S["left_ventricle"]
    ids[space.tube([la_c, lv_c], rng.uniform(9, 12))] = S["left_ventricle"]     # mitral inflow
    ids[space.ellipsoid(*heart["rv"])] = S["right_ventricle"]
    ids[space.tube([ra_c, rv_c], rng.uniform(9, 12))] = S["right_ventricle"]    # tricuspid inflow
    ids[space.ellipsoid(*heart["ra"])] = S["right_atrium"]
    for points, radius, name in vessels:
        ids[space.tube(points, radius)] = S[name]


def _target(space: Space, rng: np.random.Generator, ids: np.ndarray, la: tuple) -> None:
    """The left atrium with its appendage and the first ``STUB_MM`` of its pulmonary veins (the
    rest of each vein is a look-alike)."""
    S, (la_c, la_r, _) = STRUCTURES, la
    blood = [S[n] for n in LOOKALIKES]
    atrium = space.ellipsoid(la_c, la_r)
    laa_c = [la_c[0] + la_r[0] * 0.85, la_c[1] - la_r[1] * 1.0, la_c[2] + la_r[2] * 0.6]
    atrium |= space.ellipsoid(laa_c, _radii(rng, [12, 5.5, 5.5]), _jitter(rng, [1, -1, 0.4], 0.3))
    for side in (-1, 1):
        for up_down in (-1, 1):
            start = [la_c[0] + side * la_r[0] * 0.7, la_c[1] + la_r[1] * 0.4, la_c[2] + up_down * la_r[2] * 0.5]
            direction = _unit(_jitter(rng, [side, 0.65, 0.35 * up_down], 0.2))
            end = np.asarray(start) + direction * rng.uniform(38, 50)
            vein = space.tube([start, end], rng.uniform(4.5, 6.5))
            ids[vein & ~np.isin(ids, blood)] = S["pulmonary_veins"]
            stub = _exit_distance(la_c, la_r, start, direction) + STUB_MM
            atrium |= vein & (space.along(start, direction) <= stub)
    ids[atrium] = S["left_atrium"]


def _intensity(ids: np.ndarray, rng: np.random.Generator, spacing: float) -> np.ndarray:
    """An MR-like image of the anatomy: tissue means with texture, partial volume, bias, noise."""
    S = STRUCTURES
    blood = {S[n] for n in ("left_atrium", *LOOKALIKES)}
    level = np.zeros(ids.shape, np.float32)
    for name, value in TISSUE.items():
        if name == "blood":
            for i in blood:
                level[ids == i] = value
        elif name in S:
            level[ids == S[name]] = value * rng.uniform(0.9, 1.1)
    level[ids == S["lung"]] = TISSUE["lung"]
    texture = ndimage.gaussian_filter(rng.standard_normal(ids.shape).astype(np.float32), 2.0 / spacing)
    level *= 1 + 0.6 * texture                                             # tissue texture
    level = ndimage.gaussian_filter(level, 0.6 / spacing)                  # partial volume
    bias = _smooth_field(ids.shape, rng, 0.25)                             # coil sensitivity
    noise = rng.normal(0, rng.uniform(0.015, 0.025), (2,) + ids.shape).astype(np.float32)
    magnitude = np.sqrt((level * bias + noise[0]) ** 2 + noise[1] ** 2)   # Rician
    gain = rng.uniform(70, 90)
    return np.clip(np.rint(magnitude * gain), 0, 255).astype(np.uint8)


def _smooth_field(shape: Sequence[int], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """A smooth multiplicative field (1 +- ``amplitude``), a random linear + quadratic polynomial."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    field = sum(rng.uniform(-1, 1) * g for g in grids) + sum(rng.uniform(-0.5, 0.5) * g * g for g in grids)
    field = field / max(float(np.abs(field).max()), 1e-6)
    return (1 + amplitude * field).astype(np.float32)


def make_subject(seed: int, spacing: float = 0.8, fov_mm: Sequence[float] = (104.0, 88.0, 64.0),
                 fov_jitter: float = 0.08) -> Subject:
    """One subject drawn from ``seed``: a view of about ``fov_mm`` around the left atrium.

    Args:
        seed: the subject's seed (the same seed gives the same subject, bit for bit).
        spacing: isotropic voxel size (mm).
        fov_mm: mean field of view (x, y, z) in mm; each subject's varies by up to ``fov_jitter``; its
            centre lies within 8 mm of the atrium's (the view is a crop around the heart's atria).
    """
    rng = np.random.default_rng(seed)
    fov = np.array([f * rng.uniform(1 - fov_jitter, 1 + fov_jitter) for f in fov_mm])
    shape = tuple(int(round(f / spacing)) for f in fov)
    rotation, scale = _rotation(rng, 12), rng.uniform(0.85, 1.15)
    # the heart's centre in the view (world origin = the view's centre): the atrium near the middle
    atrium = np.array([2.0, 22.0, 8.0])
    centre = -rotation @ (scale * atrium) + np.array([rng.uniform(-8, 8) for _ in range(3)])
    origin = -fov / 2
    space = Space(shape, spacing, origin, centre, rotation, scale)
    ids = _anatomy(space, rng)
    image = _intensity(ids, rng, spacing)
    label = (ids == STRUCTURES["left_atrium"]).astype(np.uint8)
    return Subject(image, label, ids, (spacing,) * 3, tuple(float(o) for o in origin))
