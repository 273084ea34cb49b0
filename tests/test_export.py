"""Exported models (``python -m seg.export``): TorchScript and ONNX against the eager model, the
manifest, ``infer_seg.py -m DIR`` against ``-m CHECKPOINT``, the error contract, atomic writes, and
the TorchScript file running with torch alone.

Models: the session fixture ``trained_checkpoint`` (a real 4-step 3D training run of the default
model: U-Net head, PointRend with the image cube and the fine stem, labels {0, 1, 4}), and an
untrained 2D model saved the way ``seg.train`` saves one (slice axis 1, PointRend on).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import infer_seg
from conftest import point_options
from seg import export as ex
from seg.checkpoint import load_for_inference
from seg.errors import UserError

TOL = 1e-4
BUNDLE_FIELDS = ("spatial_dims", "patch_size", "slice_axis", "preprocessing", "class_names",
                 "in_channels", "mirror_axes", "label_values")
MODEL_2D = dict(spatial_dims=2, in_channels=1, num_classes=3, backbone="convnext_atto",
                backbone_kwargs={"kernel_size": 3}, head="unet", head_kwargs={},
                pointrend=point_options(image_features="cube", fine_stem_channels=8, fc_dim=32,
                                        coarse_pred_each_layer=True, subdivision_num_points=96))


def save_2d_checkpoint(path: Path, model_config: dict = MODEL_2D, patch=(24, 20)) -> Path:
    """An untrained 2D checkpoint in the layout ``seg.train`` writes (slice axis 1, labels {0,1,4})."""
    from seg.model import build_model
    from seg.preprocess import Preprocessing

    torch.manual_seed(0)
    model = build_model(**model_config)
    torch.save({"format_version": 1, "model": model.state_dict(), "model_config": model_config,
                "spatial_dims": 2, "patch_size": patch, "slice_axis": 1,
                "preprocessing": Preprocessing("zscore").to_dict(),
                "class_names": ["background", "outer", "inner"], "label_values": [0, 1, 4],
                "in_channels": 1, "mirror_axes": [0, 1]}, path)
    return path


@pytest.fixture(scope="module")
def exports(trained_checkpoint, tmp_path_factory) -> dict:
    """{'3d': (checkpoint, export dir), '2d': (...)}, both exported with ONNX."""
    root = tmp_path_factory.mktemp("exports")
    ckpt2 = save_2d_checkpoint(root / "model2d.pt")
    out = {}
    for key, ckpt in (("3d", trained_checkpoint[1]), ("2d", ckpt2)):
        ex.export_checkpoint(ckpt, root / f"export{key}")
        out[key] = (ckpt, root / f"export{key}")
    return out


def windows(bundle, n: int, seed: int) -> torch.Tensor:
    """(n, C, *patch) windows: half noise, half a smooth blob, so the model is uncertain somewhere."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, bundle.in_channels, *bundle.patch_size), generator=g)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, p) for p in bundle.patch_size], indexing="ij")
    blob = (sum(a ** 2 for a in axes) < 0.4).float() * 3 - 1
    return 0.5 * x + blob


# ------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("key", ["3d", "2d"])
def test_torchscript_matches_eager_at_batch_1_and_3(exports, key) -> None:
    ckpt, folder = exports[key]
    eager = load_for_inference(ckpt)
    exported = ex.load_export(folder)
    assert isinstance(exported.model, torch.jit.ScriptModule)
    manifest = ex.read_manifest(folder)
    for n in (1, 3):
        x = windows(eager, n, seed=n)
        with torch.no_grad():
            ref = eager.model(x)
            evaluations = eager.model.last_point_evaluations
            got = exported.model(x)
            coarse = eager.model.forward_infer(x, mode="coarse")
        assert got.shape == (n, len(eager.class_names), *eager.patch_size)
        assert float((got - ref).abs().max()) <= TOL
        # the subdivision really runs: it changes the logits, with the points the manifest states
        assert float((ref - coarse).abs().max()) > 1e-3
        assert evaluations == sum(manifest["pointrend"]["points_per_step"]) > 0
    recorded = manifest["networks"]["torchscript"]["max_abs_diff_vs_eager"]
    assert set(recorded) == {"1", "3"} and max(recorded.values()) <= TOL


