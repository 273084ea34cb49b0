"""The fingerprint and the plan (seg/plan.py): each rule on small synthetic facts, then the plan of
each real data set we ship (MNI slabs, hippocampus, pyradiomics MR and CT) and of a synthetic
skull-on head, end to end through ``train_seg.py --plan-only``."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hparam import Config
from seg import plan as P
from seg.config import apply_overrides
from seg.preprocess import Preprocessing, normalize

from benchmarks.skull_on import skull_on_heads

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"
CONVNEXT = [(4,) * 3, (8,) * 3, (16,) * 3, (32,) * 3]  # convnext_atto's levels in 3D


# ----------------------------------------------------------------------------- rules
def test_orientation_code() -> None:
    assert P.orientation_code([-1, 0, 0, 0, -1, 0, 0, 0, 1]) == "RAS"  # NIfTI identity affine
    assert P.orientation_code([1, 0, 0, 0, 1, 0, 0, 0, 1]) == "LPS"    # DICOM / ITK identity
    assert P.orientation_code([0, 0, 1, 1, 0, 0, 0, -1, 0]) == "PIL"  # a sagittal acquisition
    assert P.orientation_code([1, 0, 0, 1]) == "LP"


def test_nonzero_crop_ratio_closed_form() -> None:
    image = np.zeros((1, 10, 20, 8))
    image[0, 2:7, 5:15, 0:4] = 3.0  # box 5 x 10 x 4 of a 10 x 20 x 8 volume
    image[0, 3, 7, 2] = 0.0         # a hole inside the box changes nothing
    assert P.nonzero_crop_ratio(image) == pytest.approx(200 / 1600)
    assert P.nonzero_crop_ratio(np.zeros((1, 4, 4))) == 1.0


def test_target_spacing_median_and_anisotropic_rule() -> None:
    iso = [[1.0, 1.0, 1.0], [0.9, 1.1, 1.2], [1.1, 0.9, 0.8]]
    assert P.plan_target_spacing(iso, [[50, 50, 50]] * 3) == pytest.approx((1.0, 1.0, 1.0))
    # anisotropic spacing AND few slices: the thick axis takes its 10th percentile, not the median
    thick = [[0.8, 0.8, s] for s in (3.0, 5.0, 5.0, 6.0, 6.5)]
    sizes = [[256, 256, 24]] * 5
    target = P.plan_target_spacing(thick, sizes)
    assert target[:2] == pytest.approx((0.8, 0.8))
    assert target[2] == pytest.approx(np.percentile([3, 5, 5, 6, 6.5], 10)) and target[2] < 5.0
    # anisotropic spacing but as many voxels on the thick axis as in-plane: the median stays
    assert P.plan_target_spacing(thick, [[64, 64, 400]] * 5)[2] == pytest.approx(5.0)


def test_patch_fits_the_median_case_rounded_to_strides() -> None:
    # hippocampus-like: 35 x 50 x 36 -> multiples of 8 (16 or 32 would pad > 25 %): nnU-Net's patch
    assert P.plan_patch_size((35, 50, 36), (1, 1, 1), CONVNEXT, 131_072) == (40, 56, 40)
    # a large brain slab: shrunk to the budget, every shrunk axis a multiple of the total stride
    patch = P.plan_patch_size((149, 185, 32), (1, 1, 1), CONVNEXT, 131_072)
    assert patch == (64, 64, 32)


def test_patch_short_z_keeps_in_plane_large() -> None:
    patch = P.plan_patch_size((256, 256, 20), (0.8, 0.8, 5.0), CONVNEXT, 131_072)
    assert patch[2] == 24  # the 20 thick slices stay whole (rounded up to the 8-voxel level)
    assert np.prod(patch) <= 131_072 and patch[0] % 16 == 0 and patch[1] % 16 == 0
    assert patch[0] * patch[1] > 64 * 64  # in-plane takes the budget z leaves: larger than 64 x 64
    assert patch == (80, 64, 24)


def test_class_thickness_closed_forms() -> None:
    slab = np.zeros((40, 40, 40), int)
    slab[:, :, 10:14] = 1  # 4 thick; the array's edges count as surface too
    assert P.class_thickness(slab, (1, 1, 1))["1"] == pytest.approx(2 * 6400 / (2 * 1600 + 4 * 160))
    assert P.class_thickness(slab, (0.5, 0.5, 2.0))["1"] == pytest.approx(
        2 * 6400 * 0.5 / (2 * 1600 * 0.25 + 4 * 160 * 1.0))
    z, y, x = np.mgrid[:80, :80, :80]
    ball = ((z - 40) ** 2 + (y - 40) ** 2 + (x - 40) ** 2 < 30 ** 2).astype(int)
    t = P.class_thickness(ball, (1, 1, 1))["1"]
    assert 60 / 3 / 1.5 * 0.95 < t < 60 / 3  # d/3 on the true surface; faces overcount it (<= 1.5x)


def test_context_spacing_rule() -> None:
    # a case the patch covers: the spacing stays
    assert P.plan_context_spacing((1, 1, 1), (35, 50, 36), CONVNEXT, 131_072) == ((1.0, 1.0, 1.0), (40, 56, 40))
    # a large field of view (the left-atrium task: 191x143x88 at 0.625 mm): the patch saw 5.5 %
    spacing, patch = P.plan_context_spacing((0.625,) * 3, (191, 143, 88), CONVNEXT, 131_072)
    fine = 191 * 143 * 88
    assert math.prod(patch) < P.CONTEXT_SHARE * fine  # the reason for the rule
    coarse = fine * (0.625 / spacing[0]) ** 3
    assert math.prod(patch) >= P.CONTEXT_SHARE * coarse                       # now >= 25 %
    assert math.prod(patch) < P.CONTEXT_SHARE * coarse * P.CONTEXT_STEP ** 3  # the first spacing that does
    assert spacing[0] == spacing[1] == spacing[2] and math.prod(patch) <= 131_072
    # thick slices: the thin in-plane axes grow first, the thick axis stays while it is > 2x them
    spacing, patch = P.plan_context_spacing((0.627, 0.627, 5.0), (512, 512, 61), CONVNEXT, 131_072)
    assert spacing[2] == 5.0 and 1.2 < spacing[0] == spacing[1] <= 2.5
    # thin classes bound it: the thinnest stays MIN_THICKNESS_VOXELS thick
    bounded, _ = P.plan_context_spacing((0.625,) * 3, (191, 143, 88), CONVNEXT, 131_072, None, 4.0)
    assert bounded[0] <= 4.0 / P.MIN_THICKNESS_VOXELS < bounded[0] * P.CONTEXT_STEP
    assert P.plan_context_spacing((0.625,) * 3, (191, 143, 88), CONVNEXT, 131_072, None, 2.4)[0] == (0.625,) * 3
    # a patch fixed by the user counts as it is; the growth is bounded
    spacing, patch = P.plan_context_spacing((1, 1, 1), (1000, 1000, 1000), CONVNEXT, 131_072, (32, 32, 32))
    assert patch == (32, 32, 32) and max(spacing) <= P.CONTEXT_MAX_FACTOR


def _padded_case(median, levels=(4, 8, 16, 32)) -> tuple[int, ...]:
    """The 25 % padding rule written out: each axis rounded up to a multiple of the largest stride
    level that pads it by at most 25 %, of the finest level when none does."""
    out = []
    for m in median:
        fits = [s for s in levels if math.ceil(m / s) * s <= m * 1.25]
        step = max(fits) if fits else min(levels)
        out.append(math.ceil(m / step) * step)
    return tuple(out)


@pytest.mark.parametrize("median, whole, shrunk", [
    # 7 -> 8 (+14 %); 9: 12 pads 33 %, no level pads <= 25 %: the finest; 5 -> 8 likewise
    ((7, 9, 5), (8, 12, 8), {32_768: (8, 12, 8), 131_072: (8, 12, 8)}),
    # 300 -> 320 (32: +7 %); 40 -> 48 (16: +20 %; 32 would give 64, +60 %); 41 -> 48
    ((300, 40, 41), (320, 48, 48), {32_768: (32, 32, 32), 131_072: (48, 48, 48)}),
    ((61, 61, 61), (64, 64, 64), {32_768: (32, 32, 32), 131_072: (32, 64, 64)}),
    ((35, 50, 36), (40, 56, 40), {32_768: (32, 32, 32), 131_072: (40, 56, 40)}),
    ((500, 500, 500), (512, 512, 512), {32_768: (32, 32, 32), 131_072: (32, 64, 64)}),
])
def test_patch_pads_the_median_case_by_at_most_25_percent(median, whole, shrunk) -> None:
    assert _padded_case(median) == whole
    assert P.plan_patch_size(median, (1, 1, 1), CONVNEXT, 10 ** 9) == whole  # no budget: the case, padded
    for budget, patch in shrunk.items():  # over the budget: shrunk to multiples of the total stride 32,
        assert P.plan_patch_size(median, (1, 1, 1), CONVNEXT, budget) == patch  # half of it grown back
        assert math.prod(patch) <= budget


def _channel(lo: float, integer: bool) -> dict:
    return {"min": lo, "max": 2000.0, "integer": integer}


def test_normalization_rule() -> None:
    assert P.plan_normalization(_channel(-1024, True), 1.0) == "ct"          # HU
    assert P.plan_normalization(_channel(-3.2, False), 1.0) == "zscore"      # processed MR
    assert P.plan_normalization(_channel(-800.0, False), 1.0) == "zscore"    # float, not HU
    assert P.plan_normalization(_channel(0, True), 0.5) == "zscore_nonzero"  # stripped brain in a box
    # nnU-Net masks when the median relative size after cropping is < 3/4: removing exactly 25 % is not enough
    assert P.plan_normalization(_channel(0, True), 0.75) == "zscore"
    assert P.plan_normalization(_channel(0, True), 0.7499) == "zscore_nonzero"
    assert P.plan_normalization(_channel(0, True), 0.76) == "zscore"         # head filling the view


def test_slice_axis_rule() -> None:
    ras = [-1, 0, 0, 0, -1, 0, 0, 0, 1]
    assert P.plan_slice_axis((0.8, 0.8, 5.0), ras) == 2
    assert P.plan_slice_axis((4.0, 0.9, 0.9), ras) == 0  # thick axis first
    # isotropic: the array axis along inferior-superior; sagittal storage puts it on axis 1
    assert P.plan_slice_axis((1.0, 1.0, 1.0), ras) == 2
    assert P.plan_slice_axis((1.0, 1.0, 1.0), [0, 0, 1, 1, 0, 0, 0, -1, 0]) == 1


def test_mirror_rotation_and_point_rules() -> None:
    assert P.plan_mirror_axes(3) == (0, 1, 2) and P.plan_mirror_axes(2) == (0, 1)
    assert P.plan_rotation_axes((1, 1, 1.2)) == (0, 1, 2)
    assert P.plan_rotation_axes((0.78, 0.78, 6.5)) == (2,)
    assert P.plan_rotation_axes((5.0, 0.7, 0.7)) == (0,)
    assert P.plan_train_points((64, 64, 32)) == 4096            # the measured 3D default
    assert P.plan_subdivision_points((64, 64, 32), 4096) == 6144
    assert P.plan_train_points((40, 56)) == 256                 # the floor
    assert P.plan_subdivision_points((40, 56), 256) == 576


def test_batch_size_rule() -> None:
    # budget // patch, at least 2, at most 5 % of the training voxels per step
    assert P.plan_batch_size((40, 56, 40), 131_072, 1e7) == 2    # 1 fits: the minimum
    assert P.plan_batch_size((64, 64, 32), 131_072, 1e9) == 2    # the budget-sized patch
    assert P.plan_batch_size((40, 56), 32_768, 1e7) == 14        # 32,768 // 2,240
    assert P.plan_batch_size((40, 56), 32_768, 20 * 2240) == 2   # a tiny set: 5 % caps it (0 -> 2)
    assert P.plan_batch_size((40, 56), 32_768, 200 * 2240) == 10
    for patch in [(40, 56), (160, 192), (17, 300)]:
        b = P.plan_batch_size(patch, 32_768, 1e9)
        assert b >= 2 and (b == 2 or b * math.prod(patch) <= 32_768)


def test_ct_normalization_uses_training_statistics() -> None:
    stats = ({"mean": 40.0, "std": 100.0, "clip_low": -200.0, "clip_high": 300.0},)
    pp = Preprocessing("ct", intensity_stats=stats)
    x = np.array([[-1000.0, -200.0, 40.0, 140.0, 3000.0]])
    np.testing.assert_allclose(normalize(x, pp), [[-2.4, -2.4, 0.0, 1.0, 2.6]], rtol=1e-6)
    with pytest.raises(ValueError, match="statistics"):
        Preprocessing("ct").validate()
    # format-1 checkpoints: 'ct' was the fixed window, zscore_nonzero a flag
    assert Preprocessing.from_dict({"normalization": "ct", "zscore_nonzero": False}).normalization == "window"
    assert Preprocessing.from_dict({"normalization": "zscore", "zscore_nonzero": True}
                                   ).normalization == "zscore_nonzero"


def _simulated_gpu(monkeypatch, total_bytes: dict[str, int]) -> None:
    """CUDA devices report ``total_bytes["now"]`` of memory (``seg.plan.device_memory``); others none."""
    import torch
    monkeypatch.setattr(P, "device_memory", lambda device: ("Simulated GPU", total_bytes["now"])
                        if torch.device(device).type == "cuda" else None)


def test_patch_budget_follows_the_device(monkeypatch) -> None:
    """CPU (and devices whose memory is not planned): PATCH_BUDGET exactly.  CUDA: the rule, written
    out here from its constants; more memory never gives less; floor PATCH_BUDGET, cap 128 x it."""
    for dims in (2, 3):
        assert P.plan_patch_budget(dims, "cpu")[0] == P.PATCH_BUDGET[dims] == P.plan_patch_budget(dims, "mps")[0]
    memory = {"now": 0}
    _simulated_gpu(monkeypatch, memory)
    for dims in (2, 3):
        base, step = P.PATCH_BUDGET[dims], P.PATCH_BUDGET[dims] // 4
        budgets = []
        for gib in (1, 4, 6, 8, 12, 16, 24, 80, 141):
            memory["now"] = gib * 2 ** 30
            budget, why = P.plan_patch_budget(dims, "cuda:1")
            assert why.startswith(f"cuda:1 Simulated GPU, {gib:.1f} GiB: (80% x {gib:.1f} GiB - 2 GiB)"), why
            free = 0.8 * gib * 2 ** 30 - 2 * 2 ** 30
            rule = int(free / (2 * P.STEP_BYTES_PER_VOXEL[dims])) // step * step
            assert budget == min(max(rule, base), 128 * base) and budget % step == 0
            per_voxel = P.STEP_BYTES_PER_VOXEL[dims]
            if base < budget < 128 * base:  # a step of 2 budget-sized patches fits in 80 % less 2 GiB
                assert 2 * budget * per_voxel <= free < 2 * (budget + step) * per_voxel
            budgets.append(budget)
        assert budgets == sorted(budgets) and budgets[0] == base and budgets[-1] == 128 * base
        assert len(set(budgets)) > 3  # the rule, not only its bounds, decides on common cards
    assert P.cuda_patch_budget(3, 8 * 2 ** 30) > 30 * P.PATCH_BUDGET[3]  # 8 GiB: ~4.6 M voxels (166^3)
    from seg.errors import ConfigError
    for bad in (0, True, "'big'"):
        with pytest.raises(ConfigError, match="patch_voxel_budget must be 'auto' or a number of voxels"):
            apply_overrides(Config(), [f"data.patch_voxel_budget={bad}"]).validate()


def test_a_plan_for_a_gpu_names_it_and_its_model_infers_on_a_cpu(tmp_path, monkeypatch) -> None:
    """Planned for a simulated 24 GiB CUDA device, the plan records the device and the rule's budget
    (a whole-case patch where the CPU's budget shrinks it), an explicit budget still wins, and a
    model built from that plan and saved as a checkpoint segments a case on the CPU."""
    import torch
    from helpers import tiny_sets, write_case
    from seg import distributed as distr
    from seg.checkpoint import checkpoint_state, load_for_inference, save_checkpoint
    from seg.predict import Predictor
    from seg.train import build_training, describe, find_data, plan_run

    rng = np.random.default_rng(0)
    for i in range(4):  # 80 x 72 x 40 voxels (X, Y, Z): 230,400, over the CPU budget
        write_case(tmp_path / "ds", f"case{i}", rng, shape=(40, 72, 80), spacing=(1.0, 1.0, 1.0))
    memory = {"now": 24 * 2 ** 30}
    _simulated_gpu(monkeypatch, memory)
    auto = ["data.patch_size='auto'", "train.batch_size='auto'", "model.pointrend.train_num_points='auto'",
            "model.pointrend.subdivision_num_points='auto'"]

    def plan_for(device: str, *sets: str):
        out = tmp_path / device.replace(":", "")
        cfg, described = describe(apply_overrides(Config(), tiny_sets(tmp_path / "ds", out, 3) + auto
                                                  + list(sets)).validate())
        out.mkdir(exist_ok=True)
        ctx = distr.DistContext(device=torch.device(device))
        spec = plan_run(cfg, find_data(cfg)[0], out, ctx, progress=False, described=described)
        record = json.loads((out / "plan.json").read_text())
        return spec, {d["field"]: d for d in record["decisions"]}

    cpu = plan_for("cpu")[1]
    gpu_spec, gpu = plan_for("cuda:0")
    assert cpu["data.patch_voxel_budget"]["value"] == P.PATCH_BUDGET[3]
    assert math.prod(cpu["data.patch_size"]["value"]) <= P.PATCH_BUDGET[3]
    budget = gpu["data.patch_voxel_budget"]
    assert budget["source"] == "auto" and budget["value"] == P.cuda_patch_budget(3, 24 * 2 ** 30) > P.PATCH_BUDGET[3]
    assert budget["why"].startswith("cuda:0 Simulated GPU, 24.0 GiB")
    assert gpu["data.patch_size"]["value"] == [96, 80, 48]  # the whole 80x72x40 case, rounded up to strides
    assert gpu_spec.config.data.patch_voxel_budget == budget["value"]  # resolved: no 'auto' left
    fingerprint = json.loads((tmp_path / "cuda0" / "fingerprint.json").read_text())
    assert "cuda:0 Simulated GPU" in P.format_tables(fingerprint, [P.Decision(**d) for d in gpu.values()])
    user = plan_for("cuda:0", "data.patch_voxel_budget=150000")[1]["data.patch_voxel_budget"]
    assert (user["value"], user["source"]) == (150000, "user") and "cuda:0" in user["why"]
    # the GPU-planned model on the CPU
    model, optimizer, scheduler, scaler = build_training(gpu_spec, torch.device("cpu"))
    path = save_checkpoint(checkpoint_state(gpu_spec, model, optimizer, scheduler, scaler, 0, -1.0), tmp_path / "g.pt")
    bundle = load_for_inference(path, "cpu")
    assert tuple(bundle.patch_size) == (96, 80, 48) and next(bundle.model.parameters()).device.type == "cpu"
    image = rng.normal(size=(1, 80, 72, 40)).astype(np.float32)
    labels, _ = Predictor(bundle).predict_array(image, (1.0, 1.0, 1.0))
    assert labels.shape == (80, 72, 40) and set(np.unique(labels)) <= {0, 1, 2}


# ----------------------------------------------------------------------------- real data
def _write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), direction=None) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    if direction is not None:
        img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def _link_cases(src: Path, dst: Path, names: dict[str, str]) -> Path:
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for new, old in names.items():
            os.symlink(src / sub / f"{old}.nrrd", dst / sub / f"{new}.nrrd")
    return dst


def plan_of(root: Path, classes: list[str], tmp: Path, *sets: str) -> tuple[dict, Config]:
    """The decisions and the planned config of ``root`` for training on the CPU (the plans
    docs/configuration.md shows; on CUDA the patch budget follows the device)."""
    from seg.train import planned_run
    cfg = apply_overrides(Config(), [f"data.root='{root}'", f"data.class_names={classes}",
                                     "data.val_images_dir=None", "train.device='cpu'", *sets])
    planned = planned_run(cfg, tmp / "run")[0].config
    record = json.loads((tmp / "run" / "plan.json").read_text())
    return {d["field"]: d["value"] for d in record["decisions"]}, planned


def why_of(tmp: Path, field: str) -> str:
    """The reason ``plan_of(..., tmp)`` recorded for ``field`` in plan.json."""
    record = json.loads((tmp / "run" / "plan.json").read_text())
    return next(d["why"] for d in record["decisions"] if d["field"] == field)


def fingerprint_of(tmp: Path) -> dict:
    """The whole fingerprint ``plan_of(..., tmp)`` computed (with per-case sizes and spacings)."""
    return json.loads((tmp / "run" / "fingerprint.json").read_text())


# ---------------------------------------------------------------- the plan table of docs/configuration.md
NUMBER = r"−?\d+(?:\.\d+)?"


def readme_row(first_cell: str) -> list[str]:
    """The cells of the row of docs/configuration.md's "What the plan gives" table whose first cell starts
    with ``first_cell``."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    table = text.split("What the plan gives", 1)[1].split("\n\n")[1]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()[2:]]
    found = [r for r in rows if r[0].startswith(first_cell)]
    assert len(found) == 1, f"docs/configuration.md plan table: {len(found)} rows start with {first_cell!r}"
    return found[0]


def says(printed: str, value: float) -> bool:
    """``printed`` (a number from docs/configuration.md) is ``value`` to the digits it shows."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(float(printed.replace("−", "-")) - float(value)) <= 0.5 * 10 ** -decimals + 1e-9


def says_all(cell: str, values) -> None:
    """The cell begins with ``A×B×C`` and that is ``values``, to the digits shown."""
    printed = re.match(rf"~?({NUMBER}(?:×{NUMBER})*)", cell).group(1).split("×")
    assert len(printed) == len(values) and all(says(p, v) for p, v in zip(printed, values)), (cell, values)


def says_after(cell: str, words: str, value: float) -> None:
    """The number right after ``words`` in ``cell`` is ``value``, to the digits shown."""
    match = re.search(re.escape(words) + rf"\s*({NUMBER})", cell)
    assert match and says(match.group(1), value), (cell, words, value)


def check_row(first_cell: str, plan3d: dict, plan2d: dict | None) -> list[str]:
    """Assert the columns every row has (spacing, patches with batch and slice axis, normalisation,
    rotation) against the plans; returns the row for its other claims."""
    row = readme_row(first_cell)
    _, spacing, patch3d, patch2d, norm, rotation = row
    says_all(spacing, plan3d["data.target_spacing"])
    says_all(patch3d, plan3d["data.patch_size"])
    if "batch" in patch3d:
        says_after(patch3d, "batch", plan3d["train.batch_size"])
    if plan2d is None:
        assert patch2d == "—"
    else:
        says_all(patch2d, plan2d["data.patch_size"])
        says_after(patch2d, "(", plan2d["data.slice_axis"])
        if "batch" in patch2d:
            says_after(patch2d, "batch", plan2d["train.batch_size"])
    assert norm.startswith(f"`{plan3d['data.normalization']}`")
    assert rotation == {(0, 1, 2): "all axes", (2,): "about z only"}[tuple(plan3d["data.rotation_axes"])]
    return row


def test_plan_mni_slabs(tmp_path) -> None:
    plan, cfg = plan_of(DEMO / "mni152", ["bg", "gm", "wm"], tmp_path, "data.val_images_dir='imagesVal'")
    # the patch sees 15 % of a slab, but the cortical ribbon and white-matter strands are 2-4 mm
    # thick: the grid that resolves them is kept
    record = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert P.thinnest_class_mm(record["fingerprint"]) < P.MIN_THICKNESS_VOXELS * 1.0
    why = next(d["why"] for d in record["decisions"] if d["field"] == "data.target_spacing")
    assert "kept although the patch sees 15%" in why
    assert plan["data.target_spacing"] == [1.0, 1.0, 1.0]
    assert plan["data.patch_size"] == [64, 64, 32]
    # skull-stripped slabs: half of each slab's box is zero outside the brain -> non-zero statistics
    assert plan["data.normalization"] == "zscore_nonzero"
    assert plan["data.rotation_axes"] == [0, 1, 2] and plan["data.mirror_axes"] == [0, 1, 2]
    assert plan["model.pointrend.train_num_points"] == 4096
    assert plan["train.batch_size"] == 2
    assert plan["data.patch_voxel_budget"] == P.PATCH_BUDGET[3]
    assert why_of(tmp_path, "data.patch_voxel_budget").startswith("cpu: fixed budget")
    plan2d, _ = plan_of(DEMO / "mni152", ["bg", "gm", "wm"], tmp_path / "2d",
                        "data.val_images_dir='imagesVal'", "data.spatial_dims=2")
    assert plan2d["data.slice_axis"] == 2 and plan2d["data.patch_size"] == [160, 192]
    assert plan2d["data.mirror_axes"] == [0, 1] and plan2d["train.batch_size"] == 2
    # the documented rows, cell by cell
    fp = record["fingerprint"]
    row = check_row("MNI152 slabs (", plan, plan2d)
    says_after(row[0], "skull-stripped,", fp["median_spacing"][0])
    assert all(s == fp["median_spacing"][0] for s in fp["median_spacing"])
    says_after(row[4], "box of non-zero voxels", 100 * fp["nonzero_crop_ratio"])
    same_rule = readme_row("MNI152 slabs: the same rule")
    says_all(same_rule[1], plan["data.target_spacing"])
    says_after(same_rule[1], "the patch sees", 100 * math.prod(plan["data.patch_size"]) / math.prod(fp["median_size"]))
    says_after(same_rule[1], "white matter is", fp["class_thickness_mm_median"]["2"])  # classes: bg, gm, wm
    says_after(same_rule[1], "grey matter", fp["class_thickness_mm_median"]["1"])
    assert P.thinnest_class_mm(fp) == fp["class_thickness_mm_median"]["2"]


@pytest.mark.skipif(not (DEMO / "hippocampus").is_dir(), reason="hippocampus demo not built")
def test_plan_hippocampus(tmp_path) -> None:
    plan, cfg = plan_of(DEMO / "hippocampus", "auto", tmp_path)  # classes from its dataset.json
    assert cfg.data.class_names == ["background", "anterior", "posterior"] and cfg.data.label_remap is None
    assert cfg.data.in_channels == 1 and cfg.data.channel_names == ["MRI"] and cfg.data.pattern == "*.nii.gz"
    assert plan["data.target_spacing"] == [1.0, 1.0, 1.0]
    assert plan["data.patch_size"] == [40, 56, 40]  # nnU-Net's 3d_fullres patch for this task
    assert plan["data.normalization"] == "zscore"   # cropped MRI, no zero background
    assert plan["train.batch_size"] == 2
    assert plan["data.rotation_axes"] == [0, 1, 2]
    plan2d, _ = plan_of(DEMO / "hippocampus", "auto", tmp_path / "2d",
                        "data.spatial_dims=2")
    assert plan2d["data.slice_axis"] == 2 and plan2d["data.patch_size"] == [40, 56]
    assert plan2d["train.batch_size"] == 14  # 32,768 // 2,240
    fp = fingerprint_of(tmp_path)
    row = check_row("hippocampus (", plan, plan2d)
    subjects = len(list((DEMO / "hippocampus" / "imagesTr").glob("*.nii.gz")))
    says_after(row[0], "(", subjects)
    says_after(row[0], "subjects,", fp["median_spacing"][0])
    says_all(row[0].split("~")[1], fp["median_size"])
    assert fp["nonzero_crop_ratio"] >= 1 - P.NONZERO_CROP_SHARE and fp["nonzero_share"] > 0.99  # no zero background


def test_plan_atrium_phantom_sees_context(tmp_path) -> None:
    """The large-field demo: a 64x64x32 patch at 0.8 mm saw 12 % of the median view, so the plan
    coarsens the grid until it sees a quarter of it (the failure of issue 20: a patch that sees too
    little labels the look-alike blood pools as atrium)."""
    plan, cfg = plan_of(DEMO / "atrium_phantom", "auto", tmp_path)
    assert cfg.data.class_names == ["background", "left_atrium"]
    spacing = plan["data.target_spacing"]
    assert spacing[0] == spacing[1] == spacing[2] and 1.3 < spacing[0] < 1.4   # 0.8 mm x 1.70
    assert np.prod(plan["data.patch_size"]) <= 131_072 and plan["train.batch_size"] == 2
    record = json.loads((tmp_path / "run" / "plan.json").read_text())
    why = next(d["why"] for d in record["decisions"] if d["field"] == "data.target_spacing")
    assert "large field of view" in why and "saw 12%" in why  # 64x64x32 of 129x109x80
    fp = record["fingerprint"]
    assert P.thinnest_class_mm(fp) / spacing[0] >= P.MIN_THICKNESS_VOXELS   # ~5.5 mm thick
    median = np.asarray(fp["median_size"]) * 0.8 / spacing[0]
    share = np.prod(plan["data.patch_size"]) / np.prod(median)
    assert P.CONTEXT_SHARE <= share < P.CONTEXT_SHARE * P.CONTEXT_STEP ** 3 * 1.1
    # the documented row, cell by cell
    row = check_row("atrium phantom (", plan, None)
    full = fingerprint_of(tmp_path)
    fine = P.resampled_median_size(full["spacings"], full["sizes"],
                                   P.plan_target_spacing(full["spacings"], full["sizes"]))
    first = P.plan_patch_size(fine, (0.8,) * 3, P.level_strides(cfg), P.PATCH_BUDGET[3])
    subjects = len(list((DEMO / "atrium_phantom" / "imagesTr").glob("*.nii.gz")))
    says_after(row[0], "(", subjects)
    says_after(row[0], "subjects,", fp["median_spacing"][0])
    says_all(row[0].split("~")[1], fp["median_size"])
    says_all(row[1].split("(a ")[1], first)
    says_after(row[1], "saw", 100 * math.prod(first) / math.prod(fine))
    says_after(row[1], "at", fp["median_spacing"][0])
    says_after(row[1], "now", 100 * share)
    says_after(row[1], "the atrium", P.thinnest_class_mm(fp))
    says_after(row[1], "thick,", P.thinnest_class_mm(fp) / spacing[0])
    assert plan["data.normalization"] == "zscore" and plan["data.patch_size"] == [80, 32, 48]


def test_plan_pyradiomics_mr_anisotropic(tmp_path) -> None:
    root = _link_cases(DEMO / "pyradiomics", tmp_path / "mr", {"brain1": "brain1", "brain2": "brain2",
                                                               "brain2b": "brain2"})
    plan, _ = plan_of(root, ["bg", "tumour"], tmp_path)
    # the head fills a large view and the tumour is small: the thin in-plane axes grow for context
    # (the thick axis stays), until the thinnest class (3.85 mm) would be < 4 voxels thick
    record = json.loads((tmp_path / "run" / "plan.json").read_text())
    cap = P.thinnest_class_mm(record["fingerprint"]) / P.MIN_THICKNESS_VOXELS
    target = plan["data.target_spacing"]
    assert target[2] == 6.5 and target[0] == target[1] and 0.78125 < target[0] <= cap < target[0] * 1.03
    assert plan["data.rotation_axes"] == [2]           # in-plane only across 6.5 mm slices
    assert plan["data.normalization"] == "zscore"      # MR T1 with the head filling the view
    patch = plan["data.patch_size"]
    assert patch == [80, 64, 24]  # z (23-25 slices) whole, in-plane takes the budget left
    plan2d, _ = plan_of(root, ["bg", "tumour"], tmp_path / "2d", "data.spatial_dims=2")
    assert plan2d["data.slice_axis"] == 2              # slices along the thick axis
    assert plan2d["data.patch_size"] == [160, 192]
    # the documented row, cell by cell
    fp = record["fingerprint"]
    row = check_row("pyradiomics brain MR (", plan, plan2d)
    assert list(fp["orientations"]) == ["LAS"] and row[0].startswith("pyradiomics brain MR (LAS, ")
    says_all(row[0].split("LAS, ")[1], fp["median_spacing"])
    says_after(row[1], "the thinner tumour,", P.thinnest_class_mm(fp))
    says_after(row[1], "would be <", P.MIN_THICKNESS_VOXELS)
    assert fp["nonzero_crop_ratio"] >= 1 - P.NONZERO_CROP_SHARE  # the head fills the view


def test_plan_ct_clips_to_foreground_percentiles(tmp_path) -> None:
    root = _link_cases(DEMO / "pyradiomics", tmp_path / "ct", {"lung2": "lung2", "lung2b": "lung2",
                                                               "lung2c": "lung2"})
    plan, cfg = plan_of(root, ["bg", "tumour"], tmp_path)
    assert plan["data.normalization"] == "ct"
    stats = cfg.data.intensity_stats[0]
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(DEMO / "pyradiomics/imagesTr/lung2.nrrd")))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(DEMO / "pyradiomics/labelsTr/lung2.nrrd")))
    fg = img[lab > 0].astype(float)  # the tumour: 24,644 voxels, 10,000 sampled per case
    assert stats["clip_low"] == pytest.approx(np.percentile(fg, 0.5), abs=15)
    assert stats["clip_high"] == pytest.approx(np.percentile(fg, 99.5), abs=15)
    assert stats["mean"] == pytest.approx(fg.mean(), abs=5) and stats["std"] == pytest.approx(fg.std(), rel=0.05)
    # the documented row, cell by cell: a coarser grid for context (thick slices: in-plane only), the patches
    assert plan["data.target_spacing"] == pytest.approx([1.2014, 1.2014, 5.0])
    assert plan["data.patch_size"] == [64, 64, 32] and plan["data.rotation_axes"] == [2]
    plan2d, _ = plan_of(root, ["bg", "tumour"], tmp_path / "2d", "data.spatial_dims=2")
    assert plan2d["data.slice_axis"] == 2 and plan2d["data.patch_size"] == [160, 128]
    record = json.loads((tmp_path / "run" / "plan.json").read_text())
    fp, full = record["fingerprint"], fingerprint_of(tmp_path)
    row = check_row("pyradiomics lung CT (", plan, plan2d)
    assert list(fp["orientations"]) == ["LPS"] and row[0].startswith("pyradiomics lung CT (LPS, ")
    says_all(row[0].split("LPS, ")[1], fp["median_spacing"])
    assert fp["channels"][0]["integer"] and fp["channels"][0]["min"] <= P.CT_MIN_HU and "HU" in row[0]
    fine = P.resampled_median_size(full["spacings"], full["sizes"],
                                   P.plan_target_spacing(full["spacings"], full["sizes"]))
    first = P.plan_patch_size(fine, fp["median_spacing"], P.level_strides(cfg), P.PATCH_BUDGET[3])
    coarse = P.resampled_median_size(full["spacings"], full["sizes"], plan["data.target_spacing"])
    says_after(row[1], "saw", 100 * math.prod(first) / math.prod(fine))
    says_after(row[1], "now", 100 * math.prod(plan["data.patch_size"]) / math.prod(coarse))
    says_after(row[1], "tumour", P.thinnest_class_mm(fp))
    says_after(row[4], "clip", stats["clip_low"])
    says_after(row[4], "…", stats["clip_high"])


def test_plan_skull_on_head_zscores_air_dark(tmp_path) -> None:
    root = skull_on_heads(tmp_path / "heads")
    plan, cfg = plan_of(root, ["bg", "brain"], tmp_path)
    assert plan["data.normalization"] == "zscore"  # the head fills the view: no non-zero masking
    assert plan["data.target_spacing"] == [1.0, 1.0, 1.0] and plan["data.rotation_axes"] == [0, 1, 2]
    assert plan["data.patch_size"] == [48, 48, 48]
    # the documented row, cell by cell
    fp = fingerprint_of(tmp_path)
    row = check_row("synthetic skull-on T1", plan, None)
    says_all(row[0].split("(")[1], fp["median_size"])
    whole = P.plan_patch_size(fp["median_size"], plan["data.target_spacing"], P.level_strides(cfg), 10 ** 9)
    assert "(budget)" in row[2] and math.prod(whole) > P.PATCH_BUDGET[3]  # the padded case (48x64x48) is over it
    assert row[4] == "`zscore`: air becomes the darkest value"
    from datasets import find_cases, load_case_arrays
    case = find_cases(root / "imagesTr", root / "labelsTr")[0]
    arrays = load_case_arrays(case, cfg.data)
    air = arrays.image[0][np.asarray(sitk.GetArrayFromImage(sitk.ReadImage(str(case.image)))
                                     ).transpose(2, 1, 0) == 0]
    brain = arrays.image[0][arrays.label > 0]
    assert air.max() < brain.min() - 1.0  # air is the darkest value, not the tissue mean (0)


# ----------------------------------------------------------------------------- the command line
def test_plan_only_cli_prints_caches_and_overrides(tmp_path) -> None:
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train_seg.py"), "--plan-only", "--no-progress",
            "--config", str(DEMO / "mni152" / "config.py"), "--set",
            f"train.output_dir='{out}'", "data.patch_size=(48,48,32)"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "fingerprint of 3 training case(s)" in proc.stdout + proc.stderr
    record = json.loads((out / "plan.json").read_text())
    by_field = {d["field"]: d for d in record["decisions"]}
    assert by_field["data.patch_size"]["value"] == [48, 48, 32] and by_field["data.patch_size"]["source"] == "user"
    assert by_field["data.normalization"]["source"] == "auto"
    assert by_field["model.pointrend.train_num_points"]["value"] == 48 * 48 * 32 // 32  # from the user's patch
    assert record["fingerprint"]["num_cases"] == 3 and not list(out.glob("*.pt"))


def test_fingerprint_cache_is_reused_only_for_the_same_files(tmp_path, monkeypatch) -> None:
    import datasets
    from hparam import DataConfig
    root = skull_on_heads(tmp_path / "heads", n=2)
    cases = datasets.find_cases(root / "imagesTr", root / "labelsTr")
    cache = tmp_path / "fp.json"
    first = P.compute_fingerprint(cases, DataConfig(), cache, progress=False)
    assert first["num_cases"] == 2 and cache.is_file()
    import datasets.arrays as arrays
    monkeypatch.setattr(arrays, "read_case_image", lambda *a: (_ for _ in ()).throw(AssertionError("read")))
    assert P.compute_fingerprint(cases, DataConfig(), cache, progress=False) == first  # no reading
    os.utime(cases[0].image, ns=(1, 1))  # the file changed: recomputed (and so read)
    with pytest.raises(AssertionError, match="read"):
        P.compute_fingerprint(cases, DataConfig(), cache, progress=False)


def test_augmentation_follows_the_plan() -> None:
    import torchio as tio
    from datasets.augment import augmentation_3d
    from hparam import DataConfig
    cfg = DataConfig(mirror_axes=(0,), rotation_axes=(2,), augment_intensity=False)
    flip, affine = augmentation_3d(cfg).transforms
    assert isinstance(flip, tio.RandomFlip) and tuple(flip.axes) == (0,)
    assert tuple(affine.degrees) == (0, 0, 0, 0, -15, 15)
    assert augmentation_3d(DataConfig(mirror_axes=(), augment_affine=False, augment_intensity=False)) is None


@pytest.mark.parametrize("content", ["[" * 100000 + "]" * 100000, "[1, 2]"])
def test_a_bad_fingerprint_cache_is_computed_again(tmp_path, content) -> None:
    """fingerprint.json is our cache, not the user's input: whatever it holds (nested too deeply,
    not an object, not JSON), the fingerprint is computed again and the cache replaced."""
    import datasets
    from hparam import DataConfig
    root = skull_on_heads(tmp_path / "heads", n=2)
    cases = datasets.find_cases(root / "imagesTr", root / "labelsTr")
    cache = tmp_path / "fp.json"
    cache.write_text(content)
    fp = P.compute_fingerprint(cases, DataConfig(), cache, progress=False)
    assert fp["num_cases"] == 2
    assert json.loads(cache.read_text()) == fp
