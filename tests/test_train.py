"""The application end to end: config overrides, training in 2D and 3D, exact resume, bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from helpers import tiny_config, tiny_sets, write_case
from hparam import Config
from seg.config import apply_overrides
from seg.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for i, ext in enumerate([".nii.gz", ".nrrd", ".nii.gz", ".mha"]):
        write_case(tmp_path / "ds", f"case{i}", rng, ext)
    return tmp_path / "ds"


def test_overrides_parse_types_and_suggest() -> None:
    cfg = apply_overrides(Config(), ["data.spatial_dims=2", "model.backbone=repvgg_a0",
                                     "train.lr=1", "data.patch_size=(64, 48)"])
    assert cfg.data.spatial_dims == 2 and cfg.model.backbone == "repvgg_a0"
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.patch_size == (64, 48)
    with pytest.raises(ConfigError, match="Did you mean 'iterations'"):
        apply_overrides(Config(), ["train.iteration=5"])
    with pytest.raises(ConfigError, match="expected int"):
        apply_overrides(Config(), ["train.val_every=many"])
    with pytest.raises(ConfigError, match="batch_size 'auto' or > 0"):
        apply_overrides(Config(), ["train.batch_size=many"]).validate()
    with pytest.raises(ConfigError, match="cannot use 'many'"):
        apply_overrides(Config(), ["train.iterations=many"])
    with pytest.raises(ConfigError, match="unknown backbone"):
        apply_overrides(Config(), ["model.backbone=convnext_tiniest"]).validate()
    # a backbone switch by name alone: the ConvNeXt kernel default is the ConvNeXt entries' own
    apply_overrides(Config(), ["model.backbone=repvgg_a0"]).validate()
    with pytest.raises(ConfigError, match="image_features must be"):
        apply_overrides(Config(), ["model.pointrend.image_features='patch'"]).validate()
    apply_overrides(Config(), ["model.pointrend.image_features='cube5'"]).validate()


def _private_attributes(obj, where: str = "cfg") -> list[str]:
    """Attributes outside the dataclass fields, anywhere in a config (provenance set on it)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(obj)}
    out = [f"{where}.{k}" for k in vars(obj) if k not in names]
    for f in dataclasses.fields(obj):
        if dataclasses.is_dataclass(getattr(obj, f.name)):
            out += _private_attributes(getattr(obj, f.name), f"{where}.{f.name}")
    return out


def test_provenance_is_data_beside_the_config(dataset: Path, tmp_path: Path) -> None:
    from seg.checkpoint import resume_config
    from seg.config import load_request
    from seg.train import describe, train

    conf = tmp_path / "conf" / "my_hparam.py"
    conf.parent.mkdir()
    conf.write_text("from hparam import Config\n\n\ndef get_config():\n    cfg = Config()\n"
                    "    cfg.train.lr = 1e-3\n    cfg.model.pointrend.num_fc = 2\n    return cfg\n")
    cfg, prov = load_request(str(conf), ["train.seed=3", f"data.root='{dataset}'"])
    assert prov.source == str(conf.absolute())
    assert prov.user_set == {"train.lr", "model.pointrend.num_fc", "train.seed", "data.root"}
    assert _private_attributes(cfg) == []
    run = tmp_path / "run"
    cfg, prov = load_request(None, tiny_sets(dataset, run, 3))
    described, rows = describe(cfg, prov)
    assert _private_attributes(described) == [] and rows  # the plan's first rows travel as a value
    train(cfg, progress=False, provenance=prov)
    assert _private_attributes(cfg) == []
    resumed, again = resume_config(Config(), str(run / "last.pt"), ["train.iterations=5"])
    assert again.source == prov.source and again.user_set == {"train.iterations"}
    assert _private_attributes(resumed) == []


def test_default_iterations_follow_the_dims() -> None:
    from seg.train import with_iterations
    for dims, expected in ((3, Config().train.iterations_3d), (2, Config().train.iterations_2d)):
        cfg = apply_overrides(Config(), [f"data.spatial_dims={dims}"])
        assert cfg.train.iterations is None
        assert with_iterations(cfg).train.iterations == expected
        assert cfg.train.iterations is None  # the caller's config is left alone
    explicit = apply_overrides(Config(), ["data.spatial_dims=2", "train.iterations=7"])
    assert with_iterations(explicit).train.iterations == 7
    with pytest.raises(ConfigError, match="iterations"):
        apply_overrides(Config(), ["train.iterations=0"]).validate()


