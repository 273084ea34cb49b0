"""The run specification (``seg.spec``): resolved once, frozen, refused while "auto" is left; one
type for class names and label values; one stored form for checkpoints and exports."""
from __future__ import annotations

import copy
import dataclasses

import pytest

from hparam import Config
from seg.config import apply_overrides
from seg.errors import ConfigError
from seg.preprocess import Preprocessing
from seg.spec import InferenceSpec, Labels, freeze, resolve, still_auto

#: every field the plan or the data description would set, set by hand (a 3D config with no data)
RESOLVED_3D = ["data.dataset_json=None", "data.class_names=['bg', 'a', 'b']", "data.in_channels=1",
               "data.target_spacing=None", "data.patch_size=(16, 16, 16)", "data.slice_axis=2",
               "data.normalization='zscore'", "data.mirror_axes=(0, 1, 2)", "data.rotation_axes=(2,)",
               "train.batch_size=2", "model.pointrend.train_num_points=256",
               "model.pointrend.subdivision_num_points=256", "data.label_remap={255: 2}",
               "data.patch_voxel_budget=131072"]


def resolved_config() -> Config:
    return apply_overrides(Config(), RESOLVED_3D).validate()


def test_resolve_refuses_every_field_still_auto() -> None:
    cfg = resolved_config()
    assert still_auto(cfg) == []
    for field in ("data.patch_size", "model.pointrend.train_num_points", "train.batch_size", "data.dataset_json"):
        request = apply_overrides(copy.deepcopy(cfg), [f"{field}='auto'"])
        assert still_auto(request) == [field]
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            resolve(request, None, None)


def test_resolved_config_is_frozen_at_every_level_and_keeps_every_value() -> None:
    spec = resolve(resolved_config(), None, {"decisions": []})
    for obj, name in ((spec.config, "data"), (spec.config.data, "patch_size"), (spec.config.model.pointrend, "fc_dim"),
                      (spec.config.train, "iterations")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.inference = None  # the spec itself too
    assert spec.config.to_dict() == resolved_config().to_dict()  # nothing lost in freezing
    assert freeze(spec.config) is spec.config


def test_the_request_is_not_changed_by_resolving() -> None:
    cfg = resolved_config()
    before = cfg.to_dict()
    spec = resolve(cfg, None, None)
    cfg.data.class_names.append("c")
    assert cfg.to_dict() != before and spec.config.data.class_names == ["bg", "a", "b"]


def test_labels_invert_the_remap() -> None:
    # independent reference: for each class index, the file value the remap sends to it (first wins)
    for names, remap in ((["bg", "a"], {255: 1}), (["bg", "a", "b"], {4: 2}), (["bg", "a", "b"], {1: 2, 2: 1}),
                         (["bg", "a"], None), (["bg", "a", "b"], {7: 1, 9: 1})):
        expected = []
        for index in range(len(names)):
            sources = [v for v, i in (remap or {}).items() if i == index]
            expected.append(sources[0] if sources else index)
        labels = Labels.from_remap(names, remap)
        assert labels.values == tuple(expected) and labels.names == tuple(names)
        # and back: the remap of these values sends each value to its class
        assert all(labels.values[i] == v for v, i in (labels.remap or {}).items())
    with pytest.raises(ValueError):
        Labels(("bg", "a"), (0,))


def test_inference_spec_round_trips_through_its_stored_form() -> None:
    spec = resolve(resolved_config(), None, None).inference
    assert spec.labels == Labels(("bg", "a", "b"), (0, 1, 255))
    assert spec.spatial_dims == 3 and spec.slice_axis is None and spec.patch_size == (16, 16, 16)
    stored = spec.to_dict()
    assert InferenceSpec.from_dict(stored, stored["model_config"]) == spec
    without_model = dataclasses.replace(spec, model_config=None).to_dict()
    assert "model_config" not in without_model and InferenceSpec.from_dict(without_model).labels == spec.labels
    # a checkpoint of the first format: no label values (class indices), channels in the model config
    old = {k: v for k, v in stored.items() if k not in ("label_values", "in_channels", "mirror_axes")}
    restored = InferenceSpec.from_dict(old, stored["model_config"])
    assert restored.label_values == (0, 1, 2) and restored.in_channels == 1 and restored.mirror_axes is None
    assert isinstance(restored.preprocessing, Preprocessing)
