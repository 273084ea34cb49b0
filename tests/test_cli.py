"""The error contract of the three command lines, end to end (subprocesses).

A user error (bad option, bad file, unusable checkpoint, colliding outputs) is one ``error:`` line
naming the file or field, exit status 2, and nothing written; anything else (a bug, injected here)
shows its traceback and exits with status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from helpers import write_case
from seg.checkpoint import FORMAT_VERSION

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
TINY_MODEL = dict(spatial_dims=3, in_channels=1, num_classes=2, backbone="convnext_atto",
                  backbone_kwargs={}, head="deeplab", head_kwargs={}, pointrend=None)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=ENV,
                          timeout=300)


def run_injected(patch: str, entry: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``entry`` (a script path, or ``-m module``) after ``patch`` made an internal function
    raise ``ValueError("injected internal bug")``."""
    runner = (f"runpy.run_module({entry[3:]!r}, run_name='__main__', alter_sys=True)" if entry.startswith("-m ")
              else f"sys.argv[0] = {entry!r}; runpy.run_path({entry!r}, run_name='__main__')")
    code = ("import runpy, sys\n"
            "def boom(*args, **kwargs):\n"
            "    raise ValueError('injected internal bug')\n"
            f"{patch}\n{runner}\n")
    return run("-c", code, *args)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a user error (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def assert_internal_error(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" in proc.stderr and "ValueError: injected internal bug" in proc.stderr
    assert not [l for l in proc.stderr.splitlines() if l.startswith("error:")]


def write_image(path: Path, shape=(12, 10, 7)) -> None:
    rng = np.random.default_rng(0)
    img = sitk.GetImageFromArray(rng.normal(100, 20, shape[::-1]).astype(np.float32))
    img.SetSpacing((1.0, 1.2, 2.0))
    sitk.WriteImage(img, str(path))


def save_checkpoint(path: Path, **extra) -> Path:
    """A real (untrained) checkpoint of a tiny 3D model in the layout seg.train writes."""
    from seg.model import build_model
    from seg.preprocess import Preprocessing

    torch.manual_seed(0)
    model = build_model(**TINY_MODEL)
    torch.save({"format_version": FORMAT_VERSION, "model": model.state_dict(), "model_config": TINY_MODEL,
                "spatial_dims": 3, "patch_size": (32, 32, 32), "slice_axis": None,
                "preprocessing": Preprocessing("zscore").to_dict(), "class_names": ["background", "fg"],
                "in_channels": 1, "mirror_axes": [0, 1, 2], **extra}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpt")
    return {"safe": save_checkpoint(d / "tiny.pt"),
            # a file whose unpickling needs a class outside the allow-list, as foreign checkpoints do
            "unsafe": save_checkpoint(d / "foreign.pt", args=argparse.Namespace(lr=0.1))}


def infer(*args: str) -> subprocess.CompletedProcess:
    return run("infer_seg.py", "--device", "cpu", *args)


# ------------------------------------------------------------------------------- infer_seg.py
def test_two_inputs_one_output_is_refused_before_writing(tmp_path, checkpoints) -> None:
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "a.nrrd")
    write_image(tmp_path / "in" / "a.mha")
    out = tmp_path / "out"
    line = one_error_line(infer("-i", str(tmp_path / "in"), "-o", str(out), "-m", str(checkpoints["safe"]),
                                "--format", "nii.gz"))
    assert "a.nrrd" in line and "a.mha" in line and "a.nii.gz" in line
    assert not out.exists()


@pytest.mark.parametrize("how", ["same", "dotdot", "symlink"])
def test_output_folder_resolving_to_the_input_folder_is_refused(tmp_path, checkpoints, how) -> None:
    src = tmp_path / "in"
    src.mkdir()
    write_image(src / "a.nrrd")
    out = {"same": src, "dotdot": src / ".." / "in", "symlink": tmp_path / "link"}[how]
    if how == "symlink":
        out.symlink_to(src, target_is_directory=True)
    line = one_error_line(infer("-i", str(src), "-o", str(out), "-m", str(checkpoints["safe"]),
                                "--suffix", "_seg"))
    assert str(out) in line and "input folder" in line
    assert sorted(p.name for p in src.iterdir()) == ["a.nrrd"]


def test_output_over_an_input_file_is_refused(tmp_path, checkpoints) -> None:
    write_image(tmp_path / "a.nrrd")
    before = (tmp_path / "a.nrrd").read_bytes()
    line = one_error_line(infer("-i", str(tmp_path / "a.nrrd"), "-o", str(tmp_path), "-m",
                                str(checkpoints["safe"])))
    assert "a.nrrd" in line and "overwrite the input" in line
    assert (tmp_path / "a.nrrd").read_bytes() == before


def test_checkpoint_needing_unpickling_requires_the_opt_in(tmp_path, checkpoints) -> None:
    write_image(tmp_path / "a.nrrd")
    out = tmp_path / "out"
    args = ("-i", str(tmp_path / "a.nrrd"), "-o", str(out), "-m", str(checkpoints["unsafe"]))
    line = one_error_line(infer(*args))
    assert "foreign.pt" in line and "--unsafe-load" in line and "arbitrary code" in line
    assert "argparse.Namespace" in line
    assert not out.exists()
    proc = infer(*args, "--unsafe-load")
    assert proc.returncode == 0, proc.stderr
    assert "unpickled in full" in proc.stderr  # said, not silent
    assert [p.name for p in out.iterdir()] == ["a.nrrd"]


def test_format_1_checkpoint_is_refused_in_one_line(tmp_path) -> None:
    # format 1 had two learned branches on the input (U-Net stage, FineStem): no weights convert
    write_image(tmp_path / "a.nrrd")
    old = save_checkpoint(tmp_path / "old.pt", format_version=1)
    out = tmp_path / "out"
    line = one_error_line(infer("-i", str(tmp_path / "a.nrrd"), "-o", str(out), "-m", str(old)))
    assert "old.pt" in line and "checkpoint format 1" in line and "git checkout" in line
    assert not out.exists()
    from hparam import Config
    from seg.checkpoint import resume_config
    from seg.errors import UserError
    with pytest.raises(UserError, match="checkpoint format 1"):  # resuming: before its config is read
        resume_config(Config(), str(save_checkpoint(tmp_path / "old_run.pt", format_version=1,
                                                    config={"model": {"fine_stem_channels": 16}},
                                                    iteration=5)), [])


def test_suffix_that_is_a_path_is_refused_before_writing(tmp_path, checkpoints) -> None:
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "a.nrrd")
    out = tmp_path / "work" / "out"
    line = one_error_line(infer("-i", str(tmp_path / "in"), "-o", str(out), "-m", str(checkpoints["safe"]),
                                "--suffix", "/../../x"))
    assert "--suffix '/../../x'" in line
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert written == ["in", os.path.join("in", "a.nrrd")]  # nothing inside the output folder or outside it


@pytest.mark.parametrize("suffix", ["../x", "_seg/x", "..", "\\x", "_a..b"])
def test_suffix_is_only_a_suffix(tmp_path, suffix) -> None:
    from seg.errors import UserError
    from seg.io import Case
    from seg.predict import output_path

    case = Case("a", (tmp_path / "a.nrrd",))
    assert output_path(case, tmp_path / "out", "_seg.v2") == tmp_path / "out" / "a_seg.v2.nrrd"
    with pytest.raises(UserError, match="no path separators, no '..'"):
        output_path(case, tmp_path / "out", suffix)


def test_infer_internal_error_shows_the_traceback(tmp_path, checkpoints) -> None:
    write_image(tmp_path / "a.nrrd")
    out = tmp_path / "out"
    proc = run_injected("import seg.predict; seg.predict.Predictor.predict_file = boom", "infer_seg.py",
                        "--device", "cpu", "-i", str(tmp_path / "a.nrrd"), "-o", str(out),
                        "-m", str(checkpoints["safe"]))
    assert_internal_error(proc)
    assert not out.exists() or not list(out.iterdir())


# ------------------------------------------------------------------------------- train_seg.py
def dataset(root: Path) -> list[str]:
    rng = np.random.default_rng(3)
    for name in ("c0", "c1"):
        write_case(root, name, rng)
    return [f"data.root='{root}'", "data.images_dir=images", "data.labels_dir=labels",
            "data.val_images_dir=None", "data.val_labels_dir=None", "train.iterations=1", "data.patch_size=(32, 32, 32)"]


def assert_no_run_written(out: Path) -> None:
    written = {p.name for p in out.iterdir()} if out.exists() else set()
    assert not written & {"last.pt", "best.pt", "train_log.csv", "val_log.csv", "tensorboard"}, written


@pytest.mark.parametrize("bad, field", [
    ("train.lr='fast'", "train.lr"),
    ("data.ct_window=(500.0, -500.0)", "data.ct_window"),
    ("model.backbone=convnext_tiniest", "model.backbone"),
])
def test_train_config_errors_name_the_field(tmp_path, bad, field) -> None:
    out = tmp_path / "run"
    line = one_error_line(run("train_seg.py", "--no-progress", "--set", f"train.output_dir='{out}'", bad))
    assert field in line
    assert not out.exists()


def test_train_config_file_whose_get_config_fails(tmp_path) -> None:
    cfg = tmp_path / "my_config.py"
    cfg.write_text("def get_config():\n    raise KeyError('oops')\n")
    line = one_error_line(run("train_seg.py", "--config", str(cfg)))
    assert "my_config.py" in line and "get_config" in line


@pytest.mark.parametrize("backbone", ["convnext_atto", "repvgg_a0"])
def test_train_unknown_backbone_option_is_a_config_error(tmp_path, backbone) -> None:
    """Both families (one used to raise ValueError, the other ConfigError) answer the same way."""
    out = tmp_path / "run"
    line = one_error_line(run("train_seg.py", "--no-progress", "--set", *dataset(tmp_path / "ds"),
                              f"train.output_dir='{out}'", f"model.backbone={backbone}",
                              "model.backbone_kwargs={'drop_path': 0.1}"))
    assert "'drop_path'" in line and "Did you mean 'drop_path_rate'" in line
    assert_no_run_written(out)


def test_resume_from_a_checkpoint_needing_unpickling(tmp_path, checkpoints) -> None:
    out = tmp_path / "run"
    args = ("train_seg.py", "--no-progress", "--resume", str(checkpoints["unsafe"]), "--set",
            *dataset(tmp_path / "ds"), f"train.output_dir='{out}'")
    line = one_error_line(run(*args))
    assert "foreign.pt" in line and "--unsafe-load" in line and "arbitrary code" in line
    assert_no_run_written(out)
    # opted in, the file is read and the next check speaks: its weights are not this run's model
    line = one_error_line(run(*args, "--unsafe-load"))
    assert "foreign.pt" in line and "cannot resume" in line
    assert_no_run_written(out)


def test_plan_only_obeys_the_output_folder_rule(tmp_path) -> None:
    """--plan-only writes plan.json and fingerprint.json where training would: a folder holding
    another run is refused (its plan stays that run's), unless --overwrite replaces the run."""
    out = tmp_path / "run"
    out.mkdir()
    run_files = {"last.pt": b"weights", "train_log.csv": b"iteration\n1\n", "plan.json": b'{"run": "old"}'}
    for name, data in run_files.items():
        (out / name).write_bytes(data)
    args = ("train_seg.py", "--plan-only", "--no-progress", "--set", *dataset(tmp_path / "ds"),
            f"train.output_dir='{out}'")
    line = one_error_line(run(*args))
    assert str(out) in line and "holds another run" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == run_files  # untouched
    proc = run(*args, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["fingerprint.json", "plan.json"]  # the old run is gone
    assert "decisions" in json.loads((out / "plan.json").read_text())
    proc = run(*args)  # a folder holding only a plan holds no run: planned again, no --overwrite needed
    assert proc.returncode == 0, proc.stderr


def test_resume_from_another_working_folder(tmp_path) -> None:
    """A run started with a relative --config (whose data.root is relative to it) resumes from any
    working folder: the checkpoint stores its paths absolute."""
    from seg.checkpoint import load_checkpoint
    from helpers import tiny_sets

    sets = [s for s in tiny_sets(tmp_path / "ds", tmp_path / "run", 3, iterations=1) if not s.startswith("data.root=")]
    sets.append("data.root='../../ds'")  # relative to the config file's folder
    rng = np.random.default_rng(0)
    for i in range(4):
        write_case(tmp_path / "ds", f"case{i}", rng)
    (tmp_path / "a" / "cfg").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "cfg" / "config.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from hparam import Config\nfrom seg.config import apply_overrides\n\n\n"
        f"def get_config():\n    return apply_overrides(Config(), {sets!r})\n")

    def train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "train_seg.py"), "--no-progress", *args],
                              capture_output=True, text=True, cwd=cwd, env=ENV, timeout=600)

    proc = train(tmp_path / "a", "--config", os.path.join("cfg", "config.py"))
    assert proc.returncode == 0, proc.stderr
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["config_source"] == str(tmp_path / "a" / "cfg" / "config.py")
    assert ckpt["config"]["data"]["root"] == str(tmp_path / "ds")
    assert ckpt["config"]["train"]["output_dir"] == str(tmp_path / "run")
    proc = train(tmp_path / "b", "--resume", str(tmp_path / "run" / "last.pt"), "--set", "train.iterations=2")
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 2