@pytest.mark.parametrize("key", ["3d", "2d"])
def test_onnx_matches_eager(exports, key) -> None:
    ort = pytest.importorskip("onnxruntime")
    ckpt, folder = exports[key]
    eager = load_for_inference(ckpt)
    entry = ex.read_manifest(folder)["networks"]["onnx"]
    assert entry["mode"] == "forward" and "subdivision" in entry["computes"]  # the full computation
    session = ort.InferenceSession(str(folder / entry["file"]), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = windows(eager, n, seed=10 + n)
        with torch.no_grad():
            ref = eager.model(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == ref.shape
        assert float(np.abs(got - ref).max()) <= TOL


def test_guard_refuses_other_input_sizes(exports) -> None:
    bundle = ex.load_export(exports["2d"][1])
    h, w = bundle.patch_size
    x = torch.zeros(2, 1, h, w, requires_grad=True)
    assert not bundle.model(x).requires_grad  # no autograd graph, as forward_infer
    for shape in [(1, 1, h + 2, w), (1, 2, h, w), (1, 1, 1, h, w)]:
        with pytest.raises(torch.jit.Error, match=r"input must be \(N, 1, 24, 20\) float32"):
            bundle.model(torch.zeros(shape))


# ------------------------------------------------------------------------------ infer_seg -m DIR
def _labels_of(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.iterdir())}


def test_infer_from_the_export_equals_the_checkpoint_3d(exports, trained_checkpoint, tmp_path) -> None:
    data, _ = trained_checkpoint
    ckpt, folder = exports["3d"]
    images = [str(sorted((data / "images").iterdir())[0])]  # 36x38x34 > 32^3: 8 windows
    for name, model in (("ckpt", ckpt), ("export", folder)):
        assert infer_seg.main(["--device", "cpu", "-i", *images, "-o", str(tmp_path / name), "-m",
                               str(model), "--batch-size", "3"]) == 0  # batches of 3, 3, 2 windows
    a, b = _labels_of(tmp_path / "ckpt"), _labels_of(tmp_path / "export")
    assert list(a) == list(b) and len(a) == 1
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        assert set(np.unique(b[key]).tolist()) <= {0, 1, 4} and len(np.unique(b[key])) > 1
    ref = sitk.ReadImage(str(tmp_path / "ckpt" / Path(images[0]).name))
    got = sitk.ReadImage(str(tmp_path / "export" / Path(images[0]).name))
    assert got.GetSpacing() == ref.GetSpacing() and got.GetOrigin() == ref.GetOrigin()


def test_infer_2d_export_slices_a_volume_like_the_checkpoint(exports, tmp_path) -> None:
    ckpt, folder = exports["2d"]
    rng = np.random.default_rng(5)
    arr = rng.normal(0, 1, (27, 3, 31)).astype(np.float32)  # (Z, Y, X): slices along Y are 31x27
    arr[8:20, :, 10:22] += 3
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 2.0, 1.0))
    sitk.WriteImage(img, str(tmp_path / "vol.nii.gz"))
    for name, model in (("ckpt", ckpt), ("export", folder)):
        assert infer_seg.main(["--device", "cpu", "-i", str(tmp_path / "vol.nii.gz"), "-o",
                               str(tmp_path / name), "-m", str(model), "--tta"]) == 0
    a, b = _labels_of(tmp_path / "ckpt"), _labels_of(tmp_path / "export")
    np.testing.assert_array_equal(a["vol.nii.gz"], b["vol.nii.gz"])
    assert b["vol.nii.gz"].shape == arr.shape and len(np.unique(b["vol.nii.gz"])) > 1


# ------------------------------------------------------------------------------ manifest
@pytest.mark.parametrize("key", ["3d", "2d"])
def test_manifest_round_trips_the_bundle(exports, key) -> None:
    ckpt, folder = exports[key]
    eager, exported = load_for_inference(ckpt), ex.load_export(folder)
    for field in BUNDLE_FIELDS:
        assert getattr(exported, field) == getattr(eager, field), field
    manifest = json.loads((folder / ex.MANIFEST).read_text())
    assert manifest["format_version"] == ex.FORMAT_VERSION
    assert manifest["preprocessing"] == json.loads(json.dumps(eager.preprocessing.to_dict()))
    k, patch = len(eager.class_names), list(eager.patch_size)
    for entry in manifest["networks"].values():
        assert (folder / entry["file"]).is_file()
        assert entry["input"]["shape"] == ["N", eager.in_channels, *patch]
        assert entry["output"]["shape"] == ["N", k, *patch]
    assert sorted(p.name for p in folder.iterdir()) == sorted([ex.MANIFEST, ex.ONNX_FILE,
                                                               ex.TORCHSCRIPT_FILE])  # no temp left


