"""nnU-Net datasets as they are (``dataset.json``), and classes / channels described by the data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hparam import Config
from seg.config import apply_overrides
from seg.dataset_json import read_dataset_json
from seg.errors import ConfigError, DataError
from seg.train import describe, described_config

ROOT = Path(__file__).resolve().parent.parent
GAPPED = {"background": 0, "b": 3, "a": 1}  # out of order, value 2 unused


def _write(path: Path, arr: np.ndarray, spacing=(1.2, 1.0, 1.5)) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((-10.0, 5.0, 2.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def _case(rng: np.random.Generator, shape=(34, 36, 32)) -> tuple[np.ndarray, np.ndarray]:
    """A sphere of label 3 inside a shell of label 1 (the file values of classes b and a)."""
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    c = [s / 2 + rng.uniform(-2, 2) for s in shape]
    r = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
    label = np.where(r < 6, 3, np.where(r < 11, 1, 0)).astype(np.uint8)
    image = (np.where(label == 3, 80.0, label * 40.0) + rng.normal(0, 6, shape) + 10).astype(np.float32)
    return image, label


def nnunet_dataset(root: Path, n_train: int = 4, n_test: int = 1, labels: dict | None = None,
                   **extra) -> Path:
    """``root/Dataset042_Toy`` in nnU-Net v2's layout: ``_0000`` channel files, .nii.gz, a stray
    .nrrd in imagesTr that ``file_ending`` leaves out, ``imagesTs/``."""
    ds = root / "Dataset042_Toy"
    rng = np.random.default_rng(0)
    for i in range(n_train):
        image, label = _case(rng)
        _write(ds / "imagesTr" / f"toy_{i:03d}_0000.nii.gz", image)
        _write(ds / "labelsTr" / f"toy_{i:03d}.nii.gz", label)
    _write(ds / "imagesTr" / "stray.nrrd", _case(rng)[0])  # no label: would stop training if read
    for i in range(n_test):
        _write(ds / "imagesTs" / f"toy_{100 + i:03d}_0000.nii.gz", _case(rng)[0])
    meta = {"channel_names": {"0": "MRI"}, "labels": labels or GAPPED, "numTraining": n_train,
            "file_ending": ".nii.gz", **extra}
    (ds / "dataset.json").write_text(json.dumps(meta))
    return ds


def tiny_sets(ds: Path, out: Path, iterations: int = 2) -> list[str]:
    """A tiny 3D run on an nnU-Net folder: only model size and run length are set; the data
    fields (classes, channels, pattern) stay 'auto'."""
    return [f"data.root='{ds}'", "data.val_images_dir=None", "data.split_file=None",
            "data.patch_size=(32, 32, 32)", "data.samples_per_volume=2", "data.queue_length=4",
            "data.augment_affine=False", "model.pointrend.train_num_points=64",
            "model.pointrend.subdivision_num_points=256", "model.pointrend.fc_dim=16",
            f"train.iterations={iterations}", "train.val_every=2", "train.val_share=1.0", "train.batch_size=2",
            "train.warmup_iterations=1", f"train.output_dir='{out}'"]


# ----------------------------------------------------------------------------- reading dataset.json
def test_labels_out_of_order_with_a_gap(tmp_path: Path) -> None:
    ds = nnunet_dataset(tmp_path, n_train=1, n_test=0)
    dj = read_dataset_json(ds / "dataset.json")
    assert dj.class_names == ["background", "a", "b"]
    assert dj.label_values == [0, 1, 3] and dj.label_remap == {3: 2}
    assert dj.channel_names == ("MRI",) and dj.pattern == "*.nii.gz" and dj.num_training == 1


@pytest.mark.parametrize("content, needle", [
    ("{not json", "cannot read dataset.json"),
    (json.dumps({"labels": GAPPED, "file_ending": ".nii.gz"}), "lacks 'channel_names'"),
    (json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": [1, 2]},
                 "file_ending": ".nii.gz"}), "region"),
    (json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "ignore": 2},
                 "file_ending": ".nii.gz"}), "'ignore' label"),
    (json.dumps({"channel_names": {"0": "CT"}, "labels": {"a": 1, "b": 2}, "file_ending": ".nii.gz"}),
     "no label with value 0"),
    (json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 1},
                 "file_ending": ".nii.gz"}), "share the value 1"),
    (json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1.5},
                 "file_ending": ".nii.gz"}), "must be integers"),
    (json.dumps({"channel_names": {"0": "T1", "2": "T2"}, "labels": GAPPED, "file_ending": ".nii.gz"}),
     "keys must be 0..1"),
    (json.dumps({"channel_names": {"0": "T1"}, "labels": GAPPED, "file_ending": ".tif"}), "'.tif' is not a format"),
    ('{"channel_names": {"0": "T1"}, "labels": {"background": 0, "a": 1, "a": 2}, "file_ending": ".nii.gz"}',
     "'a' appears twice"),
])
def test_bad_dataset_json_is_one_line_naming_the_file(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "dataset.json"
    path.write_text(content)
    with pytest.raises(DataError) as exc:
        read_dataset_json(path)
    msg = str(exc.value)
    assert needle in msg and str(path) in msg and "\n" not in msg, msg


BAD_DATASET_JSON = {  # content: the message after "<file>: "
    "nested": ('{"labels": ' + "[" * 100_000 + "]" * 100_000 + "}",
               "cannot read dataset.json: its JSON is nested too deeply"),
    "label value 70000": (json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 70000},
                                      "file_ending": ".nii.gz"}),
                          "label 'a' has value 70000: the label maps we write hold at most 65535 (uint16)"),
    "nested label value": (json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                       "labels": {"background": 0, "a": {"b": {"c": {"d": 1}}}}}),
                           "label 'a' has value {'b': {'c': {...}}}: label values must be integers >= 0"),
    "channel name a list": (json.dumps({"channel_names": {"0": ["T1"]}, "labels": GAPPED, "file_ending": ".nii.gz"}),
                            "'channel_names' entry '0' is ['T1']: channel names must be strings"),
    "file_ending a list": (json.dumps({"channel_names": {"0": "T1"}, "labels": GAPPED, "file_ending": [[[".nii"]]]}),
                           "'file_ending' [[[...]]] is not a format we read (.nii.gz, .nii, .nrrd, .nhdr, .mha, "
                           ".mhd, .png)"),
}


@pytest.mark.parametrize("kind", list(BAD_DATASET_JSON))
def test_bad_dataset_json_exact_message(tmp_path: Path, kind: str) -> None:
    content, problem = BAD_DATASET_JSON[kind]
    path = tmp_path / "dataset.json"
    path.write_text(content)
    with pytest.raises(DataError) as exc:
        read_dataset_json(path)
    assert str(exc.value) == f"{path}: {problem}"


def test_label_value_no_output_holds_is_refused_before_the_run(tmp_path: Path) -> None:
    """Without dataset.json: a label map holding 70000 (found in the data), or a label_remap naming
    it, is refused when the run is described, not when its first output is written."""
    rng = np.random.default_rng(4)
    image, label = _case(rng, shape=(9, 8, 7))
    _write(tmp_path / "imagesTr" / "c0.nii.gz", image)
    label = label.astype(np.int32)
    label[label == 3] = 70000
    _write(tmp_path / "labelsTr" / "c0.nii.gz", label)
    with pytest.raises(DataError) as exc:
        described_config(apply_overrides(Config(), [f"data.root='{tmp_path}'"]))
    assert str(exc.value) == (f"{tmp_path / 'labelsTr' / 'c0.nii.gz'}: has the label value 70000: the label maps "
                              "we write hold at most 65535 (uint16); renumber the labels")
    with pytest.raises(ConfigError) as exc:
        described_config(apply_overrides(Config(), [f"data.root='{tmp_path}'", "data.class_names=['bg','a','b']",
                                                    "data.label_remap={70000: 2}"]))
    assert str(exc.value) == ("data.label_remap={70000: 2} maps label value 70000 to a class: the label maps we "
                              "write hold at most 65535 (uint16); renumber the labels")
    ok = described_config(apply_overrides(Config(), [f"data.root='{tmp_path}'", "data.class_names=['bg','a','b']",
                                                     "data.label_remap={65535: 2}"]))
    assert ok.data.label_remap == {65535: 2}


def test_channel_names_mean_nnunets_schemes() -> None:
    """nnU-Net's names (case-insensitive, casefold, no stripping) and z-score for every other name."""
    from seg.dataset_json import channel_normalization

    names = ["CT", "ct", "noNorm", "NONORM", "rescale_to_0_1", "RGB_to_0_1", "zscore", "MRI", "T1", " CT", "ADC", ""]
    assert channel_normalization(names) == ["ct", "ct", "none", "none", "rescale_to_0_1", "rgb_to_0_1", "zscore",
                                            "zscore", "zscore", "zscore", "zscore", "zscore"]
    assert channel_normalization(None) is None and channel_normalization([]) is None


