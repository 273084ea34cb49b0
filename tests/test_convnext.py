"""ConvNeXt against timm (an independent implementation): weights, features, layouts, inflation."""
from __future__ import annotations

import math
import re

import pytest
import torch

from backbones import build_backbone
from backbones.convnext import checkpoint_filter_fn
from backbones.pretrained import load_pretrained
from seg.errors import ConfigError

timm = pytest.importorskip("timm")

VARIANTS = ["convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny",
            "convnext_small", "convnext_base"]
ANISO = ((1, 4, 4), (1, 2, 2), (2, 2, 2), (2, 2, 2))


def timm_atto() -> torch.nn.Module:
    """timm convnext_atto with every norm, bias and layer-scale gamma randomised too."""
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.normal_(0.0, 0.5)
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(timm model, path of its saved state dict)."""
    model = timm_atto()
    path = tmp_path_factory.mktemp("ckpt") / "timm_atto.pth"
    torch.save(model.state_dict(), path)
    return model, path


def timm_features(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.forward_intermediates(x, indices=4, intermediates_only=True)


def our_features(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model.eval()(x).values())


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [t.shape for t in a] == [t.shape for t in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm keys -> facebookresearch/ConvNeXt keys, written independently of the model code."""
    out = {}
    for k, v in sd.items():
        if k.startswith("stem."):
            k = "downsample_layers.0." + k[len("stem."):]
        elif m := re.match(r"stages\.(\d+)\.downsample\.(\d)\.(.*)", k):
            k = f"downsample_layers.{m[1]}.{m[2]}.{m[3]}"
        elif m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", k):
            rest = m[3].replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
            if rest.startswith("pwconv") and v.ndim == 4:
                v = v[:, :, 0, 0]  # official MLP is nn.Linear: (O, I, 1, 1) -> (O, I)
            k = f"stages.{m[1]}.{m[2]}.{rest}"
        elif k.startswith("head.norm."):
            k = "norm." + k[len("head.norm."):]
        out[k] = v
    out["head.weight"], out["head.bias"] = torch.randn(1000, 320), torch.zeros(1000)
    return out


@pytest.mark.parametrize("name", VARIANTS)
def test_param_count_matches_timm(name: str) -> None:
    """Same parameters as timm's feature trunk (timm's extra: the classifier's final norm)."""
    ours = sum(p.numel() for p in build_backbone(name, 2, in_chans=3).parameters())
    ref = timm.create_model(name, pretrained=False, num_classes=0)
    head_norm = sum(p.numel() for p in ref.head.norm.parameters())
    assert ours == sum(p.numel() for p in ref.parameters()) - head_norm


def test_features_equal_timm(reference) -> None:
    ref, path = reference
    x = torch.randn(2, 3, 64, 96)
    ours = build_backbone("convnext_atto", 2, in_chans=3, pretrained=str(path))
    diff = max_diff(our_features(ours, x), timm_features(ref, x))
    print(f"timm layout max abs diff: {diff:.2e}")
    assert diff < 1e-5


