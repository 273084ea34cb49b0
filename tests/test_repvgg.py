"""RepVGG backbone: shapes against feature_info, re-parameterisation, equivalence with timm."""
import math
import re

import pytest
import torch
import torch.nn as nn

from backbones import build_backbone, list_backbones, reparameterize_model
from backbones.repvgg import RepVGG, RepVGGBlock, checkpoint_filter_fn
from seg.errors import ConfigError, UserError

VARIANTS = ["repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_b0", "repvgg_b1", "repvgg_b1g2",
            "repvgg_b1g4"]
ODD = {2: (45, 37), 3: (19, 27, 23)}
#: a small grouped configuration: every block after the stem is grouped (layers 1..6)
SMALL = dict(depths=(1, 2, 2, 1), width_multipliers=(0.125, 0.125), groups=2,
             grouped_layers=(1, 2, 3, 4, 5, 6))


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, as the RepVGG authors test it."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            m.weight.data.copy_(0.5 + 0.5 * torch.rand(n, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=gen))
    return model


def _rel_diff(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in a)


def _check_against_info(model, out, size):
    assert list(out) == model.feature_names()
    for info, (name, y) in zip(model.feature_info, out.items()):
        expect = tuple(math.ceil(n / s) for n, s in zip(size, info.stride))
        assert y.shape[1:] == (info.channels, *expect), name
        assert torch.isfinite(y).all(), name


# building and shapes ---------------------------------------------------------------------------
def test_all_variants_registered():
    assert set(VARIANTS) <= set(list_backbones())


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_builds(name, d):
    with torch.device("meta"):  # no memory, no init: only the structure is checked
        model = build_backbone(name, d)
    assert model.spatial_dims == d and len(model.stages) == 4
    assert [f.name for f in model.feature_info] == ["stage1", "stage2", "stage3", "stage4"]
    assert [f.stride for f in model.feature_info] == [(s,) * d for s in (4, 8, 16, 32)]
    assert model.stem.conv_kxk.conv.weight.shape[1:] == (1,) + (3,) * d
    groups = {m.groups for m in model.modules() if isinstance(m, RepVGGBlock)}
    assert groups == ({1, int(name[-1])} if "g" in name[-2:] else {1})


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("name", ["repvgg_a0", "repvgg_b1g2"])
def test_forward_odd_sizes_and_gradients(name, d):
    torch.manual_seed(0)
    model = build_backbone(name, d)
    x = torch.randn(2, 1, *ODD[d])
    out = model(x)
    _check_against_info(model, out, ODD[d])
    sum(y.mean() for y in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_paper_grouping_b1g2():
    with torch.device("meta"):
        model = build_backbone("repvgg_b1g2", 2)
    blocks = [model.stem] + [b for stage in model.stages for b in stage]
    grouped = [i for i, b in enumerate(blocks) if b.groups == 2]
    assert grouped == list(range(2, 27, 2))
    assert all(b.conv_1x1.conv.groups == b.groups for b in blocks)


@pytest.mark.parametrize("name", ["repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_b0", "repvgg_b1",
                                  "repvgg_b1g4"])
def test_parameter_count_matches_timm(name):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
        ours = build_backbone(name, 2, in_chans=3)
    ref_count = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("head."))
    assert sum(p.numel() for p in ours.parameters()) == ref_count


def test_options_out_indices_strides_checkpointing_drop_path():
    kw = dict(SMALL, groups=1)
    model = RepVGG(3, 2, out_indices=(0, 1, 2), strides=((1, 2, 2), (1, 2, 2), 2, 2, 2), **kw)
    assert len(model.stages) == 2  # stages after the last output are not built
    assert [f.stride for f in model.feature_info] == [(1, 2, 2), (1, 4, 4), (2, 8, 8)]
    x = torch.randn(2, 2, 5, 17, 14)
    _check_against_info(model, model(x), x.shape[2:])

    torch.manual_seed(0)
    plain = RepVGG(2, 1, **kw)
    ckpt = RepVGG(2, 1, grad_checkpointing=True, **kw)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 21, 18)
    for m in (plain, ckpt):
        sum(y.sum() for y in m(x).values()).backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)

    dropped = RepVGG(2, 1, drop_path_rate=0.5, **kw).eval()
    torch.testing.assert_close(dropped(x), dropped(x))  # identity in eval mode

    with pytest.raises(ConfigError, match="drop_path_rate"):
        build_backbone("repvgg_a0", 2, drop_path_rat=0.1)
    with pytest.raises(ConfigError, match="out_indices"):
        build_backbone("repvgg_a0", 2, out_indices=(5,))


# re-parameterisation ---------------------------------------------------------------------------
@pytest.mark.parametrize("d, kwargs, size", [
    (2, dict(depths=(2, 4, 14, 1), width_multipliers=(0.75, 2.5)), (45, 37)),  # repvgg_a0
    (2, SMALL, (45, 37)),
    (3, SMALL, (19, 27, 23)),
    (3, dict(SMALL, strides=((1, 2, 2), (1, 2, 2), 2, 2, 2), out_indices=(0, 1, 2, 3, 4)),
     (7, 27, 23)),
])
def test_reparameterize_matches_training_form(d, kwargs, size):
    torch.manual_seed(0)
    model = _randomise_bn(RepVGG(d, 2, **kwargs)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 2, *size)
    with torch.no_grad():
        ref = model(x)
        fused = reparameterize_model(model)
        out = fused.eval()(x)
    assert _rel_diff(out, ref) < 1e-4
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert not any("conv_1x1" in n or "identity" in n for n, _ in fused.named_modules())
    assert all(isinstance(b.reparam_conv, nn.Conv2d if d == 2 else nn.Conv3d)
               for b in fused.modules() if isinstance(b, RepVGGBlock))
    # the original is untouched and still the training form
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(b.reparam_conv is None for b in model.modules() if isinstance(b, RepVGGBlock))
    same = reparameterize_model(model, inplace=True)
    assert same is model and model.stem.reparam_conv is not None