def test_the_export_runs_with_torch_only(exports, tmp_path) -> None:
    """A fresh interpreter outside the repository, no PYTHONPATH: torch.jit.load and a forward
    give the eager logits, and none of our packages is imported."""
    ckpt, folder = exports["3d"]
    eager = load_for_inference(ckpt)
    x = windows(eager, 2, seed=7)
    with torch.no_grad():
        torch.save({"x": x, "y": eager.model(x)}, tmp_path / "io.pt")
    code = ("import sys, torch\n"
            f"m = torch.jit.load({str(folder / ex.TORCHSCRIPT_FILE)!r})\n"
            f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
            "with torch.no_grad():\n"
            "    y = m(io['x'])\n"
            "ours = sorted(n for n in sys.modules if n.split('.')[0] in ('seg', 'heads', 'backbones', 'hparam'))\n"
            "print('diff', float((y - io['y']).abs().max()), 'ours', ours)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert float(words[words.index("diff") + 1]) <= TOL
    assert proc.stdout.strip().endswith("ours []"), proc.stdout


# ------------------------------------------------------------------------------ errors, atomicity
def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _image(path: Path) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 9, 10), np.float32)), str(path))
    return path


def test_infer_with_a_folder_that_is_no_export(tmp_path, capsys) -> None:
    image, empty, out = _image(tmp_path / "a.nii.gz"), tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    assert infer_seg.main(["--device", "cpu", "-i", str(image), "-o", str(out), "-m", str(empty)]) == 2
    line = _one_error_line(capsys)
    assert str(empty) in line and "holds no export" in line
    assert not out.exists()