def test_official_layout_loads_identically(reference, tmp_path) -> None:
    ref, path = reference
    official = to_official(ref.state_dict())
    torch.save({"model": official, "epoch": 300}, tmp_path / "official.pth")
    a = build_backbone("convnext_atto", 2, in_chans=3, pretrained=str(path))
    b = build_backbone("convnext_atto", 2, in_chans=3, pretrained=str(tmp_path / "official.pth"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(1, 3, 64, 64)
    diff = max_diff(our_features(b, x), timm_features(ref, x))
    print(f"official layout max abs diff: {diff:.2e}")
    assert diff < 1e-5


def test_filter_drops_classifier_and_unbuilt_stages(reference) -> None:
    ref, path = reference
    model = build_backbone("convnext_atto", 2, in_chans=3, out_indices=(1, 2))
    sd = checkpoint_filter_fn(to_official(ref.state_dict()), model)
    assert set(sd) == set(model.state_dict())
    load_pretrained(model, path)
    x = torch.randn(1, 3, 64, 64)
    feats = our_features(model, x)
    assert list(model(x)) == ["stage1", "stage2"]
    assert max_diff(feats, timm_features(ref, x)[1:3]) < 1e-5


def test_single_channel_stem_sums_rgb(reference) -> None:
    ref, path = reference
    ours = build_backbone("convnext_atto", 2, in_chans=1)
    report = load_pretrained(ours, path)
    assert "stem.conv.weight" in report.adapted
    x = torch.randn(2, 1, 64, 64)
    diff = max_diff(our_features(ours, x), timm_features(ref, x.repeat(1, 3, 1, 1)))
    print(f"in_chans=1 max abs diff: {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.parametrize("strides", [(4, 2, 2, 2), ANISO])
def test_inflated_3d_equals_2d_on_identical_slices(reference, strides) -> None:
    _, path = reference
    net2d = build_backbone("convnext_atto", 2, in_chans=1, pretrained=str(path))
    net3d = build_backbone("convnext_atto", 3, in_chans=1, strides=strides)
    report = load_pretrained(net3d, path, inflate="center")
    assert "stages.0.blocks.0.conv_dw.weight" in report.adapted
    torch.manual_seed(1)
    img = torch.randn(1, 1, 64, 64)
    vol = img.unsqueeze(2).expand(-1, -1, 32, -1, -1)  # (1, 1, H, W) -> (1, 1, D, H, W)
    worst = 0.0
    for f2, f3, info in zip(our_features(net2d, img), our_features(net3d, vol), net3d.feature_info):
        assert f3.shape[2] == math.ceil(32 / info.stride[0])
        worst = max(worst, (f3 - f2.unsqueeze(2)).abs().max().item())
    print(f"inflation (strides {strides}) max abs diff: {worst:.2e}")
    assert worst < 1e-5


def test_mean_inflation_stem_on_identical_slices(reference) -> None:
    _, path = reference
    net2d = build_backbone("convnext_atto", 2, pretrained=str(path)).eval()
    net3d = build_backbone("convnext_atto", 3).eval()
    load_pretrained(net3d, path, inflate="mean")
    img = torch.randn(1, 1, 32, 32)
    vol = img.unsqueeze(2).expand(-1, -1, 8, -1, -1)  # (1, 1, H, W) -> (1, 1, D, H, W)
    with torch.no_grad():
        s2, s3 = net2d.stem(img), net3d.stem(vol)
    assert torch.allclose(s3, s2.unsqueeze(2).expand_as(s3), atol=1e-5)


@pytest.mark.parametrize("dims,size", [(2, (45, 37)), (3, (21, 27, 19))])
def test_output_size_is_ceil(dims: int, size: tuple[int, ...]) -> None:
    model = build_backbone("convnext_atto", dims)
    with torch.no_grad():
        feats = model(torch.randn(1, 1, *size))
    for info, f in zip(model.feature_info, feats.values()):
        assert tuple(f.shape[2:]) == tuple(math.ceil(s / t) for s, t in zip(size, info.stride))


def test_anisotropic_strides_declared() -> None:
    model = build_backbone("convnext_atto", 3, strides=ANISO)
    strides = [f.stride for f in model.feature_info]
    assert strides == [(1, 4, 4), (1, 8, 8), (2, 16, 16), (4, 32, 32)]
    assert model.stem.conv.kernel_size == (1, 4, 4)
    with torch.no_grad():
        feats = model(torch.randn(1, 1, 5, 27, 19))
    sizes = [tuple(f.shape[2:]) for f in feats.values()]
    assert sizes == [(5, 7, 5), (5, 4, 3), (3, 2, 2), (2, 1, 1)]


def test_grad_checkpointing_same_gradients() -> None:
    torch.manual_seed(0)
    plain = build_backbone("convnext_atto", 3)
    ckpt = build_backbone("convnext_atto", 3, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 9, 16, 12)
    for model in (plain, ckpt):
        sum(f.sum() for f in model(x).values()).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="drop_path_rate"):
        build_backbone("convnext_atto", 2, drop_path=0.1)
    with pytest.raises(ConfigError, match="strides"):
        build_backbone("convnext_atto", 3, strides=(4, 2, 2))
    with pytest.raises(ConfigError, match="out_indices"):
        build_backbone("convnext_atto", 2, out_indices=(4,))
    with pytest.raises(ValueError, match="spatial_dims"):
        build_backbone("convnext_atto", 1)