def test_reparameterize_double_precision_is_exact():
    torch.manual_seed(1)
    model = _randomise_bn(RepVGG(3, 1, **SMALL)).double().eval()
    x = torch.randn(1, 1, 9, 11, 10, dtype=torch.float64)
    with torch.no_grad():
        assert _rel_diff(reparameterize_model(model)(x), model(x)) < 1e-12


# pretrained weights ----------------------------------------------------------------------------
def _timm_features(model, x):
    """stage0 (stem) .. stage4 of a timm byobnet RepVGG, run block by block."""
    feats = {"stage0": model.stem(x)}
    for i, stage in enumerate(model.stages, start=1):
        feats[f"stage{i}"] = stage(feats[f"stage{i - 1}"])
    return feats


def _to_official(key: str) -> str:
    """Independent, hand-written timm -> DingXiaoH/RepVGG key map."""
    if key.startswith("head.fc."):
        return "linear." + key[len("head.fc."):]
    key = re.sub(r"^stem\.", "stage0.", key)
    key = re.sub(r"^stages\.(\d+)\.", lambda m: f"stage{int(m.group(1)) + 1}.", key)
    return (key.replace("conv_kxk.", "rbr_dense.").replace("conv_1x1.", "rbr_1x1.")
            .replace("identity.", "rbr_identity."))


@pytest.fixture(scope="module")
def timm_a0():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("repvgg_a0", pretrained=False)
    with torch.no_grad():
        _randomise_bn(model)
    return model.eval()


def test_official_key_map_is_what_the_official_layout_looks_like(timm_a0):
    keys = {_to_official(k) for k in timm_a0.state_dict()}
    assert {"stage0.rbr_dense.conv.weight", "stage1.0.rbr_1x1.bn.running_mean",
            "stage1.1.rbr_identity.running_var", "stage4.0.rbr_dense.bn.bias",
            "linear.weight"} <= keys


@pytest.mark.parametrize("layout", ["timm", "official"])
def test_loads_timm_and_official_checkpoints(timm_a0, tmp_path, layout):
    pytest.importorskip("backbones.pretrained")
    state = timm_a0.state_dict()
    if layout == "official":
        state = {_to_official(k): v for k, v in state.items()}
        assert not any(k.startswith(("stem.", "stages.")) for k in state)
    path = tmp_path / f"{layout}.pth"
    torch.save(state, path)
    ours = build_backbone("repvgg_a0", 2, in_chans=3, pretrained=str(path),
                          out_indices=(0, 1, 2, 3, 4)).eval()
    x = torch.randn(2, 3, 45, 37)
    with torch.no_grad():
        assert _rel_diff(ours(x), _timm_features(timm_a0, x)) < 1e-4


def test_filter_fn_renames_both_layouts(timm_a0):
    model = build_backbone("repvgg_a0", 2, in_chans=3, out_indices=(1, 2))
    timm_state = timm_a0.state_dict()
    for state in (timm_state, {_to_official(k): v for k, v in timm_state.items()},
                  {"state_dict": {"module." + k: v for k, v in timm_state.items()}}):
        out = checkpoint_filter_fn(state, model)
        assert set(out) == set(model.state_dict())  # classifier and unbuilt stages dropped
    deploy = {"stage0.rbr_reparam.weight": torch.zeros(48, 3, 3, 3)}
    with pytest.raises(UserError, match="deploy"):
        checkpoint_filter_fn(deploy, model)


def test_grey_stem_loads_both_stem_branches(timm_a0, tmp_path):
    """in_chans=1: the loader sums RGB into one channel, in the 3x3 AND the 1x1 stem conv, so a
    grey image must give timm's output on the same image repeated three times."""
    pytest.importorskip("backbones.pretrained")
    path = tmp_path / "timm.pth"
    torch.save(timm_a0.state_dict(), path)
    ours = build_backbone("repvgg_a0", 2, in_chans=1, pretrained=str(path), out_indices=(0, 1))
    x = torch.randn(2, 1, 33, 29)
    with torch.no_grad():
        ref = _timm_features(timm_a0, x.expand(-1, 3, -1, -1))
        out = ours.eval()(x)
    assert _rel_diff(out, {k: ref[k] for k in out}) < 1e-4


def test_3d_inflated_weights_reproduce_2d_on_identical_slices(timm_a0, tmp_path):
    """Centre-inflated 3x3 and 1x1 kernels: on a volume of identical slices every output slice
    equals timm's 2D output (grey stem, so the 1x1 branch's adaptation is checked in 3D too)."""
    pytest.importorskip("backbones.pretrained")
    path = tmp_path / "timm.pth"
    torch.save(timm_a0.state_dict(), path)
    ours = build_backbone("repvgg_a0", 3, in_chans=1, pretrained=str(path), out_indices=(0, 1, 2))
    x = torch.randn(1, 1, 33, 29)
    with torch.no_grad():
        ref = _timm_features(timm_a0, x.expand(-1, 3, -1, -1))
        out = ours.eval()(x.unsqueeze(2).expand(-1, -1, 5, -1, -1).contiguous())  # (1, 1, 5, H, W)
    _check_against_info(ours, out, (5, 33, 29))
    for name, y in out.items():
        for z in range(y.shape[2]):
            assert _rel_diff({name: y[:, :, z]}, {name: ref[name]}) < 1e-4