def test_infer_with_a_corrupt_manifest(exports, tmp_path, capsys) -> None:
    image, bad, out = _image(tmp_path / "a.nii.gz"), tmp_path / "bad", tmp_path / "out"
    bad.mkdir()
    text = (exports["2d"][1] / ex.MANIFEST).read_text()
    (bad / ex.MANIFEST).write_text(text[: len(text) // 2])  # truncated JSON
    assert infer_seg.main(["--device", "cpu", "-i", str(image), "-o", str(out), "-m", str(bad)]) == 2
    line = _one_error_line(capsys)
    assert str(bad / ex.MANIFEST) in line and "JSONDecodeError" in line
    assert not out.exists()
    # a valid manifest whose network file is truncated
    (bad / ex.MANIFEST).write_text(text)
    blob = (exports["2d"][1] / ex.TORCHSCRIPT_FILE).read_bytes()
    (bad / ex.TORCHSCRIPT_FILE).write_bytes(blob[: len(blob) // 3])
    assert infer_seg.main(["--device", "cpu", "-i", str(image), "-o", str(out), "-m", str(bad)]) == 2
    line = _one_error_line(capsys)
    assert str(bad / ex.TORCHSCRIPT_FILE) in line and "not a readable TorchScript file" in line
    assert not out.exists()


def test_export_of_a_file_that_is_no_checkpoint(tmp_path, capsys) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "weights.pt")
    blob = (tmp_path / "weights.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    for name, says in (("truncated.pt", "not a readable checkpoint"),
                       ("weights.pt", "not a segmentation checkpoint"),
                       ("missing.pt", "checkpoint not found")):
        out = tmp_path / f"out_{name}"
        assert ex.main([str(tmp_path / name), "-o", str(out)]) == 2
        line = _one_error_line(capsys)
        assert name in line and says in line
        assert not out.exists()


def test_export_refuses_to_replace_an_export_without_overwrite(exports, tmp_path, capsys) -> None:
    ckpt, folder = exports["2d"]
    target = tmp_path / "exp"
    shutil.copytree(folder, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    assert ex.main([str(ckpt), "-o", str(target)]) == 2
    line = _one_error_line(capsys)
    assert str(target) in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_a_failed_export_leaves_nothing_under_the_final_names(exports, tmp_path, monkeypatch) -> None:
    ckpt, folder = exports["2d"]

    def crash(*args, **kwargs):
        raise RuntimeError("injected failure after the TorchScript file was written")

    monkeypatch.setattr(ex, "_export_onnx", crash)
    fresh = tmp_path / "new" / "fresh"
    with pytest.raises(RuntimeError, match="injected"):
        ex.export_checkpoint(ckpt, fresh)
    assert not (tmp_path / "new").exists()  # created by the export, removed with its temporary folder
    kept = tmp_path / "kept"  # a folder with other content and an earlier export, --overwrite
    shutil.copytree(folder, kept)
    (kept / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    with pytest.raises(RuntimeError, match="injected"):
        ex.export_checkpoint(ckpt, kept, overwrite=True)
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before  # the earlier export intact


def test_an_unfaithful_trace_is_refused(exports, tmp_path, monkeypatch, capsys) -> None:
    ckpt, _ = exports["2d"]
    monkeypatch.setattr(ex, "_max_diffs", lambda *args: {"1": 0.0, "3": 0.5})
    out = tmp_path / "out"
    assert ex.main([str(ckpt), "-o", str(out), "--no-onnx"]) == 2
    line = _one_error_line(capsys)
    assert ckpt.name in line and "cannot be exported faithfully" in line and "0.5" in line
    assert not out.exists()


def test_onnx_falls_back_to_coarse_then_is_skipped(exports, tmp_path, monkeypatch, caplog) -> None:
    """Where the subdivision cannot go to ONNX, the file holds the coarse logits and says so; where
    nothing can, there is no ONNX file and one warning line."""
    ort = pytest.importorskip("onnxruntime")
    ckpt, _ = exports["2d"]
    real = ex._onnx_file

    def no_subdivision(net, bundle, path):
        if not isinstance(net, ex.CoarseOnly):
            raise RuntimeError("Exporting the operator 'aten::scatter' is not supported")
        return real(net, bundle, path)

    monkeypatch.setattr(ex, "_onnx_file", no_subdivision)
    caplog.set_level(logging.INFO, logger="seg.export")
    result = ex.export_checkpoint(ckpt, tmp_path / "coarse")
    entry = result.manifest["networks"]["onnx"]
    assert entry["mode"] == "coarse" and "WITHOUT PointRend subdivision" in entry["computes"]
    assert any("coarse logits only" in r.message and "aten::scatter" in r.message
               for r in caplog.records if r.levelno == logging.WARNING)
    eager = load_for_inference(ckpt)
    x = windows(eager, 3, seed=3)
    session = ort.InferenceSession(str(tmp_path / "coarse" / ex.ONNX_FILE), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = eager.model.forward_infer(x, mode="coarse").numpy()
    assert float(np.abs(session.run(None, {"image": x.numpy()})[0] - ref).max()) <= TOL

    def nothing(*args):
        raise RuntimeError("Unsupported: ONNX export of operator grid_sampler")

    monkeypatch.setattr(ex, "_onnx_file", nothing)
    caplog.clear()
    result = ex.export_checkpoint(ckpt, tmp_path / "none")
    assert result.manifest["networks"]["onnx"]["file"] is None
    assert "grid_sampler" in result.manifest["networks"]["onnx"]["skipped"]
    assert sorted(p.name for p in (tmp_path / "none").iterdir()) == [ex.MANIFEST, ex.TORCHSCRIPT_FILE]
    warns = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1 and warns[0].startswith("ONNX skipped") and "\n" not in warns[0]
    assert ex.load_export(tmp_path / "none").patch_size == (24, 20)  # the TorchScript side is whole


def test_mask_head_model_exports_at_any_batch(tmp_path) -> None:
    """The mask head sampled its region per image in a Python loop, which a trace froze at the
    traced batch size; whole-input regions are now one batched sample."""
    config = {**MODEL_2D, "head": "mask", "head_kwargs": {"fc_dim": 16},
              "pointrend": point_options(fc_dim=16, subdivision_num_points=128)}
    ckpt = save_2d_checkpoint(tmp_path / "mask.pt", config, patch=(32, 32))
    result = ex.export_checkpoint(ckpt, tmp_path / "exp", onnx=False)
    assert max(result.manifest["networks"]["torchscript"]["max_abs_diff_vs_eager"].values()) <= TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cpu_export_runs_on_cuda(exports) -> None:
    """Exported on the CPU, loaded with map_location='cuda': the traced graph follows the input's
    device (no CPU tensor frozen into it) and matches the eager model on the same device."""
    ckpt, folder = exports["3d"]
    eager, exported = load_for_inference(ckpt, "cuda"), ex.load_export(folder, "cuda")
    x = windows(eager, 3, seed=5).cuda()
    with torch.no_grad():
        ref, got = eager.model(x), exported.model(x)
    assert got.device.type == "cuda" and float((got - ref).abs().max()) <= TOL
