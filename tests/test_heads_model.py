"""Coarse heads, point head and SegmentationModel in 2D and 3D (tiny contract-following backbone,
plus the real backbones when ``import backbones`` works)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from heads import INPUT, FeatureInfo, HeadOutput, StandardPointHead, build_head, list_heads
from heads.deeplab import default_atrous_rates
from seg import ops
from seg import pointrend as pr
from seg.errors import ConfigError
from seg.losses import deep_supervision_weights, masked_cross_entropy, soft_dice_loss
from seg.model import SegmentationModel, TrainOutput, assemble_model, build_model

from helpers import point_options

SIZES = {2: (37, 45), 3: (19, 27, 23)}  # odd, non-cubic, not multiples of the strides
DIMS = [2, 3]


class TinyBackbone(nn.Module):
    """Follows the backbone contract: ordered dict fine -> coarse + ``feature_info``.

    Args:
        spatial_dims: 2 or 3.
        in_chans: input channels.
        channels: one width per level.
        stem_stride: per-axis stride of the first level (a patchify conv).
        factor: per-axis stride factor between levels (e.g. (1, 2, 2) for anisotropic 3D).
    """

    def __init__(self, spatial_dims, in_chans=1, channels=(6, 8, 10, 12), stem_stride=4,
                 factor=2):
        super().__init__()
        stem = ops.to_ntuple(stem_stride, spatial_dims)
        factor = ops.to_ntuple(factor, spatial_dims)
        self.spatial_dims = spatial_dims
        self.stages = nn.ModuleList([nn.Sequential(
            ops.conv(spatial_dims, in_chans, channels[0], stem, stride=stem, padding=0),
            nn.ReLU())])
        self.feature_info, stride = [FeatureInfo("s0", channels[0], stem)], stem
        for i in range(1, len(channels)):
            self.stages.append(nn.Sequential(
                ops.conv(spatial_dims, channels[i - 1], channels[i], 3, stride=factor), nn.ReLU()))
            stride = tuple(s * f for s, f in zip(stride, factor))
            self.feature_info.append(FeatureInfo(f"s{i}", channels[i], stride))

    def forward(self, x):
        out = {}
        for info, stage in zip(self.feature_info, self.stages):
            x = out[info.name] = stage(x)
        return out


def _labels(shape, k, seed=0, ignore_frac=0.1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = 255
    return labels


def _model(d, head="deeplab", pointrend=True, k=3, **bb):
    torch.manual_seed(0)
    head_kwargs = {"deeplab": {"channels": 16, "low_level_channels": 8}, "mask": {"fc_dim": 32},
                   "unet": {"deep_supervision": 1}}[head]
    if head == "mask":
        bb.setdefault("channels", (6,))  # the mask head reads one level only
    pr_opts = point_options(fc_dim=16) if pointrend is True else pointrend
    return assemble_model(TinyBackbone(d, 2, **bb), d, k, head, head_kwargs, pr_opts,
                          in_channels=2, input_stages=(6,))


# heads from a declaration ----------------------------------------------------------------------
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("head", ["deeplab", "mask"])
def test_head_from_feature_info(d, head):
    info = [FeatureInfo(f"l{i}", 4 + i, (2 ** (i + 2),) * d) for i in range(4)]  # strides 4..32
    kwargs = {"channels": 8} if head == "deeplab" else {"fc_dim": 16}
    net = build_head(head, info, 5, d, **kwargs)
    size = SIZES[d]
    feats = {f.name: torch.randn(2, f.channels, *(math.ceil(s / f.stride[0]) for s in size))
             for f in info}
    out = net(feats)
    expected = feats["l1"].shape[2:] if head == "deeplab" else (7,) * d  # stride 8 / 7^d
    assert isinstance(out, HeadOutput) and out.aux == []
    assert out.logits.shape == (2, 5, *expected)
    # the input's levels in the declaration change nothing a head chooses by stride
    with_input = [FeatureInfo(INPUT, 3, (1,) * d), FeatureInfo("input_s2", 2, (2,) * d), *info]
    assert build_head(head, with_input, 5, d, **kwargs).state_dict().keys() == net.state_dict().keys()
    assert set(list_heads()) >= {"deeplab", "mask", "unet"}


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("output_stride", [1, 2, 4, 8])
def test_unet_head_output_stride(d, output_stride):
    info = [FeatureInfo(INPUT, 3, (1,) * d), FeatureInfo("input_s2", 6, (2,) * d)]  # the input's levels
    info += [FeatureInfo(f"l{i}", 4 + i, (2 ** (i + 2),) * d) for i in range(4)]  # strides 4..32
    size = SIZES[d]
    feats = {f.name: torch.randn(2, f.channels, *(math.ceil(s / f.stride[0]) for s in size))
             for f in info}
    net = build_head("unet", info, 5, d, output_stride=output_stride, stride1_channels=4)
    assert net.output_stride == (output_stride,) * d
    # its own stage only at stride 1; the input stage read as a skip only when not coarser than
    # the logits; the raw input only by the stride-1 stage
    assert (net.stride1 is not None) == (output_stride == 1)
    assert net.in_features == {1: [INPUT, "input_s2", "l0", "l1", "l2", "l3"],
                               2: ["input_s2", "l0", "l1", "l2", "l3"],
                               4: ["l0", "l1", "l2", "l3"], 8: ["l1", "l2", "l3"]}[output_stride]
    out = net.eval()({name: feats[name] for name in net.in_features})  # reads nothing else
    assert out.logits.shape == (2, 5, *(math.ceil(s / output_stride) for s in size))
    assert out.aux == []
    with pytest.raises(ConfigError, match="power of two"):
        build_head("unet", info, 5, d, output_stride=3)
    with pytest.raises(ConfigError, match="none of this model's strides"):
        build_head("unet", info, 5, d, output_stride=64)
    with pytest.raises(ConfigError, match="model.input_stages"):  # stride 2 without an input stage
        build_head("unet", [info[0], *info[2:]], 5, d, output_stride=2)
    with pytest.raises(ConfigError, match="reads the input level 'input'"):
        build_head("unet", info[1:], 5, d)


def test_input_stage_strides_anisotropic():
    # finest level (2, 4, 4): one input stage, at (2, 2, 2); depth stops doubling at the backbone's
    from seg.model import input_stage_strides, model_feature_info
    assert input_stage_strides((2, 4, 4)) == [(2, 2, 2)]
    assert input_stage_strides((4, 8, 8)) == [(2, 2, 2), (4, 4, 4)]
    assert input_stage_strides((2, 2, 2)) == [] and input_stage_strides((1, 4, 4)) == [(1, 2, 2)]
    info = model_feature_info([("a", 6, (2, 4, 4)), ("b", 8, (2, 8, 8))], 3, 1, (5, 7))
    assert [(f.name, f.channels, f.stride) for f in info[:2]] == [(INPUT, 1, (1, 1, 1)),
                                                                 ("input_s2", 5, (2, 2, 2))]
    net = build_head("unet", info, 2, 3, output_stride=1).eval()
    size = (9, 30, 34)
    feats = {INPUT: torch.randn(1, 1, *size), "input_s2": torch.randn(1, 5, 5, 15, 17),
             "a": torch.randn(1, 6, 5, 8, 9), "b": torch.randn(1, 8, 5, 4, 5)}
    assert net(feats).logits.shape == (1, 2, *size)
    with pytest.raises(ConfigError, match="rename the backbone's level"):
        model_feature_info([("input_s4", 6, (4, 4, 4))], 3, 1)


def test_deep_supervision_loss_is_nnunets_weighted_sum():
    assert deep_supervision_weights(0) == [1.0]
    assert deep_supervision_weights(2) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    model = _model(3, "unet", pointrend=None)
    assert model.head.deep_supervision == 1
    size = SIZES[3]
    images, labels = torch.randn(2, 2, *size), _labels((2, *size), 3)
    out = model.forward_train(images, labels)
    assert [a.shape[2:] for a in out.aux_logits] == [model.features(images)["s0"].shape[2:]]
    losses = model.loss(out, labels)
    main = model.loss(TrainOutput(out.coarse_logits), labels)
    # the aux target: the label of the voxel nearest each aux cell centre (closed form per axis)
    aux = out.aux_logits[0]
    idx = [((torch.arange(n) + 0.5) * s / n).floor().long() for n, s in zip(aux.shape[2:], size)]
    target = labels[:, idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :]]
    aux_ce = masked_cross_entropy(aux, target)
    aux_dice = soft_dice_loss(aux, target)
    torch.testing.assert_close(losses["coarse_ce"], 2 / 3 * main["coarse_ce"] + 1 / 3 * aux_ce)
    torch.testing.assert_close(losses["coarse_dice"],
                               2 / 3 * main["coarse_dice"] + 1 / 3 * aux_dice)
    # inference: the same result type, no aux
    model.eval()
    out = model.head(model.features(images))
    assert isinstance(out, HeadOutput) and out.aux == []


def test_head_options_and_errors():
    info = [FeatureInfo("a", 4, (4, 4)), FeatureInfo("b", 6, (32, 32))]
    assert build_head("deeplab", info, 2, 2, channels=8, fuse=False).output_stride == (32, 32)
    assert build_head("deeplab", info, 2, 2, channels=8).output_stride == (4, 4)  # nearest to 8
    with pytest.raises(ConfigError, match="deeplab"):
        build_head("deeplap", info, 2, 2)
    with pytest.raises(ConfigError, match="Did you mean 'channels'"):
        build_head("deeplab", info, 2, 2, channel=8)
    with pytest.raises(ConfigError, match="in_feature 'c'"):
        build_head("mask", info, 2, 2, in_feature="c")
    assert default_atrous_rates((32, 32)) == [(3, 3), (6, 6), (9, 9)]
    assert default_atrous_rates((8, 32, 32)) == [(12, 3, 3), (24, 6, 6), (36, 9, 9)]
    # the 3D mask head keeps the 2D FC input width 256 * 7^2
    mask3 = build_head("mask", [FeatureInfo("a", 4, (4, 4, 4))], 2, 3, fc_dim=8)
    assert mask3.fcs[0].in_features == (12544 // 343) * 343
    assert build_head("mask", info, 2, 2, fc_dim=8).fcs[0].in_features == 12544


def test_point_head_reference_and_init():
    torch.manual_seed(0)
    head = StandardPointHead(5, 3, num_fc=2, fc_dim=7, coarse_pred_each_layer=True).double()
    assert [m.in_channels for m in head.fcs] == [8, 10] and head.predictor.in_channels == 10
    fine, coarse = torch.randn(2, 5, 11).double(), torch.randn(2, 3, 11).double()
    x = torch.cat([fine, coarse], 1)
    for fc in head.fcs:  # independent reference: matmul per point
        x = torch.cat([torch.relu(torch.einsum("oi,nip->nop", fc.weight[..., 0], x)
                                  + fc.bias[:, None]), coarse], 1)
    ref = torch.einsum("oi,nip->nop", head.predictor.weight[..., 0], x)
    torch.testing.assert_close(head(fine, coarse), ref)
    big = StandardPointHead(64, 4)
    assert big.predictor.weight.std().item() == pytest.approx(0.001, rel=0.2)
    assert (big.predictor.bias == 0).all() and (big.fcs[0].bias == 0).all()
    # kaiming fan_out: std = sqrt(2 / fan_out) = sqrt(2 / 256)
    assert big.fcs[1].weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.05)


# the model ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("head", ["deeplab", "mask", "unet"])
def test_train_step_gradients_reach_every_parameter(d, head):
    model = _model(d, head)
    images, labels = torch.randn(2, 2, *SIZES[d]), _labels((2, *SIZES[d]), 3)
    out = model.forward_train(images, labels)
    assert isinstance(out, TrainOutput)
    assert out.point_logits.shape == (2, 3, 64) and out.point_coords.shape == (2, 64, d)
    torch.testing.assert_close(out.point_labels, pr.sample_point_labels(labels, out.point_coords))
    losses = model.loss(out, labels)
    assert set(losses) == {"coarse_ce", "coarse_dice", "point", "total"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["total"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("d", DIMS)
def test_all_ignored_labels_give_finite_losses(d):
    model = _model(d)
    images, labels = torch.randn(1, 2, *SIZES[d]), torch.full((1, *SIZES[d]), 255)
    losses = model.loss(model.forward_train(images, labels), labels)
    assert all(v.item() == 0.0 for v in losses.values())
    losses["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("head", ["deeplab", "mask", "unet"])
def test_infer_modes(d, head):
    model = _model(d, head).eval()
    images = torch.randn(2, 2, *SIZES[d])
    outs = {m: model.forward_infer(images, m) for m in ("coarse", "subdivision", "dense")}
    for out in outs.values():
        assert out.shape == (2, 3, *SIZES[d]) and torch.isfinite(out).all()
    torch.testing.assert_close(model(images), outs["subdivision"])
    features = model.features(images)
    assert list(features) == [f.name for f in model.feature_info]
    coarse = model.head(features).logits
    torch.testing.assert_close(outs["coarse"], ops.resize(coarse, SIZES[d]))
    # P9 at model level: a budget covering every cell makes subdivision equal to dense
    model.pointrend["subdivision_num_points"] = math.prod(SIZES[d])
    torch.testing.assert_close(model.forward_infer(images), outs["dense"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d", DIMS)
def test_without_pointrend(d):
    model = _model(d, pointrend=None).eval()
    assert model.point_head is None
    images, labels = torch.randn(1, 2, *SIZES[d]), _labels((1, *SIZES[d]), 3)
    out = model.forward_train(images, labels)
    assert out.point_logits is None and out.point_labels is None
    assert model.loss(out, labels)["point"].item() == 0.0
    torch.testing.assert_close(model(images), model.forward_infer(images, "coarse"))
    with pytest.raises(ValueError, match="dense"):
        model.forward_infer(images, "dense")


def test_anisotropic_3d_subdivision():
    # strides (2,4,4), (2,8,8), (2,16,16): the D axis is never subdivided
    model = _model(3, channels=(6, 8, 10), stem_stride=(2, 4, 4), factor=(1, 2, 2)).eval()
    model.pointrend["subdivision_num_points"] = 100
    size = (10, 32, 40)
    out = model.forward_infer(torch.randn(1, 2, *size))
    assert out.shape == (1, 3, *size)
    coarse_size = (5, 4, 5)  # the stride-(2, 8, 8) level is the one nearest to 8
    sizes = pr.subdivision_sizes(coarse_size, size)
    assert sizes == [(10, 8, 10), (10, 16, 20), (10, 32, 40)]
    assert model.last_point_evaluations == sum(min(100, math.prod(s)) for s in sizes)


def test_options_json_and_errors():
    opts = point_options(train_num_points=32, in_features=["s0", "s1"], num_fc=2, fc_dim=8,
                         coarse_pred_each_layer=True)
    assert json.loads(json.dumps(opts)) == opts
    model = assemble_model(TinyBackbone(2, 1), 2, 2, "deeplab", {"channels": 8}, opts)
    assert model.point_head.fcs[0].in_channels == 6 + 8 + 2  # two fine levels + K
    x = torch.randn(1, 1, 33, 35)
    assert model.forward_infer(x).shape == (1, 2, 33, 35)
    with pytest.raises(ConfigError, match="train_num_points"):
        assemble_model(TinyBackbone(2, 1), 2, 2, pointrend={**point_options(), "train_num_point": 3})
    with pytest.raises(ConfigError, match="s1"):
        assemble_model(TinyBackbone(2, 1), 2, 2, pointrend=point_options(in_features=["s7"]))
    assert _model(2, pointrend=point_options(enabled=False)).point_head is None
    # the library holds no defaults: incomplete options and unplanned budgets are errors
    partial = point_options()
    del partial["fc_dim"]
    with pytest.raises(ConfigError, match="lack fc_dim"):
        assemble_model(TinyBackbone(2, 1), 2, 2, pointrend=partial)
    with pytest.raises(ConfigError, match="'auto'"):
        assemble_model(TinyBackbone(2, 1), 2, 2, pointrend=point_options(train_num_points="auto"))
    from hparam import PointRendConfig
    model = assemble_model(TinyBackbone(2, 1), 2, 2, pointrend=PointRendConfig(
        train_num_points=96, subdivision_num_points=300))  # the dataclass itself is accepted
    assert model.pointrend["train_num_points"] == 96 and model.input_stages is not None


# real backbones (guarded only while they are missing) ------------------------------------------
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("name", ["convnext_atto", "repvgg_a0"])
def test_real_backbones(d, name):
    size = (64, 64) if d == 2 else (32, 32, 32)
    model = build_model(d, 1, 2, backbone=name, head="deeplab", head_kwargs={"channels": 16},
                        pointrend=point_options(train_num_points=32, fc_dim=16))
    assert isinstance(model, SegmentationModel)
    # batch 2: RepVGG's BatchNorm needs more than one value per channel at the 1-cell stride-32 level
    images, labels = torch.randn(2, 1, *size), _labels((2, *size), 2)
    model.loss(model.forward_train(images, labels), labels)["total"].backward()
    assert model.eval().forward_infer(images).shape == (2, 2, *size)


@pytest.mark.parametrize("d", DIMS)
def test_mask_head_boxes(d):
    torch.manual_seed(0)
    info = [FeatureInfo("a", 4, (4,) * d)]
    head = build_head("mask", info, 3, d, fc_dim=16).double()
    feats = {"a": torch.randn(2, 4, *SIZES[d], dtype=torch.float64)}
    whole = head(feats).logits
    assert whole.shape == (2, 3, *(7,) * d)
    boxes, batch = pr.whole_input_boxes(2, d, dtype=torch.float64)
    torch.testing.assert_close(head(feats, boxes[[1, 0, 1]], batch[[1, 0, 1]]).logits,
                               whole[[1, 0, 1]])
    labels = torch.zeros(2, *SIZES[d], dtype=torch.long)
    labels[(1,) + (slice(2, 9),) * d] = 2
    boxes, batch, classes = pr.boxes_from_labels(labels, 3, jitter=0.1)
    out = head(feats, boxes.double(), batch).logits
    assert out.shape == (1, 3, *(7,) * d) and classes.tolist() == [2]
    out.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


@pytest.mark.parametrize("d", DIMS)
def test_point_head_reads_the_image(d):
    opts = point_options(fc_dim=16, image_features="neighbourhood")
    torch.manual_seed(0)
    model = assemble_model(TinyBackbone(d, 2), d, 3, "deeplab", {"channels": 16,
                                                                  "low_level_channels": 8},
                           opts, in_channels=2, input_stages=(6,))
    plain = _model(d)
    # two input channels x (point + 2d neighbours) more fine channels than without
    assert model.point_head.fcs[0].in_channels == \
        plain.point_head.fcs[0].in_channels + 2 * (2 * d + 1)
    images, labels = torch.randn(2, 2, *SIZES[d]), _labels((2, *SIZES[d]), 3)
    losses = model.loss(model.forward_train(images, labels), labels)
    losses["total"].backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    features = model.features(images)
    assert features[INPUT] is images  # the input is a feature level (stride 1)
    coarse = model.head(features).logits
    coords = torch.rand(2, 50, d)
    fn = model._point_fn(features, coarse)
    moved = model._point_fn({**features, INPUT: images + 1.0}, coarse)  # other intensities only
    assert not torch.allclose(fn(coords), moved(coords))
    out = model.forward_infer(images, "dense")
    torch.testing.assert_close(out, model.infer_from_features(features, coarse, SIZES[d], "dense"))
    with pytest.raises(ConfigError, match="image_features"):
        assemble_model(TinyBackbone(d, 2), d, 3, pointrend=point_options(image_features="patch"))


@pytest.mark.parametrize("d", DIMS)
def test_one_input_stage_serves_the_decoder_and_the_point_head(d):
    model = _model(d, "unet")
    stages = model.input_stages
    assert [(f.name, f.stride) for f in model.feature_info[:2]] == [("input", (1,) * d),
                                                                    ("input_s2", (2,) * d)]
    assert "input_s2" in model.head.in_features
    assert model.pointrend["in_features"] == ["s0", "input_s2"]
    assert model.point_head.fcs[0].in_channels == 6 + 6 + 3  # s0, input_s2, coarse logits
    images, labels = torch.randn(2, 2, *SIZES[d]), _labels((2, *SIZES[d]), 3)
    assert model.features(images)["input_s2"].shape == (2, 6, *[(s + 1) // 2 for s in SIZES[d]])
    for term in ("point", "coarse_ce"):  # trained through the point loss, and the coarse loss
        model.zero_grad()
        model.loss(model.forward_train(images, labels), labels)[term].backward()
        for name, p in stages.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (term, name)
    model.eval()
    dense = model.forward_infer(images, "dense")
    torch.nn.init.zeros_(stages.stages[0][3].weight)  # a real input to the point head
    assert not torch.allclose(dense, model.forward_infer(images, "dense"))
    # nothing reads it: not built (a DeepLab head with detectron2's point-head levels)
    lone = _model(d, "deeplab", point_options(fc_dim=16, in_features=["s0"]))
    assert lone.input_stages is None and [f.name for f in lone.feature_info][:2] == ["input", "s0"]
    assert _model(d, "deeplab").pointrend["in_features"] == ["s0", "input_s2"]  # the default reads it
    with pytest.raises(ConfigError, match="model.input_stages"):
        assemble_model(TinyBackbone(d, 2), d, 3, input_stages=(0,))