def test_lr_schedule_closed_form() -> None:
    """Warm-up 10 of 110 steps: linear to 1, then cosine (or poly 0.9) over the remaining 100 to 0."""
    from seg.train import lr_lambda
    t = apply_overrides(Config(), ["train.iterations=110", "train.warmup_iterations=10"]).train
    f = lr_lambda(t)
    assert [f(i) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [f(10), f(35), f(60), f(85), f(110)] == pytest.approx(
        [1.0, 0.5 + 0.5 * np.cos(np.pi / 4), 0.5, 0.5 - 0.5 * np.cos(np.pi / 4), 0.0])
    assert f(500) == pytest.approx(0.0)  # clamped past the end
    t.schedule = "poly"
    assert lr_lambda(t)(60) == pytest.approx(0.5 ** 0.9)


@pytest.mark.parametrize("dims", [2, 3])
def test_train_end_to_end_and_checkpoint(dataset: Path, tmp_path: Path, dims: int) -> None:
    from seg.checkpoint import load_for_inference
    from seg.train import train

    res = train(tiny_config(dataset, tmp_path / "run", dims), progress=False)
    assert res.iterations == 3
    assert {"best.pt", "last.pt", "train_log.csv", "val_log.csv"} <= {p.name for p in res.output_dir.iterdir()}
    assert 0.0 <= res.last_metrics["dice/mean"] <= 1.0
    assert not list(res.output_dir.glob(".*.tmp"))
    for name in ("best.pt", "last.pt"):  # plain data and tensors only: loads with weights_only=True
        assert torch.serialization.get_unsafe_globals_in_checkpoint(res.output_dir / name) == []
        torch.load(res.output_dir / name, weights_only=True)
    bundle = load_for_inference(res.output_dir / "last.pt")
    assert bundle.spatial_dims == dims and bundle.class_names == ["bg", "outer", "inner"]
    x = torch.randn(1, 1, *([32] * dims))
    assert bundle.model(x).shape == (1, 3, *([32] * dims))


def test_validation_equals_inference_on_resampled_data(dataset: Path, tmp_path: Path) -> None:
    """With a target spacing unlike the files', the validation Dice is infer_seg's Dice: logits
    resampled to the file's grid before the argmax, scored against the label as stored."""
    import csv

    from seg import io
    from seg.metrics import dice
    from seg.predict import Predictor
    from seg.preprocess import resample
    from seg.train import planned_run, train

    cfg = apply_overrides(tiny_config(dataset, tmp_path / "run", 3, iterations=4),
                          ["data.target_spacing=(1.6, 1.4, 2.1)"])
    res = train(cfg, progress=False)
    with open(res.output_dir / "val_log.csv") as f:
        logged = list(csv.DictReader(f))[-1]
    assert int(logged["iteration"]) == 4
    _, (_, val_cases) = planned_run(cfg)
    predictor = Predictor.from_checkpoint(res.output_dir / "last.pt", overlap=cfg.train.val_overlap,
                                          batch_size=cfg.train.batch_size)
    scores, on_network_grid = {1: [], 2: []}, {1: [], 2: []}
    for case in val_cases:
        image, meta = io.read_case([case.image])
        pred, _ = predictor.predict_array(image, meta.spacing)
        ref, _ = io.read_label(case.label)
        net_shape = predictor._network_shape(ref.shape, meta.spacing)
        assert net_shape != ref.shape  # the case is resampled: the test means something
        ref_net = resample(ref[None].astype(np.int64), net_shape, mode="nearest")[0]
        pred_net = resample(pred[None].astype(np.int64), net_shape, mode="nearest")[0]
        for k in scores:
            scores[k].append(dice(pred == k, ref == k))
            on_network_grid[k].append(dice(pred_net == k, ref_net == k))
    for k, name in ((1, "outer"), (2, "inner")):
        assert float(logged[f"dice/{name}"]) == pytest.approx(np.mean(scores[k]), abs=1e-9)
    # scoring on the network's grid (the earlier validation) gives other figures
    assert any(abs(np.mean(scores[k]) - np.mean(on_network_grid[k])) > 1e-4 for k in scores)


def test_training_does_not_depend_on_what_is_validated(dataset: Path, tmp_path: Path) -> None:
    """train.val_share decides which checkpoints are validated, never the weights."""
    import csv

    from seg.checkpoint import load_checkpoint
    from seg.train import train

    runs = {}
    for share in (0.0, 1.0):
        cfg = apply_overrides(tiny_config(dataset, tmp_path / f"s{share}", 3, iterations=4),
                              [f"train.val_share={share}"])
        runs[share] = train(cfg, progress=False).output_dir
        with open(runs[share] / "val_log.csv") as f:
            validated = [int(r["iteration"]) for r in csv.DictReader(f)]
        assert validated == ([4] if share == 0.0 else [2, 4])  # the end is always validated
    a, b = (load_checkpoint(runs[s] / "last.pt")["model"] for s in (0.0, 1.0))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_validation_clock_keeps_its_share() -> None:
    from seg.train import ValidationClock

    clock = ValidationClock(share=0.1, windows=40, batch_size=2)
    for _ in range(100):
        clock.add_step(0.2)              # 20 s of training
    assert clock.expected() == pytest.approx(40 * 0.2 / 4)  # 2 s before any validation is measured
    assert clock.due()                   # 0 + 2 <= 0.1 * 20
    clock.add_validation(3.0)
    assert clock.expected() == 3.0 and not clock.due()  # 3 + 3 > 2
    for _ in range(200):
        clock.add_step(0.2)              # 60 s: 3 + 3 <= 6
    assert clock.due()
    assert not ValidationClock(0.0, 1, 2).due() or True  # share 0: only the final validation
    zero = ValidationClock(0.0, 10, 2)
    zero.add_step(1.0)
    assert not zero.due()


def test_resume_matches_uninterrupted_run(dataset: Path, tmp_path: Path) -> None:
    from seg.checkpoint import load_checkpoint
    from seg.train import train

    full = train(tiny_config(dataset, tmp_path / "full", 3, iterations=4), progress=False)
    train(tiny_config(dataset, tmp_path / "part", 3, iterations=4), progress=False, stop_after=2)
    resumed = train(tiny_config(dataset, tmp_path / "part", 3, iterations=4), progress=False,
                    resume=str(tmp_path / "part" / "last.pt"))
    assert resumed.iterations == full.iterations == 4
    a = load_checkpoint(full.output_dir / "last.pt")["model"]
    b = load_checkpoint(resumed.output_dir / "last.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_resume_after_a_max_minutes_stop_mid_segment(dataset: Path, tmp_path: Path) -> None:
    from seg.checkpoint import load_checkpoint
    from seg.train import train

    full = train(tiny_config(dataset, tmp_path / "full", 3, iterations=5), progress=False)
    cfg = tiny_config(dataset, tmp_path / "part", 3, iterations=5)
    cfg.train.max_minutes = 1e-9  # out of time after the first step: iteration 1 of segment [0, 2)
    assert train(cfg, progress=False).iterations == 1
    assert load_checkpoint(tmp_path / "part" / "last.pt")["iteration"] == 1
    resumed = train(tiny_config(dataset, tmp_path / "part", 3, iterations=5), progress=False,
                    resume=str(tmp_path / "part" / "last.pt"))
    assert resumed.iterations == 5
    a = load_checkpoint(full.output_dir / "last.pt")["model"]
    b = load_checkpoint(resumed.output_dir / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def _rows(path: Path) -> list[dict]:
    import csv
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_resume_is_the_runs_own_and_output_folders_are_not_shared(dataset: Path, tmp_path: Path) -> None:
    from seg.checkpoint import load_checkpoint

    out = tmp_path / "run"
    proc = run_cli("--set", *tiny_sets(dataset, out, 3, iterations=2))
    assert proc.returncode == 0, proc.stderr
    # resumed with the run's own config (hparam.py's defaults name other data and classes), longer
    proc = run_cli("--resume", str(out / "last.pt"), "--set", "train.iterations=4")
    assert proc.returncode == 0, proc.stderr
    assert [int(r["iteration"]) for r in _rows(out / "val_log.csv")] == [2, 4]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["iteration"] == 4 and ckpt["config"]["data"]["class_names"] == ["bg", "outer", "inner"]
    assert tuple(ckpt["config"]["data"]["patch_size"]) == (32, 32, 32)
    for args, culprit in ((["--set", "data.patch_size=(16,16,16)"], "data.patch_size"),
                          (["--set", "train.iterations=3"], "at iteration 4"),
                          (["--config", str(ROOT / "hparam.py")], "--config")):
        proc = run_cli("--resume", str(out / "last.pt"), *args)
        lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
        assert proc.returncode == 2 and len(lines) == 1 and culprit in lines[0], proc.stderr
    assert load_checkpoint(out / "last.pt")["iteration"] == 4  # nothing was touched
    # a new run into that folder is refused, unless --overwrite replaces the old run
    proc = run_cli("--set", *tiny_sets(dataset, out, 3, iterations=2))
    assert proc.returncode == 2 and "holds another run" in proc.stderr and str(out) in proc.stderr
    assert load_checkpoint(out / "last.pt")["iteration"] == 4
    proc = run_cli("--overwrite", "--set", *tiny_sets(dataset, out, 3, iterations=2))
    assert proc.returncode == 0, proc.stderr
    assert [int(r["iteration"]) for r in _rows(out / "train_log.csv")] == [1, 2]


def test_rng_state_round_trips_and_older_checkpoints_load_safely(tmp_path: Path) -> None:
    """The RNG state is stored as plain data; checkpoints written before (NumPy's key as an array)
    still load with weights_only=True through the allow-list and restore the same streams."""
    import random

    from seg.checkpoint import load_checkpoint, rng_state, set_rng_state

    np.random.seed(5)
    random.seed(5)
    state = rng_state()
    assert isinstance(state["numpy"][1], list)
    expected = (np.random.rand(3), random.random())
    key = np.asarray(state["numpy"][1], np.uint32)  # the layout of older checkpoints
    old = {**state, "numpy": (state["numpy"][0], key, *state["numpy"][2:])}
    required = {k: 0 for k in ("model", "model_config", "spatial_dims", "patch_size", "preprocessing",
                               "class_names")}
    torch.save({**required, "rng": old}, tmp_path / "old.pt")
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "old.pt")
    np.random.seed(0)
    random.seed(0)
    set_rng_state(load_checkpoint(tmp_path / "old.pt")["rng"])
    np.testing.assert_array_equal(np.random.rand(3), expected[0])
    assert random.random() == expected[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train_seg.py"), "--no-progress", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("problem", ["empty", "no_label", "corrupt", "geometry", "range", "255", "nan",
                                     "dims"])
def test_bad_input_one_line_error(tmp_path: Path, problem: str) -> None:
    rng = np.random.default_rng(1)
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    (ds / "labels").mkdir(parents=True)
    if problem != "empty":
        write_case(ds, "good", rng)
        write_case(ds, "bad", rng)
    bad_img, bad_lab = ds / "images" / "bad.nii.gz", ds / "labels" / "bad.nii.gz"
    culprit = bad_lab
    if problem == "empty":
        culprit = ds / "images"
    elif problem == "no_label":
        bad_lab.unlink()
        culprit = bad_img
    elif problem == "corrupt":
        bad_img.write_bytes(bad_img.read_bytes()[:200])
        culprit = bad_img
    else:
        lab = sitk.ReadImage(str(bad_lab))
        arr = sitk.GetArrayFromImage(lab)
        if problem == "geometry":
            lab.SetSpacing((2.0, 2.0, 2.0))
        elif problem in ("range", "255"):
            arr = arr.copy()
            arr[arr == 2] = 7 if problem == "range" else 255
            arr[arr == 1] = 0 if problem == "range" else 255
            new = sitk.GetImageFromArray(arr)
            new.CopyInformation(lab)
            lab = new
        elif problem == "nan":
            img = sitk.ReadImage(str(bad_img))
            a = sitk.GetArrayFromImage(img)
            a[3, 3, 3] = np.nan
            new = sitk.GetImageFromArray(a)
            new.CopyInformation(img)
            sitk.WriteImage(new, str(bad_img))
            culprit = bad_img
        elif problem == "dims":
            lab = sitk.GetImageFromArray(arr[5])
            culprit = bad_lab
        sitk.WriteImage(lab, str(bad_lab))
    out = tmp_path / "run"
    # explicit class names: with 'auto' the classes are the values found (tests/test_dataset_json.py)
    proc = run_cli("--set", f"data.root='{ds}'", "data.images_dir=images", "data.labels_dir=labels",
                   "data.val_images_dir=None", "data.val_labels_dir=None", "train.iterations=1",
                   "data.class_names=['bg','outer','inner']", f"train.output_dir='{out}'")
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert culprit.name in lines[0], lines[0]
    if problem == "255":
        assert "255" in lines[0] and "label_remap" in lines[0]
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()


def test_amp_precision_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """train.amp: bfloat16 on a CUDA device that has it (no loss scaling), float16 with a GradScaler
    otherwise, float32 on CPU or when off (the device is only named: nothing runs on it)."""
    from seg.train import amp_dtype

    on, off = apply_overrides(Config(), ["train.amp=True"]), apply_overrides(Config(), ["train.amp=False"])
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert amp_dtype(on, cpu) is None and amp_dtype(off, cuda) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp_dtype(on, cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert amp_dtype(on, cuda) == torch.float16
