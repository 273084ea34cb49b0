"""Exported models (``python -m seg.export``): TorchScript and ONNX against the eager model, the
manifest, ``infer_seg.py -m DIR`` against ``-m CHECKPOINT``, the error contract, atomic writes, and
the TorchScript file running with torch alone.

Models: the session fixture ``trained_checkpoint`` (a real 4-step 3D training run of the default
model: U-Net head, PointRend with the image cube and the fine stem, labels {0, 1, 4}), and an
untrained 2D model saved the way ``seg.train`` saves one (slice axis 1, PointRend on).
"""
from __future__ import annotations

import hashlib
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
from helpers import point_options
from seg import export as ex
from seg.checkpoint import FORMAT_VERSION, load_for_inference
from seg.errors import UserError

TOL = 1e-4
BUNDLE_FIELDS = ("spatial_dims", "patch_size", "slice_axis", "preprocessing", "class_names",
                 "in_channels", "mirror_axes", "label_values")
MODEL_2D = dict(spatial_dims=2, in_channels=1, num_classes=3, backbone="convnext_atto",
                backbone_kwargs={"kernel_size": 3}, head="unet", head_kwargs={},
                pointrend=point_options(image_features="cube", fc_dim=32,
                                        coarse_pred_each_layer=True, subdivision_num_points=96))


def save_2d_checkpoint(path: Path, model_config: dict = MODEL_2D, patch=(24, 20)) -> Path:
    """An untrained 2D checkpoint in the layout ``seg.train`` writes (slice axis 1, labels {0,1,4})."""
    from seg.model import build_model
    from seg.preprocess import Preprocessing

    torch.manual_seed(0)
    model = build_model(**model_config)
    torch.save({"format_version": FORMAT_VERSION, "model": model.state_dict(), "model_config": model_config,
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
    exported = ex.load_export(folder, unsafe_load=True)
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
    bundle = ex.load_export(exports["2d"][1], unsafe_load=True)
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
                               str(model), "--batch-size", "3", "--unsafe-load"]) == 0  # batches of 3, 3, 2 windows
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
                               str(tmp_path / name), "-m", str(model), "--tta", "--unsafe-load"]) == 0
    a, b = _labels_of(tmp_path / "ckpt"), _labels_of(tmp_path / "export")
    np.testing.assert_array_equal(a["vol.nii.gz"], b["vol.nii.gz"])
    assert b["vol.nii.gz"].shape == arr.shape and len(np.unique(b["vol.nii.gz"])) > 1


