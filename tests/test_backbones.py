"""Contract tests for every registered backbone, and tests of the generic pretrained loader.

Every name in ``backbones.list_backbones()`` is checked in 2D and 3D on small odd, non-cubic
inputs: outputs match ``feature_info`` (names, order, channels, spatial size), every parameter gets
a gradient, no NaNs, and the model's own state dict round-trips through ``load_pretrained``.
Variants over ``HEAVY_PARAMS`` parameters (in 2D) are only built.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from backbones import build_backbone, list_backbones
from backbones.base import Backbone
from backbones.pretrained import (adapt_input_conv, inflate_conv_weight, load_pretrained,
                                  read_state_dict)
from seg.errors import ConfigError, UserError

HEAVY_PARAMS = 25_000_000
SHAPES = {2: (1, 1, 45, 37), 3: (1, 1, 21, 27, 19)}
NAMES = list_backbones()


@functools.lru_cache(maxsize=None)
def num_params_2d(name: str) -> int:
    model = build_backbone(name, 2)
    return sum(p.numel() for p in model.parameters())


def light(name: str) -> str:
    if num_params_2d(name) > HEAVY_PARAMS:
        pytest.skip(f"{name}: {num_params_2d(name) / 1e6:.0f}M parameters, only built")
    return name


def expected_sizes(size: int, stride: int) -> set[int]:
    """Spatial size of a stride-``stride`` feature: ceil or floor (the contract allows either)."""
    return {math.ceil(size / stride), size // stride}


def check_features(model: Backbone, x: torch.Tensor, feats: dict[str, torch.Tensor]) -> None:
    dims = x.ndim - 2
    assert model.spatial_dims == dims
    assert list(feats) == model.feature_names(), "outputs must follow feature_info, fine to coarse"
    prev = (1,) * dims
    for info, (name, f) in zip(model.feature_info, feats.items()):
        assert len(info.stride) == dims and all(s >= p for s, p in zip(info.stride, prev))
        prev = info.stride
        assert f.shape[:2] == (x.shape[0], info.channels), name
        for axis, (size, stride) in enumerate(zip(x.shape[2:], info.stride)):
            assert f.shape[2 + axis] in expected_sizes(size, stride), (name, f.shape, info)
        assert torch.isfinite(f).all(), name


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_builds(name: str, dims: int) -> None:
    model = build_backbone(name, dims, in_chans=2)
    assert isinstance(model, Backbone) and model.spatial_dims == dims
    assert len(model.feature_info) >= 1
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_feature_info_and_grads(name: str, dims: int) -> None:
    torch.manual_seed(0)
    model = build_backbone(light(name), dims).eval()
    x = torch.randn(SHAPES[dims], requires_grad=True)
    feats = model(x)
    check_features(model, x, feats)
    sum(f.float().mean() for f in feats.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:10]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_train_mode_drop_path(name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(light(name), 2, drop_path_rate=0.1).train()
    x = torch.randn(2, 1, 45, 37)
    feats = model(x)
    check_features(model, x, feats)
    sum(f.mean() for f in feats.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", NAMES)
def test_own_state_dict_round_trips(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    src = build_backbone(light(name), 2).eval()
    path = tmp_path / "own.pth"
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, path)
    dst = build_backbone(name, 2).eval()
    load_pretrained(dst, path)
    x = torch.randn(SHAPES[2])
    with torch.no_grad():
        a, b = src(x), dst(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    load_pretrained(build_backbone(name, 3), path)  # 2D weights must load into the 3D model


# --- generic loader pieces ---------------------------------------------------------------------

def test_inflate_center_and_mean() -> None:
    w = torch.randn(5, 3, 3, 3)
    c = inflate_conv_weight(w, 4, "center")
    assert c.shape == (5, 3, 4, 3, 3)
    assert torch.equal(c[:, :, 2], w) and c[:, :, [0, 1, 3]].abs().sum() == 0  # even: depth // 2
    assert torch.equal(inflate_conv_weight(w, 7)[:, :, 3], w)
    m = inflate_conv_weight(w, 3, "mean")
    assert torch.allclose(m.sum(2), w) and torch.allclose(m[:, :, 0], m[:, :, 2])
    with pytest.raises(ValueError, match="mode"):
        inflate_conv_weight(w, 3, "bogus")


@pytest.mark.parametrize("mode", ["center", "mean"])
def test_inflated_conv_on_identical_slices(mode: str) -> None:
    """Both modes reproduce the 2D conv on every slice where no depth padding is involved."""
    w = torch.randn(4, 2, 3, 3)
    img = torch.randn(1, 2, 9, 8)
    vol = img.unsqueeze(2).expand(-1, -1, 6, -1, -1)  # (1, 2, 9, 8) -> (1, 2, 6, 9, 8)
    out = F.conv3d(vol, inflate_conv_weight(w, 3, mode), padding=(0, 1, 1))
    ref = F.conv2d(img, w, padding=1)
    assert torch.allclose(out, ref.unsqueeze(2).expand_as(out), atol=1e-5)
    if mode == "center":  # exact even with zero padding in depth
        out = F.conv3d(vol, inflate_conv_weight(w, 3, mode), padding=1)
        assert torch.allclose(out, ref.unsqueeze(2).expand_as(out), atol=1e-5)


def test_adapt_input_conv() -> None:
    w = torch.randn(6, 3, 4, 4)
    x = torch.randn(2, 1, 8, 8)
    one = adapt_input_conv(w, 1)
    assert torch.allclose(F.conv2d(x, one), F.conv2d(x.repeat(1, 3, 1, 1), w), atol=1e-5)
    five = adapt_input_conv(w, 5)
    assert five.shape == (6, 5, 4, 4)
    assert torch.allclose(five[:, :3], w * 3 / 5) and torch.allclose(five[:, 3:], w[:, :2] * 3 / 5)
    six = adapt_input_conv(w, 6)  # in_chans a multiple of 3: same response to a constant image
    ones = torch.ones(1, 3, 4, 4)
    assert torch.allclose(F.conv2d(ones.repeat(1, 2, 1, 1), six), F.conv2d(ones, w), atol=1e-5)
    assert adapt_input_conv(w, 3) is w


def test_read_state_dict_unwraps(tmp_path) -> None:
    sd = {"a.weight": torch.ones(2), "b": torch.zeros(1)}
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1}, tmp_path / "m.pt")
    assert read_state_dict(tmp_path / "m.pt").keys() == sd.keys()
    torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}}, tmp_path / "s.pt")
    assert read_state_dict(tmp_path / "s.pt").keys() == sd.keys()


def test_safetensors(tmp_path) -> None:
    st = pytest.importorskip("safetensors.torch")
    model = build_backbone("convnext_atto", 2)
    st.save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    report = load_pretrained(build_backbone("convnext_atto", 2), tmp_path / "w.safetensors")
    assert report.loaded == len(model.state_dict())


@pytest.mark.parametrize("content", [b"\x00garbage, not a pickle\xff" * 10, b""])
def test_corrupt_file_is_user_error(tmp_path, content: bytes) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match="broken.pth"):
        load_pretrained(build_backbone("convnext_atto", 2), path)


def test_not_a_checkpoint_and_missing_file(tmp_path) -> None:
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(UserError, match="list.pth"):
        load_pretrained(build_backbone("convnext_atto", 2), tmp_path / "list.pth")
    with pytest.raises(UserError, match="nope.pth"):
        load_pretrained(build_backbone("convnext_atto", 2), tmp_path / "nope.pth")


def test_file_needing_full_unpickling_loads_only_when_asked(tmp_path, caplog) -> None:
    """No silent fallback to unsafe unpickling: refused with a message naming the file, the
    object it holds and the opt-in; ``unsafe_load=True`` loads it (with a warning)."""
    import argparse
    import logging

    model = build_backbone("convnext_atto", 2)
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1)},
               tmp_path / "official.pth")
    with pytest.raises(UserError, match=r"official\.pth.*argparse\.Namespace.*arbitrary code.*--unsafe-load"):
        load_pretrained(build_backbone("convnext_atto", 2), tmp_path / "official.pth")
    with caplog.at_level(logging.WARNING):
        report = load_pretrained(build_backbone("convnext_atto", 2), tmp_path / "official.pth",
                                 unsafe_load=True)
    assert report.loaded == len(model.state_dict())
    assert any("unpickled in full" in r.getMessage() for r in caplog.records)


def test_missing_unexpected_and_misfit_keys_raise(tmp_path) -> None:
    model = build_backbone("convnext_atto", 2)
    sd = model.state_dict()
    dropped = "stages.2.blocks.3.fc1.bias"
    del sd[dropped]
    sd["stages.1.blocks.0.extra.weight"] = torch.zeros(3)
    sd["stages.0.blocks.0.gamma"] = torch.zeros(7)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(UserError) as err:
        load_pretrained(build_backbone("convnext_atto", 2), tmp_path / "bad.pth")
    msg = str(err.value)
    for part in ("bad.pth", dropped, "stages.1.blocks.0.extra.weight", "stages.0.blocks.0.gamma"):
        assert part in msg


def test_bad_inflate_mode(tmp_path) -> None:
    with pytest.raises(ValueError, match="inflation mode"):
        load_pretrained(build_backbone("convnext_atto", 3), tmp_path / "x.pth", inflate="middle")


def test_backbone_from_a_training_checkpoint(tmp_path) -> None:
    # a whole segmentation model's checkpoint (as seg.train writes it): the backbone part loads
    from seg.model import build_model
    torch.manual_seed(0)
    from helpers import point_options
    seg_model = build_model(2, 1, 3, backbone="convnext_atto", pointrend=point_options())
    torch.save({"model": seg_model.state_dict(), "iteration": 7, "model_config": {"x": 1}},
               tmp_path / "best.pt")
    dst = build_backbone("convnext_atto", 2)
    report = load_pretrained(dst, tmp_path / "best.pt")
    assert report.loaded == len(seg_model.backbone.state_dict())
    for key, value in seg_model.backbone.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[key], value)
    load_pretrained(build_backbone("convnext_atto", 3), tmp_path / "best.pt")  # 2D run -> 3D


@pytest.mark.parametrize("name", sorted({n.split("_")[0]: n for n in list_backbones()}.values()))
def test_unknown_option_is_a_config_error_in_every_family(name: str) -> None:
    with pytest.raises(ConfigError, match="option 'drop_path'. Did you mean 'drop_path_rate'"):
        build_backbone(name, 2, drop_path=0.1)


def test_per_axis_options_of_the_wrong_length_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"window_size: expected 3 values"):
        build_backbone("swinv2_tiny", 3, window_size=(4, 8))
    with pytest.raises(ConfigError, match=r"kernel_size: expected 3 values"):
        build_backbone("conv2former_n", 3, kernel_size=(3, 3))
    with pytest.raises(ConfigError, match=r"strides: expected 3 values"):
        build_backbone("convnext_atto", 3, strides=((1, 2), 2, 2, 2))


def test_per_stage_values() -> None:
    from backbones.base import per_stage
    assert per_stage(2, 3, 3) == [(2, 2, 2)] * 3
    assert per_stage((1, 2, 2), 4, 3) == [(1, 2, 2)] * 4            # one per-axis tuple for all
    assert per_stage([(1, 2, 2), 2, 2, 2], 4, 3) == [(1, 2, 2)] + [(2, 2, 2)] * 3
    assert per_stage((4, 2, 2), 3, 3) == [(4, 4, 4), (2, 2, 2), (2, 2, 2)]  # length = count: per stage
    with pytest.raises(ConfigError, match="strides needs 4 entries"):
        per_stage((4, 2, 2), 4, 3, broadcast=False)
    with pytest.raises(ConfigError, match="sr_ratios must be positive"):
        per_stage([1, 0], 2, 2, "sr_ratios")


def test_registry_defaults_apply_and_user_options_win() -> None:
    """Per-variant run defaults live in the registry (as timm's per-variant configs): a config
    names a backbone alone and gets them; its own options win; ``build_backbone`` keeps the
    architecture's own defaults (timm's 7^d ConvNeXt, so its weights load)."""
    from backbones import backbone_options
    from hparam import Config
    from seg.spec import model_config_from
    from seg.config import apply_overrides

    assert backbone_options("convnext_atto") == {"kernel_size": 3}
    assert backbone_options("convnext_tiny", {"kernel_size": 7, "drop_path_rate": 0.1}) == {
        "kernel_size": 7, "drop_path_rate": 0.1}
    assert backbone_options("repvgg_a0") == {}
    assert build_backbone("convnext_atto", 2).stages[0].blocks[0].conv_dw.kernel_size == (7, 7)
    sets = ["data.class_names=['bg','a']", "data.in_channels=1"]
    for backbone, kwargs in (("convnext_atto", {"kernel_size": 3}), ("repvgg_a0", {})):
        cfg = apply_overrides(Config(), [*sets, f"model.backbone={backbone}"]).validate()
        assert model_config_from(cfg)["backbone_kwargs"] == kwargs  # checkpoints store the merged options
    cfg = apply_overrides(Config(), [*sets, "model.backbone_kwargs={'kernel_size': 7}"])
    assert model_config_from(cfg)["backbone_kwargs"] == {"kernel_size": 7}