def test_named_channel_takes_its_scheme_and_zscore_the_crop_rule() -> None:
    """Integer MR data reaching -600 named 'T1' are z-scored (the HU rule would say CT); a z-score name
    still takes nnU-Net's crop rule; unnamed channels keep the plan's own rule."""
    from seg.plan import plan_normalization

    mr = {"integer": True, "min": -600.0, "max": 900.0}
    assert plan_normalization(mr, 1.0) == "ct"  # unnamed: the intensity rule
    assert plan_normalization(mr, 1.0, "zscore") == "zscore"
    assert plan_normalization(mr, 0.5, "zscore") == "zscore_nonzero"  # cropping removes 50 %
    assert plan_normalization(mr, 0.5, "ct") == "ct"
    for scheme in ("none", "rescale_to_0_1", "rgb_to_0_1"):
        assert plan_normalization(mr, 0.5, scheme) == scheme


def test_integer_mr_reaching_minus_500_named_t1_plans_zscore(tmp_path: Path) -> None:
    from seg.train import planned_run

    ds = nnunet_dataset(tmp_path, n_train=3, n_test=0, channel_names={"0": "T1"})
    for f in (ds / "imagesTr").glob("toy_*_0000.nii.gz"):  # integer MR values from -600
        img = sitk.ReadImage(str(f))
        _write(f, (sitk.GetArrayFromImage(img) * 10 - 600).astype(np.int16))
    sets = [f"data.root='{ds}'", "data.val_images_dir=None", "data.split_file=None", "data.val_fraction=0.34"]
    planned = planned_run(apply_overrides(Config(), sets))[0].config
    assert planned.data.normalization == "zscore" and planned.data.channel_names == ["T1"]
    planned = planned_run(apply_overrides(Config(), sets + ["data.dataset_json=None", "data.pattern='*.nii.gz'"]))[0].config
    assert planned.data.normalization == "ct"  # no names: the plan's own rule sees Hounsfield-like integers