def test_checkpoint_paths_are_absolute(tmp_path, monkeypatch) -> None:
    from hparam import Config
    from seg.config import apply_overrides
    from seg.config import Provenance, anchored, stored_config

    monkeypatch.chdir(tmp_path)
    cfg = apply_overrides(Config(), ["data.root='ds'", "model.pretrained='weights/w.pt'", "train.output_dir='runs/x'"])
    source = Provenance(str(tmp_path / "conf" / "hparam.py"))  # relative data.root: against the config's folder
    stored = stored_config(anchored(cfg, source))
    assert stored["data"]["root"] == str(tmp_path / "conf" / "ds")
    assert stored["model"]["pretrained"] == str(tmp_path / "weights" / "w.pt")
    assert stored["train"]["output_dir"] == str(tmp_path / "runs" / "x")
    assert stored["data"]["images_dir"] == "imagesTr"  # folders under data.root stay relative to it
    assert cfg.data.root == "ds"  # the config itself is not changed


def test_train_internal_error_shows_the_traceback(tmp_path) -> None:
    out = tmp_path / "run"
    proc = run_injected("import seg.train; seg.train.find_data = boom", "train_seg.py",
                        "--no-progress", "--set", f"train.output_dir='{out}'")
    assert_internal_error(proc)
    assert_no_run_written(out)