# ------------------------------------------------------------------------------ manifest
@pytest.mark.parametrize("key", ["3d", "2d"])
def test_manifest_round_trips_the_bundle(exports, key) -> None:
    ckpt, folder = exports[key]
    eager, exported = load_for_inference(ckpt), ex.load_export(folder, unsafe_load=True)
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
    # a valid manifest whose network file is truncated, its sha256 recorded
    blob = (exports["2d"][1] / ex.TORCHSCRIPT_FILE).read_bytes()
    (bad / ex.TORCHSCRIPT_FILE).write_bytes(blob[: len(blob) // 3])
    manifest = json.loads(text)
    manifest["networks"]["torchscript"]["sha256"] = hashlib.sha256(blob[: len(blob) // 3]).hexdigest()
    (bad / ex.MANIFEST).write_text(json.dumps(manifest))
    assert infer_seg.main(["--device", "cpu", "-i", str(image), "-o", str(out), "-m", str(bad),
                           "--unsafe-load"]) == 2
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
    assert ex.load_export(tmp_path / "none", unsafe_load=True).patch_size == (24, 20)  # the TorchScript side is whole


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
    eager, exported = load_for_inference(ckpt, "cuda"), ex.load_export(folder, "cuda", unsafe_load=True)
    x = windows(eager, 3, seed=5).cuda()
    with torch.no_grad():
        ref, got = eager.model(x), exported.model(x)
    assert got.device.type == "cuda" and float((got - ref).abs().max()) <= TOL


# ------------------------------------------------------------------------------ trust: opt-in, names, hashes, fields
@pytest.fixture(scope="module")
def small_export(tmp_path_factory) -> Path:
    """A 2D export (patch 24x20, classes background/outer/inner, labels 0/1/4), TorchScript only."""
    root = tmp_path_factory.mktemp("small_export")
    ex.export_checkpoint(save_2d_checkpoint(root / "model2d.pt"), root / "export", onnx=False)
    return root / "export"


def _copy(folder: Path, target: Path, edit=None) -> Path:
    """``folder`` hard-linked to ``target`` (the network file shared), its manifest rewritten by ``edit``."""
    shutil.copytree(folder, target, copy_function=os.link)
    if edit is not None:
        manifest = json.loads((folder / ex.MANIFEST).read_text())
        edit(manifest)
        (target / ex.MANIFEST).unlink()  # a new file, not the fixture's through the hard link
        (target / ex.MANIFEST).write_text(json.dumps(manifest))
    return target


def _infer(model: Path, tmp_path: Path, *extra: str) -> tuple[int, Path]:
    """``infer_seg.py`` on one zero volume with ``model``; (exit status, output folder)."""
    image, out = _image(tmp_path / "a.nii.gz"), tmp_path / "out"
    return infer_seg.main(["--device", "cpu", "-i", str(image), "-o", str(out), "-m", str(model), *extra]), out


def test_an_export_loads_only_with_unsafe_load(small_export, tmp_path, capsys) -> None:
    """A TorchScript file is a program: without the opt-in nothing is loaded or written."""
    from seg.predict import Predictor

    rc, out = _infer(small_export, tmp_path)
    assert rc == 2 and not out.exists()
    assert _one_error_line(capsys) == (
        f"error: {small_export / ex.TORCHSCRIPT_FILE}: is a TorchScript program: loading and running it "
        "runs code stored in the file (its sha256 shows only that it is the file export.json names). If "
        "you trust this export, load it with --unsafe-load (unsafe_load=True)")
    for load in (ex.load_export, Predictor.from_checkpoint):
        with pytest.raises(UserError, match=r"is a TorchScript program.*--unsafe-load"):
            load(small_export)
    rc, out = _infer(small_export, tmp_path, "--unsafe-load")
    assert rc == 0 and sorted(p.name for p in out.iterdir()) == ["a.nii.gz"]


def test_help_says_export_folders_need_unsafe_load(monkeypatch, capsys) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside the phrases
    with pytest.raises(SystemExit):
        infer_seg.parse_args(["--help"])
    text = capsys.readouterr().out
    assert ("an export folder from python -m seg.export (its network is a TorchScript program: loads "
            "only with --unsafe-load)") in text
    assert ("also needed to load an export folder (-m DIR): its network is a TorchScript program, "
            "which runs code stored in the file") in text


def test_the_manifest_records_the_sha256_of_each_network_file(exports) -> None:
    for _, folder in exports.values():
        networks = json.loads((folder / ex.MANIFEST).read_text())["networks"]
        assert sorted(networks) == ["onnx", "torchscript"]
        for entry in networks.values():
            assert entry["sha256"] == hashlib.sha256((folder / entry["file"]).read_bytes()).hexdigest()


def test_a_changed_network_file_is_refused(small_export, tmp_path, capsys) -> None:
    folder = tmp_path / "changed"
    shutil.copytree(small_export, folder)  # a real copy: the file is changed below
    blob = (folder / ex.TORCHSCRIPT_FILE).read_bytes() + b"\0"  # still a loadable zip
    (folder / ex.TORCHSCRIPT_FILE).write_bytes(blob)
    rc, out = _infer(folder, tmp_path, "--unsafe-load")
    assert rc == 2 and not out.exists()
    assert _one_error_line(capsys) == (
        f"error: {folder / ex.TORCHSCRIPT_FILE}: sha256 {hashlib.sha256(blob).hexdigest()} differs from "
        "the one export.json records: the file was changed or replaced after the export (export the "
        "checkpoint again)")


@pytest.mark.parametrize("key", ["torchscript", "onnx"])
@pytest.mark.parametrize("name", ["ABSOLUTE", "../export/model.torchscript.pt", "sub/model.torchscript.pt",
                                  "..", ".model.pt", "sub\\model.pt", "C:model.pt", ""])
def test_network_files_are_plain_names_inside_the_folder(small_export, tmp_path, capsys, key, name) -> None:
    """Before, an absolute path in export.json loaded and ran a file outside the folder."""
    name = str(small_export / ex.TORCHSCRIPT_FILE) if name == "ABSOLUTE" else name
    sha = hashlib.sha256((small_export / ex.TORCHSCRIPT_FILE).read_bytes()).hexdigest()

    def edit(m):
        m["networks"][key] = {**m["networks"]["torchscript"], "file": name, "sha256": sha}

    folder = _copy(small_export, tmp_path / "exp", edit)
    (folder / "sub").mkdir()
    os.link(small_export / ex.TORCHSCRIPT_FILE, folder / "sub" / ex.TORCHSCRIPT_FILE)
    rc, out = _infer(folder, tmp_path, "--unsafe-load")
    assert rc == 2 and not out.exists()
    assert _one_error_line(capsys) == (
        f"error: {folder / ex.MANIFEST}: networks.{key}.file {ex._show(name)}: must be a plain file name "
        "inside the export folder (letters, digits, '.', '_', '-'; no folder, no absolute path)")


def test_a_network_file_linking_outside_the_folder_is_refused(small_export, tmp_path, capsys) -> None:
    folder = _copy(small_export, tmp_path / "exp")
    outside = tmp_path / "elsewhere.pt"
    os.replace(folder / ex.TORCHSCRIPT_FILE, outside)
    (folder / ex.TORCHSCRIPT_FILE).symlink_to(outside)
    rc, out = _infer(folder, tmp_path, "--unsafe-load")
    assert rc == 2 and not out.exists()
    assert _one_error_line(capsys) == (f"error: {folder / ex.TORCHSCRIPT_FILE}: links to {outside.resolve()}, "
                                       "outside the export folder: refused")


def _set(path: str, value):
    """An edit setting the manifest field ``path`` ('a.b' for nested fields; value DELETE removes it)."""
    def edit(m):
        *parents, last = path.split(".")
        for p in parents:
            m = m[p]
        if value is DELETE:
            del m[last]
        else:
            m[last] = value
    return edit


DELETE = object()
TWO_CLASSES = "class_names: 2 classes named (num_classes, label_values), but model.torchscript.pt gives 3 " \
              "(logits (1, 3, 24, 20) for one window)"
CT_RULE = "channel 0 is normalised 'ct', which needs finite mean, std, clip_low, clip_high (std >= 0, " \
          "clip_low <= clip_high)"
LABEL_RULE = "must be null or 3 distinct label values (one per class name) a uint16 label map holds"
AXES_RULE = "must be null or distinct spatial axes in 0..1"
TAKES = "does not fit the network: model.torchscript.pt takes windows (N, 1, 24, 20)"
TAMPERED = {  # id: (edits, the error after '<DIR>/export.json: ')
    "classes cut, label_values [0, 1]": ([_set("class_names", ["background", "outer"]), _set("num_classes", 2),
                                         _set("label_values", [0, 1])], TWO_CLASSES),
    "classes cut, label_values null": ([_set("class_names", ["background", "outer"]), _set("num_classes", 2),
                                       _set("label_values", None)], TWO_CLASSES),
    "classes cut, num_classes stale": ([_set("class_names", ["background", "outer"]), _set("label_values", None)],
                                       "num_classes 3: must equal the number of class_names (2)"),
    "ct, statistics incomplete": ([_set("preprocessing.normalization", "ct"),
                                   _set("preprocessing.intensity_stats", [{"mean": 0.0, "std": 1.0}])],
                                  f"preprocessing.intensity_stats[0] {{'mean': 0.0, 'std': 1.0}}: {CT_RULE}"),
    "ct, no statistics": ([_set("preprocessing.normalization", ["ct"])],
                          f"preprocessing.intensity_stats[0] None: {CT_RULE}"),
    "ct, clip inverted": ([_set("preprocessing.normalization", "ct"), _set("preprocessing.intensity_stats", [
        {"mean": 0.0, "std": 1.0, "clip_low": 5.0, "clip_high": -5.0}])],
        f"preprocessing.intensity_stats[0] {{'clip_high': -5.0, 'clip_low': 5.0, 'mean': 0.0, 'std': 1.0}}: "
        f"{CT_RULE}"),
    "patch edited": ([_set("patch_size", [20, 20])], f"patch_size [20, 20] {TAKES}"),
    "in_channels edited": ([_set("in_channels", 2)], f"in_channels 2 {TAKES}"),
    "spatial_dims edited": ([_set("spatial_dims", 3)],
                            "patch_size [24, 20]: must be 3 positive integers (spatial_dims 3)"),
    "mirror axis 5": ([_set("mirror_axes", [0, 5])], f"mirror_axes [0, 5]: {AXES_RULE}"),
    "mirror axis twice": ([_set("mirror_axes", [1, 1])], f"mirror_axes [1, 1]: {AXES_RULE}"),
    "label value twice": ([_set("label_values", [0, 1, 1])], f"label_values [0, 1, 1]: {LABEL_RULE}"),
    "label value 70000": ([_set("label_values", [0, 1, 70000])], f"label_values [0, 1, 70000]: {LABEL_RULE}"),
    "label value negative": ([_set("label_values", [0, -1, 4])], f"label_values [0, -1, 4]: {LABEL_RULE}"),
    "patch_size a string": ([_set("patch_size", "24x20")],
                            "patch_size '24x20': must be 2 positive integers (spatial_dims 2)"),
    "in_channels a bool": ([_set("in_channels", True)], "in_channels True: must be a positive integer"),
    "class_names a string": ([_set("class_names", "background")],
                             "class_names 'background': must be a list of non-empty names, background first"),
    "slice_axis 3": ([_set("slice_axis", 3)], "slice_axis 3: must be null or an axis 0, 1 or 2"),
    "preprocessing a list": ([_set("preprocessing", [])], "preprocessing []: must be an object"),
    "preprocessing, unknown field": ([_set("preprocessing.gamma", 1.0)], "preprocessing ['gamma']: unknown "
                                     "field(s) (known: normalization, intensity_stats, ct_window, target_spacing)"),
    "normalization unknown": ([_set("preprocessing.normalization", "zscore2")], "NORMALIZATION"),
    "normalization per channel, 2 of 1": ([_set("preprocessing.normalization", ["zscore", "zscore"])],
                                           "NORMALIZATION"),
    "ct_window inverted": ([_set("preprocessing.ct_window", [100, 0])],
                           "preprocessing.ct_window [100, 0]: must be [low, high], finite, low < high"),
    "target_spacing negative": ([_set("preprocessing.target_spacing", [1.0, -1.0])],
                                "preprocessing.target_spacing [1.0, -1.0]: must be null or 2 or 3 positive "
                                "spacings (mm)"),
    "networks a list": ([_set("networks", [])], "networks []: must be an object with a 'torchscript' entry"),
    "sha256 missing": ([_set("networks.torchscript.sha256", DELETE)],
                       "networks.torchscript.sha256 None: must be the file's sha256 (64 lowercase hex digits)"),
    "output shape stale": ([_set("networks.torchscript.output.shape", ["N", 2, 24, 20])],
                           "networks.torchscript.output.shape ['N', 2, 24, 20]: must be ['N', 3, 24, 20] (from "
                           "in_channels, class_names and patch_size)"),
    "format_version 1": ([_set("format_version", 1)], "export format_version 1; this version reads 2 (written "
                         "before file hashes were recorded: export the checkpoint again)"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_manifest_is_one_line_naming_the_field(small_export, tmp_path, capsys, case) -> None:
    """Every field is checked before the first case (the network's class count and input shape by
    one dry run); before, these wrote unnamed labels (exit 0) or ended in tracebacks."""
    from seg.preprocess import NORMALIZATIONS

    edits, expected = TAMPERED[case]
    folder = _copy(small_export, tmp_path / "exp", lambda m: [e(m) for e in edits])
    if expected == "NORMALIZATION":
        value = json.loads((folder / ex.MANIFEST).read_text())["preprocessing"]["normalization"]
        expected = (f"preprocessing.normalization {value!r}: must be one of {', '.join(NORMALIZATIONS)}, or "
                    "a list with one per input channel (1)")
    rc, out = _infer(folder, tmp_path, "--unsafe-load", "--tta")
    assert rc == 2 and not out.exists()
    assert _one_error_line(capsys) == f"error: {folder / ex.MANIFEST}: {expected}"


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000,
                                  '{"format_version": 2, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"],
                         ids=["nested array", "nested field"])
def test_a_deeply_nested_manifest_is_one_line(small_export, tmp_path, capsys, text) -> None:
    folder = _copy(small_export, tmp_path / "exp")
    (folder / ex.MANIFEST).unlink()
    (folder / ex.MANIFEST).write_text(text)
    rc, out = _infer(folder, tmp_path, "--unsafe-load")
    assert rc == 2 and not out.exists()
    assert _one_error_line(capsys) == f"error: {folder / ex.MANIFEST}: not a readable export manifest (JSON " \
                                      "nested too deeply)"