def test_rescale_and_rgb_schemes_as_nnunet() -> None:
    from seg.preprocess import Preprocessing, check_intensities, normalize

    x = np.array([[[4.0, 6.0, 14.0]], [[0.0, 51.0, 255.0]]], np.float32)  # (C=2, 1, 3)
    pp = Preprocessing(normalization=("rescale_to_0_1", "rgb_to_0_1"))
    pp.validate()
    np.testing.assert_allclose(normalize(x, pp), [[[0.0, 0.2, 1.0]], [[0.0, 0.2, 1.0]]], rtol=1e-6)
    np.testing.assert_array_equal(normalize(np.full((1, 2, 2), 7.0), Preprocessing("rescale_to_0_1")), 0.0)
    check_intensities(x, ["rescale_to_0_1", "rgb_to_0_1"], "img.png")
    with pytest.raises(DataError) as exc:
        check_intensities(x * 2, ["zscore", "rgb_to_0_1"], "img.png")
    assert str(exc.value) == ("img.png: channel 1 has values 0..510, but its normalisation 'rgb_to_0_1' takes 8-bit "
                              "values 0..255 (rename the channel in dataset.json, e.g. 'rescale_to_0_1', or set "
                              "data.normalization)")
    from types import SimpleNamespace

    from seg.predict import Predictor

    bundle = SimpleNamespace(model=torch.nn.Identity(), spatial_dims=2, patch_size=(8, 8), in_channels=2,
                             class_names=["background", "a"], preprocessing=pp)
    Predictor(bundle).check_input(x, "img.png")
    with pytest.raises(DataError) as exc:  # inference refuses it too, before the network
        Predictor(bundle).check_input(x * 2, "img.png")
    assert str(exc.value).startswith("img.png: channel 1 has values 0..510, but its normalisation 'rgb_to_0_1'")