def test_a_user_error_under_debug_shows_its_traceback(tmp_path) -> None:
    proc = run("train_seg.py", "--debug", "--set", "train.lr='fast'")
    assert proc.returncode == 1 and "ConfigError" in proc.stderr and "Traceback" in proc.stderr


# ------------------------------------------------------------------------ python -m seg.evaluate
def evaluation_folders(root: Path) -> list[str]:
    for sub in ("pred", "label"):
        (root / sub).mkdir(parents=True)
        img = sitk.GetImageFromArray(np.pad(np.ones((3, 4, 5), np.uint8), 2))
        sitk.WriteImage(img, str(root / sub / "case.nrrd"))
    return ["--pred", str(root / "pred"), "--label", str(root / "label"), "-o", str(root / "report"),
            "--no-pictures"]


def test_evaluate_user_errors(tmp_path) -> None:
    args = evaluation_folders(tmp_path)
    line = one_error_line(run("-m", "seg.evaluate", *args, "--metrics", "hd96"))
    assert "--metrics" in line and "'hd96'" in line and "hd95" in line
    (tmp_path / "pred" / "case.nrrd").unlink()
    line = one_error_line(run("-m", "seg.evaluate", *args))
    assert "case" in line and "pred" in line
    assert not (tmp_path / "report").exists()


def test_evaluate_internal_error_shows_the_traceback(tmp_path) -> None:
    args = evaluation_folders(tmp_path)
    proc = run_injected("import seg.metrics; seg.metrics.evaluate_case_with_distances = boom",
                        "-m seg.evaluate", *args)
    assert_internal_error(proc)
    assert not (tmp_path / "report" / "summary.json").exists()
