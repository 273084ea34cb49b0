"""Sliding-window engine, prediction pipeline and infer_seg CLI.

References: oracle predictors (identity / a known linear map must come through unchanged), MONAI's
``sliding_window_inference`` and ``compute_importance_map`` (test-only), closed forms for TTA.
"""
import logging
import types

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference as monai_swi

import infer_seg
from seg import io, ops
from seg.errors import DataError
from seg.inference import (blend_weight, mirror_axes, predict_volume_2d, sliding_window_inference,
                           window_starts)
from seg.predict import Predictor, predict_folder
from seg.preprocess import Preprocessing

torch.set_num_threads(1)
DIMS = [2, 3]
SHAPES = {2: (23, 17), 3: (13, 11, 9)}   # odd, non-square, larger than the patch
PATCH = {2: (8, 6), 3: (6, 5, 4)}


def _conv_net(sd: int, cin: int = 2, k: int = 3, seed: int = 0) -> torch.nn.Module:
    """A small zero-padded conv net: its output depends on where the window borders are."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(ops.conv(sd, cin, 4, 3), torch.nn.ReLU(), ops.conv(sd, 4, k, 3)).eval()


def _linear_map(sd: int, cin: int = 2, k: int = 3) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    conv = ops.conv(sd, cin, k, 1)
    a, b = torch.randn(k, cin), torch.randn(k)
    with torch.no_grad():
        conv.weight.copy_(a.reshape(k, cin, *([1] * sd)))
        conv.bias.copy_(b)
    return conv.eval(), a, b


# ---------------------------------------------------------------------------------------- oracles
@pytest.mark.parametrize("sd", DIMS)
@pytest.mark.parametrize("blend", ["gaussian", "hann", "constant"])
def test_linear_oracle_passes_through(sd, blend):
    torch.manual_seed(1)
    net, a, b = _linear_map(sd)
    x = torch.randn(2, 2, *SHAPES[sd])
    y = sliding_window_inference(x, net, PATCH[sd], overlap=0.5, blend=blend, batch_size=3)
    expected = torch.einsum("kc,nc...->nk...", a, x) + b.reshape(1, -1, *([1] * sd))
    assert y.shape == (2, 3, *SHAPES[sd]) and y.dtype == torch.float32
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sd", DIMS)
def test_identity_smaller_than_patch_is_padded_and_cropped(sd):
    x = torch.randn(1, 1, *[p - 3 for p in PATCH[sd]]) + 5.0
    seen = []

    def identity(w):
        seen.append(tuple(w.shape[2:]))
        return w

    y = sliding_window_inference(x, identity, PATCH[sd], pad_value=-7.0)
    assert seen == [PATCH[sd]]  # one window, at the full patch size
    torch.testing.assert_close(y, x)


# ---------------------------------------------------------------------------------- against MONAI
@pytest.mark.parametrize("sd", DIMS)
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_weight_map_matches_monai(sd, mode):
    torch.testing.assert_close(blend_weight(PATCH[sd], mode), compute_importance_map(PATCH[sd], mode))


@pytest.mark.parametrize("size,patch,overlap", [(23, 8, 0.5), (9, 9, 0.5), (100, 32, 0.25), (31, 7, 0.6),
                                                (5, 8, 0.5), (64, 16, 0.0)])
def test_window_positions_cover_symmetric_and_count_like_monai(size, patch, overlap):
    starts = window_starts(max(size, patch), patch, overlap)
    span = max(size, patch) - patch
    assert starts[0] == 0 and starts[-1] == span and starts == sorted(set(starts))
    mirrored = [span - s for s in reversed(starts)]  # mirror-symmetric grid, except a middle window
    assert [abs(m - s) for m, s in zip(mirrored, starts)] == [int(span % 2 == 1 and i == len(starts) // 2
                                                               and len(starts) % 2 == 1)
                                                           for i in range(len(starts))]
    step = max(1, int(patch * (1 - overlap)))
    assert max(np.diff(starts), default=0) <= step  # never less overlap than asked for
    monai_n = len(dense_patch_slices((max(size, patch),), (patch,), (step,)))
    assert len(starts) == monai_n


# Sizes where S - P is a multiple of MONAI's interval: both grids coincide, outputs must agree.
@pytest.mark.parametrize("sd", DIMS)
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_matches_monai_sliding_window(sd, mode):
    shape = {2: (20, 15), 3: (12, 11, 2)}[sd]  # the 3D case is smaller than the patch on one axis
    net = _conv_net(sd)
    x = torch.randn(2, 2, *shape)
    ours = sliding_window_inference(x, net, PATCH[sd], overlap=0.5, blend=mode, batch_size=3)
    with torch.no_grad():
        ref = monai_swi(x, PATCH[sd], 3, net, overlap=0.5, mode=mode)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_2d_predictor_on_3d_volume_matches_slice_by_slice(slice_axis):
    net = _conv_net(2, cin=1)
    vol = torch.randn(1, 10, 15, 7)
    out = predict_volume_2d(vol, net, slice_axis, (8, 6), slices_per_call=4, overlap=0.5, batch_size=5)
    assert out.shape == (3, 10, 15, 7)
    for i in range(vol.shape[slice_axis + 1]):
        sl = vol.select(slice_axis + 1, i)[None]  # (1, C, a, b)
        with torch.no_grad():
            ref = monai_swi(sl, (8, 6), 2, net, overlap=0.5, mode="gaussian")[0]
        torch.testing.assert_close(out.select(slice_axis + 1, i), ref, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------- TTA
SYM_SHAPES = {2: (22, 16), 3: (14, 11, 9)}  # S - P even on every axis: a fully symmetric grid


def _mirror_symmetric(sd: int) -> torch.Tensor:
    x = torch.randn(1, 1, *SYM_SHAPES[sd])
    for ax in range(2, 2 + sd):
        x = x + x.flip(ax)
    return x


@pytest.mark.parametrize("sd", DIMS)
def test_tta_equivariant_predictor_unchanged_and_output_symmetric(sd):
    k = torch.tensor([1.0, 2.0, 1.0])  # symmetric kernel: the conv commutes with every mirror
    kernel = k
    for _ in range(sd - 1):
        kernel = kernel[..., None] * k
    conv = ops.conv(sd, 1, 1, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(kernel[None, None])
    x = _mirror_symmetric(sd)
    plain = sliding_window_inference(x, conv, PATCH[sd], overlap=0.5)
    tta = sliding_window_inference(x, conv, PATCH[sd], overlap=0.5, tta=True)
    torch.testing.assert_close(tta, plain, atol=1e-4, rtol=1e-4)
    for ax in range(2, 2 + sd):  # symmetric grid + symmetric weights keep the symmetry
        torch.testing.assert_close(plain, plain.flip(ax), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sd", DIMS)
def test_tta_non_equivariant_predictor_is_averaged_over_mirrors(sd):
    calls = []

    def ramp(w):  # multiplies by a ramp along the first axis of the window: not mirror-equivariant
        calls.append(1)
        r = torch.linspace(0, 1, w.shape[2]).reshape(1, 1, -1, *([1] * (sd - 1)))
        return w * r

    x = _mirror_symmetric(sd)
    plain = sliding_window_inference(x, ramp, PATCH[sd], overlap=0.5, batch_size=100)
    assert len(calls) == 1
    assert not torch.allclose(plain, plain.flip(2), atol=1e-3)
    tta = sliding_window_inference(x, ramp, PATCH[sd], overlap=0.5, batch_size=100, tta=True)
    assert len(calls) == 1 + 2 ** sd  # identity + every non-empty subset of axes
    torch.testing.assert_close(tta, 0.5 * x, atol=1e-5, rtol=1e-5)  # ramp + flipped ramp = 1
    assert len(mirror_axes(sd, [0])) == 1


def test_softmax_activation_blends_probabilities():
    net = _conv_net(3)
    y = sliding_window_inference(torch.randn(1, 2, *SHAPES[3]), net, PATCH[3], activation="softmax", tta=True)
    torch.testing.assert_close(y.sum(1), torch.ones(1, *SHAPES[3]))


def test_bad_arguments_and_predictors():
    x = torch.randn(1, 1, 9, 9)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(x, lambda w: w, (4, 4), overlap=1.0)
    with pytest.raises(ValueError, match="resolution"):
        sliding_window_inference(x, lambda w: w[..., ::2, ::2], (4, 4))
    with pytest.raises(ValueError, match="blend"):
        sliding_window_inference(x, lambda w: w, (4, 4), blend="gauss")


# -------------------------------------------------------------------------------------- pipeline
class _SignModel(torch.nn.Module):
    """Pointwise: logits (-x, x) -> class 1 where the normalised intensity is positive."""

    def __init__(self, sd: int):
        super().__init__()
        self.conv = ops.conv(sd, 1, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([-1.0, 1.0]).reshape(2, 1, *([1] * sd)))

    def forward(self, x):
        return self.conv(x)


def _bundle(sd=3, slice_axis=None, target_spacing=None, patch=(8, 8, 4)):
    return types.SimpleNamespace(model=_SignModel(sd), spatial_dims=sd, patch_size=patch,
                                 slice_axis=slice_axis, class_names=["background", "fg"], in_channels=1,
                                 preprocessing=Preprocessing("zscore", target_spacing=target_spacing))


def _smooth_volume(shape=(19, 14, 9)):
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return (100 + 50 * np.sin(2.5 * g[0]) * np.cos(2 * g[1]) + 10 * g[2])[None].astype(np.float32)


@pytest.mark.parametrize("bundle_kw", [dict(), dict(sd=2, slice_axis=2, patch=(8, 8)),
                                       dict(sd=2, slice_axis=0, patch=(8, 4))])
def test_predict_array_matches_closed_form(bundle_kw):
    img = _smooth_volume()
    labels, probs = Predictor(_bundle(**bundle_kw), tta=True).predict_array(img, (1.0, 1.0, 3.0), True)
    z = (img - img.mean()) / img.std()
    assert labels.dtype == np.uint8 and labels.shape == img.shape[1:]
    np.testing.assert_array_equal(labels, (z[0] > 0).astype(np.uint8))
    np.testing.assert_allclose(probs[1], 1 / (1 + np.exp(-2 * z[0])), atol=1e-4)  # softmax(-z, z)


def test_predict_array_with_target_spacing_returns_input_grid():
    img = _smooth_volume()
    base, _ = Predictor(_bundle()).predict_array(img, (1.0, 1.0, 3.0))
    resampled, _ = Predictor(_bundle(target_spacing=(1.6, 1.3, 2.0))).predict_array(img, (1.0, 1.0, 3.0))
    assert resampled.shape == base.shape
    assert (resampled == base).mean() > 0.97  # smooth boundary: only border voxels may differ
    with pytest.raises(ValueError, match="spacing"):
        Predictor(_bundle(target_spacing=(2.0, 2.0, 2.0))).predict_array(img, None)


@pytest.mark.parametrize("target", [(1.6, 1.3, 2.0), (1.6, 1.3)])
def test_2d_model_with_target_spacing_on_2d_and_3d_inputs(target):
    """A 2D model trained at a target spacing (3 values from volumes, or in-plane only) segments a
    native 2D image and a volume, each back on its own grid (issue 13: it failed on 2D images)."""
    from seg.preprocess import target_grid

    bundle = _bundle(sd=2, slice_axis=2, target_spacing=target, patch=(8, 8))
    image2d = _smooth_volume()[:, :, :, 3]  # (C, X, Y)
    labels, _ = Predictor(bundle).predict_array(image2d, (1.0, 1.0))
    assert labels.shape == image2d.shape[1:]
    assert target_grid(image2d.shape[1:], (1.0, 1.0), target, 2) == (
        round(image2d.shape[1] / 1.6), round(image2d.shape[2] / 1.3))
    volume = _smooth_volume()
    labels, _ = Predictor(bundle).predict_array(volume, (1.0, 1.0, 3.0))
    assert labels.shape == volume.shape[1:]
    expected_z = round(volume.shape[3] * 3.0 / 2.0) if len(target) == 3 else volume.shape[3]
    assert target_grid(volume.shape[1:], (1.0, 1.0, 3.0), target, 2)[2] == expected_z


# ------------------------------------------------------------------------------------ files / CLI
def _write_case(path, shape=(19, 14, 9), spacing=(0.8, 0.9, 3.0)):
    arr = _smooth_volume(shape)[0].astype(np.int16)
    img = sitk.GetImageFromArray(arr.transpose(2, 1, 0))
    img.SetSpacing(spacing)
    img.SetOrigin((10.0, -20.0, 5.0))
    img.SetDirection((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path))
    return img


@pytest.fixture
def case_folder(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _write_case(d / "brain1.nrrd")
    _write_case(d / "la_002_0000.nii.gz", shape=(11, 7, 5), spacing=(1.0, 1.0, 1.0))  # smaller than patch
    (d / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    return d


@pytest.fixture
def checkpoint(trained_checkpoint):
    """A real tiny trained checkpoint (conftest: 3 classes, label values 0, 1, 4)."""
    return str(trained_checkpoint[1])


def test_cli_corrupt_file_among_good_ones(case_folder, tmp_path, checkpoint, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        rc = infer_seg.main(["-i", str(case_folder), "-o", str(out), "-m", checkpoint, "--save-probabilities"])
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("corrupt.nii.gz" in m for m in errors)
    assert all("Traceback" not in m for m in errors)
    assert sorted(p.name for p in out.iterdir()) == ["brain1.nrrd", "la_002.nii.gz", "probabilities"]
    src, pred = sitk.ReadImage(str(case_folder / "brain1.nrrd")), sitk.ReadImage(str(out / "brain1.nrrd"))
    assert pred.GetPixelID() == sitk.sitkUInt8
    for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(pred, attr)() == pytest.approx(getattr(src, attr)(), abs=1e-6)
    assert sitk.ReadImage(str(out / "probabilities" / "brain1.nrrd")).GetNumberOfComponentsPerPixel() == 3

    caplog.clear()  # second run: existing outputs are skipped, the bad file still fails
    mtime = (out / "brain1.nrrd").stat().st_mtime_ns
    assert infer_seg.main(["-i", str(case_folder), "-o", str(out), "-m", checkpoint]) == 2
    assert (out / "brain1.nrrd").stat().st_mtime_ns == mtime


def test_cli_single_file_suffix_format_overwrite(case_folder, tmp_path, checkpoint):
    out = tmp_path / "o2"
    args = ["-i", str(case_folder / "brain1.nrrd"), "-o", str(out), "-m", checkpoint, "--suffix", "_seg",
            "--format", "nii.gz", "--tta", "--overlap", "0.25"]
    assert infer_seg.main(args) == 0
    assert [p.name for p in out.iterdir()] == ["brain1_seg.nii.gz"]
    mtime = (out / "brain1_seg.nii.gz").stat().st_mtime_ns
    assert infer_seg.main(args + ["--overwrite"]) == 0
    assert (out / "brain1_seg.nii.gz").stat().st_mtime_ns != mtime


def test_predict_folder_report_and_fail_fast(case_folder, tmp_path):
    pred = Predictor(_bundle())
    report = predict_folder(pred, case_folder, tmp_path / "o", progress=False)
    assert len(report.successes) == 2 and len(report.failures) == 1
    assert "corrupt.nii.gz" in report.failures[0][1]
    with pytest.raises(DataError, match="corrupt.nii.gz"):
        predict_folder(pred, case_folder, tmp_path / "o3", fail_fast=True, progress=False)
    assert [len(c.images) for c in io.image_cases(case_folder)] == [1, 1, 1]


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    _write_case(tmp_path / "a.nrrd")
    rc = infer_seg.main(["-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", str(tmp_path / "no.pt")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no.pt" in err[0]


def test_read_case_refuses_nan_nifti(tmp_path):
    """SimpleITK silently reads NaN voxels of a NIfTI file as 0: inference must refuse the file."""
    arr = np.zeros((6, 7, 8), np.float32)
    arr[2, 3, 4] = np.nan
    path = tmp_path / "nan_case.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    assert not np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).any()  # the hazard
    with pytest.raises(DataError, match="nan_case.nii.gz.*NaN"):
        io.read_case(path)


def _error_lines(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and name in r.getMessage()]


def test_cli_nan_nrrd_is_refused_and_the_others_written(tmp_path, checkpoint, caplog):
    """Every format is checked for NaN (an .nrrd with one NaN voxel used to give an all-background
    label map and success)."""
    d = tmp_path / "in"
    d.mkdir()
    _write_case(d / "good.nrrd")
    arr = _smooth_volume()[0]
    arr[3, 4, 5] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr.transpose(2, 1, 0)), str(d / "nan_case.nrrd"))
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert infer_seg.main(["-i", str(d), "-o", str(out), "-m", checkpoint]) == 2
    errors = _error_lines(caplog, "nan_case.nrrd")
    assert errors and all("1 NaN or infinite voxel" in m and "\n" not in m for m in errors)
    assert sorted(p.name for p in out.iterdir()) == ["good.nrrd"]


def test_cli_four_digit_names_are_one_channel_cases_unless_0000_exists(tmp_path, checkpoint, caplog):
    d = tmp_path / "in"
    d.mkdir()
    for name in ("case_0001.nii.gz", "case_0002.nii.gz"):
        _write_case(d / name)
    assert [(c.name, len(c.images)) for c in io.image_cases(d)] == [("case_0001", 1), ("case_0002", 1)]
    out = tmp_path / "out"
    assert infer_seg.main(["-i", str(d), "-o", str(out), "-m", checkpoint]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["case_0001.nii.gz", "case_0002.nii.gz"]
    _write_case(d / "case_0000.nii.gz")  # now the three files are the channels of one case 'case'
    with caplog.at_level(logging.INFO):
        assert infer_seg.main(["-i", str(d), "-o", str(tmp_path / "o2"), "-m", checkpoint]) == 2
    assert any("has 3 channel(s)" in m for m in _error_lines(caplog, "case_0000.nii.gz"))
    assert not (tmp_path / "o2" / "case.nii.gz").exists()


def test_cli_channel_on_another_grid_is_refused(tmp_path, checkpoint, caplog):
    d = tmp_path / "in"
    d.mkdir()
    _write_case(d / "good.nrrd")
    first = _write_case(d / "m_0000.nii.gz")
    first.SetOrigin((10.0, -20.0, 6.0))  # 1 mm off along z
    sitk.WriteImage(first, str(d / "m_0001.nii.gz"))
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert infer_seg.main(["-i", str(d), "-o", str(out), "-m", checkpoint]) == 2
    errors = _error_lines(caplog, "m_0001.nii.gz")
    assert errors and "origin" in errors[0] and "m_0000.nii.gz" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["good.nrrd"]


def test_cli_suffix_and_labels_evaluate_the_predicted_cases(trained_checkpoint, tmp_path, caplog, capsys):
    """``--suffix _seg --labels`` pairs ``case0_seg.nii.gz`` with ``case0.nii.gz``; with --labels only
    the predicted cases are evaluated, while ``python -m seg.evaluate`` needs every label's prediction."""
    import json

    from seg.evaluate import main as evaluate_main

    data, ckpt = trained_checkpoint
    out, labels = tmp_path / "pred", str(data / "labels")
    args = ["-m", str(ckpt), "--suffix", "_seg", "--labels", labels]
    assert infer_seg.main(["-i", str(data / "images"), "-o", str(out), *args]) == 0
    assert (out / "case0_seg.nii.gz").is_file()
    assert json.loads((out / "evaluation" / "summary.json").read_text())["n_cases"] == 4
    one = tmp_path / "one"
    with caplog.at_level(logging.INFO):
        assert infer_seg.main(["-i", str(data / "images" / "case1.nii.gz"), "-o", str(one), *args]) == 0
    assert json.loads((one / "evaluation" / "summary.json").read_text())["n_cases"] == 1
    assert "3 label(s) of cases that were not predicted are ignored" in caplog.text
    capsys.readouterr()
    report = ["--label", labels, "-o", str(tmp_path / "report"), "--no-pictures"]
    assert evaluate_main(["--pred", str(one), "--suffix", "_seg", *report]) == 2
    assert "no prediction for 3 labelled case(s)" in capsys.readouterr().err
    assert evaluate_main(["--pred", str(out), *report]) == 2  # the suffix is part of the name
    assert "no prediction for 4 labelled case(s)" in capsys.readouterr().err
    assert evaluate_main(["--pred", str(out), "--suffix", "_seg", *report]) == 0