def test_rgb_channel_out_of_range_is_refused_naming_the_file(tmp_path: Path) -> None:
    """A channel named rgb_to_0_1 holding 16-bit values: one line naming the image, before training."""
    from seg.train import find_data

    ds = nnunet_dataset(tmp_path, n_train=2, n_test=0, channel_names={"0": "rgb_to_0_1"})
    for i, scale in enumerate((1, 300)):  # toy_000 8-bit, toy_001 16-bit
        f = ds / "imagesTr" / f"toy_{i:03d}_0000.nii.gz"
        _write(f, (np.clip(sitk.GetArrayFromImage(sitk.ReadImage(str(f))), 0, 200) * scale).astype(np.uint16))
    cfg = described_config(apply_overrides(Config(), [f"data.root='{ds}'", "data.val_images_dir=None",
                                                      "data.split_file=None"]))
    with pytest.raises(DataError) as exc:
        find_data(cfg)
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(ds / "imagesTr" / "toy_001_0000.nii.gz")))
    assert str(exc.value) == (f"{ds / 'imagesTr' / 'toy_001_0000.nii.gz'}: channel 0 has values {image.min():g}.."
                              f"{image.max():g}, but its normalisation 'rgb_to_0_1' takes 8-bit values 0..255 (rename "
                              "the channel in dataset.json, e.g. 'rescale_to_0_1', or set data.normalization)")


# ----------------------------------------------------------------------------- describing a run
def test_dataset_json_describes_the_run(tmp_path: Path) -> None:
    ds = nnunet_dataset(tmp_path, n_train=2, n_test=0)
    cfg, rows = describe(apply_overrides(Config(), [f"data.root='{ds}'"]))
    d = cfg.data
    assert d.class_names == ["background", "a", "b"] and d.label_remap == {3: 2}
    assert d.in_channels == 1 and d.channel_names == ["MRI"] and d.pattern == "*.nii.gz"
    shown = {row[0]: row[1:3] for row in rows}  # rows of the plan table and plan.json
    assert shown["data.class_names"] == (["background", "a", "b"], "dataset.json")
    assert shown["data.label_remap"] == ({"3": 2}, "dataset.json") and shown["data.pattern"][1] == "dataset.json"
    # the same values set explicitly agree with the file (an identity entry changes nothing)
    same = apply_overrides(Config(), [f"data.root='{ds}'", "data.class_names=['background','a','b']",
                                      "data.label_remap={0: 0, 3: 2}", "data.in_channels=1",
                                      "data.pattern='toy_*.nii.gz'"])
    assert described_config(same).data.class_names == ["background", "a", "b"]


@pytest.mark.parametrize("override, field", [
    ("data.class_names=['background','b','a']", "data.class_names"),
    ("data.class_names=['background','a']", "data.class_names"),
    ("data.label_remap={3: 1}", "data.label_remap"),
    ("data.in_channels=2", "data.in_channels"),
    ("data.channel_names=['CT']", "data.channel_names"),
    ("data.pattern='*.nrrd'", "data.pattern"),
])
def test_contradictions_with_dataset_json_are_one_line_errors(tmp_path: Path, override: str, field: str) -> None:
    ds = nnunet_dataset(tmp_path, n_train=1, n_test=0)
    with pytest.raises(ConfigError) as exc:
        described_config(apply_overrides(Config(), [f"data.root='{ds}'", override]))
    msg = str(exc.value)
    assert msg.startswith(field) and str(ds / "dataset.json") in msg and "\n" not in msg, msg
    # the escape hatch: ignore the file
    if field in ("data.class_names", "data.label_remap"):
        cfg = described_config(apply_overrides(Config(), [f"data.root='{ds}'", "data.dataset_json=None",
                                                          "data.class_names=['background','x','y']",
                                                          "data.label_remap={3: 2}", "data.pattern='*.nii.gz'"]))
        assert cfg.data.class_names == ["background", "x", "y"] and cfg.data.channel_names is None


def test_contradiction_stops_train_seg_with_exit_2(tmp_path: Path) -> None:
    ds = nnunet_dataset(tmp_path, n_train=2, n_test=0)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train_seg.py"), "--no-progress", "--set",
                           *tiny_sets(ds, out), "data.in_channels=3"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "data.in_channels=3" in errors[0] and "dataset.json" in errors[0]
    assert "Traceback" not in proc.stderr and not out.exists()


def test_channel_named_ct_plans_ct_normalisation(tmp_path: Path) -> None:
    """nnU-Net's rule: a channel named CT gets the CT scheme, whatever the intensities (these are
    MR-like values from 0, where the plan's own rule would say z-score)."""
    from seg.train import planned_run

    ds = nnunet_dataset(tmp_path, n_train=3, n_test=0, channel_names={"0": "CT"})
    sets = [f"data.root='{ds}'", "data.val_images_dir=None", "data.split_file=None", "data.val_fraction=0.34"]
    planned = planned_run(apply_overrides(Config(), sets))[0].config
    assert planned.data.normalization == "ct" and planned.data.intensity_stats is not None
    (ds / "dataset.json").write_text(json.dumps({**json.loads((ds / "dataset.json").read_text()),
                                                 "channel_names": {"0": "MRI"}}))
    assert planned_run(apply_overrides(Config(), sets))[0].config.data.normalization == "zscore"


def test_without_dataset_json_classes_are_the_values_found(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for i in range(2):
        image, label = _case(rng)
        label[label == 3] = 255
        _write(tmp_path / "imagesTr" / f"c{i}_0000.nii.gz", image)
        _write(tmp_path / "imagesTr" / f"c{i}_0001.nii.gz", image * 2)
        _write(tmp_path / "labelsTr" / f"c{i}.nii.gz", label)
    cfg = described_config(apply_overrides(Config(), [f"data.root='{tmp_path}'"]))
    assert cfg.data.class_names == ["background", "label_1", "label_255"]
    assert cfg.data.label_remap == {255: 2} and cfg.data.in_channels == 2 and cfg.data.channel_names is None
    with pytest.raises(ConfigError, match="needs explicit data.class_names"):
        described_config(apply_overrides(Config(), [f"data.root='{tmp_path}'", "data.label_remap={255: 1}"]))


# ----------------------------------------------------------------------------- end to end
def test_train_and_infer_on_an_nnunet_folder(tmp_path: Path, monkeypatch) -> None:
    """Train on ``Dataset042_Toy`` as it is, then ``infer_seg.py -i Dataset042_Toy`` segments its
    imagesTs/ and writes the file values 0, 1, 3 of dataset.json (a gap kept): with the network
    replaced by a threshold of the toy's intensities (background 10, a 50, b 90), every voxel's
    written value is the class's file value, and all three are written."""
    import infer_seg
    from seg.predict import Predictor
    from seg.train import train

    ds = nnunet_dataset(tmp_path, n_train=4, n_test=2)
    result = train(apply_overrides(Config(), tiny_sets(ds, tmp_path / "run", iterations=4) +
                                   ["data.val_fraction=0.25", "train.lr=3e-3"]), progress=False)
    ckpt = torch.load(result.output_dir / "last.pt", weights_only=True)
    assert ckpt["class_names"] == ["background", "a", "b"] and ckpt["label_values"] == [0, 1, 3]
    assert ckpt["config"]["data"]["pattern"] == "*.nii.gz"  # stray.nrrd never read
    plan = json.loads((result.output_dir / "plan.json").read_text())["decisions"]
    assert {"field": "data.in_channels", "value": 1, "source": "dataset.json", "why": "channel_names"} in plan
    out = tmp_path / "pred"
    proc = subprocess.run([sys.executable, str(ROOT / "infer_seg.py"), "-i", str(ds), "-o", str(out), "-m",
                           str(result.output_dir / "last.pt"), "--format", "seg.nrrd", "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    written = sorted(p.name for p in out.glob("*.seg.nrrd"))
    assert written == ["toy_100.seg.nrrd", "toy_101.seg.nrrd"]

    def threshold(self, image, spacing=None, return_probabilities=False):  # class indices 0, 1, 2
        return np.clip(np.rint((image[0].astype(float) - 10) / 40), 0, 2).astype(np.uint8), None

    monkeypatch.setattr(Predictor, "predict_array", threshold)
    assert infer_seg.main(["-i", str(ds), "-o", str(out), "-m", str(result.output_dir / "last.pt"), "--format",
                           "seg.nrrd", "--device", "cpu", "--overwrite"]) == 0
    for name in written:
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(ds / "imagesTs" / name.replace(".seg.nrrd", "_0000.nii.gz"))))
        expected = np.array([0, 1, 3])[np.clip(np.rint((image - 10) / 40), 0, 2).astype(int)]
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / name)))
        np.testing.assert_array_equal(labels, expected)
        assert set(np.unique(labels).tolist()) == {0, 1, 3}
    header = sitk.ReadImage(str(out / written[0]))
    names = {header.GetMetaData(k) for k in header.GetMetaDataKeys() if k.endswith("_Name")}
    assert names == {"a", "b"}


def test_infer_on_a_dataset_folder_without_imagests(tmp_path: Path) -> None:
    from seg.predict import dataset_inputs

    ds = nnunet_dataset(tmp_path, n_train=1, n_test=0)
    with pytest.raises(DataError, match="without imagesTs"):
        dataset_inputs([ds])
    items, pattern = dataset_inputs([ds / "imagesTr"])  # its own file ending: stray.nrrd left out
    assert items == [ds / "imagesTr"] and pattern == "*.nii.gz"


def test_evaluation_of_an_nnunet_label_folder_names_its_classes(tmp_path: Path) -> None:
    """``python -m seg.evaluate --label Dataset042/labelsTr`` takes the class names and values
    (1 and 3, a gap) from dataset.json: a prediction equal to the labels scores Dice 1 per class."""
    from seg.evaluate import main

    ds = nnunet_dataset(tmp_path, n_train=2, n_test=0)
    assert main(["--pred", str(ds / "labelsTr"), "--label", str(ds / "labelsTr"), "-o", str(tmp_path / "ev"),
                 "--metrics", "dice", "--no-pictures"]) == 0
    classes = json.loads((tmp_path / "ev" / "summary.json").read_text())["classes"]
    assert {n: (c["label"], c["dice"]["mean"]) for n, c in classes.items()} == {"a": (1, 1.0), "b": (3, 1.0)}
