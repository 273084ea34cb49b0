"""CMT: attention against torch's multi-head attention, the position-bias geometry against a
brute-force loop, per-axis strides and key reduction, 2D -> 3D weights, parameter counts."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn

from backbones import build_backbone
from backbones.cmt import CMT, LightweightAttention, RelativePositionBias, checkpoint_filter_fn
from backbones.pretrained import load_pretrained
from seg.errors import ConfigError

TINY = dict(stem_chans=8, dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
            mlp_ratio=2.0)


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Random weights everywhere, BatchNorm statistics included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # LayerNorm and BatchNorm scales
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_((0.2 if name.endswith("bias") else 0.5) * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def torch_mha(attn: LightweightAttention, dim: int, heads: int) -> nn.MultiheadAttention:
    """nn.MultiheadAttention carrying the same q, k, v and output projections."""
    mha = nn.MultiheadAttention(dim, heads, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
        mha.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
    return mha.eval()


@pytest.mark.parametrize("dims,size", [(2, (5, 7)), (3, (3, 4, 5))])
def test_attention_without_reduction_equals_multihead_attention(dims, size) -> None:
    dim, heads = 12, 3
    attn = LightweightAttention(dims, dim, heads, ratio=(1,) * dims).double().eval()
    randomize(attn)
    pos = RelativePositionBias(dims, heads, (1,) * dims).double()
    nn.init.zeros_(pos.mlp[2].weight), nn.init.zeros_(pos.mlp[2].bias)  # a zero bias
    x = torch.randn(2, *size, dim, dtype=torch.float64)
    tokens = x.reshape(2, -1, dim)  # (N, *S, C) -> (N, L, C), row-major
    with torch.no_grad():
        ref = torch_mha(attn, dim, heads)(tokens, tokens, tokens, need_weights=False)[0]
        ref = ref.reshape(x.shape)
        plain, biased = attn(x), attn(x, pos(size))
    diff = max((plain - ref).abs().max().item(), (biased - ref).abs().max().item())
    print(f"CMT attention (k=1, zero bias) vs nn.MultiheadAttention ({dims}D): "
          f"max abs diff {diff:.2e}")
    assert isinstance(attn.reduce, nn.Identity) and diff < 1e-12


@pytest.mark.parametrize("dims,size,ratio", [(2, (7, 9), (2, 4)), (3, (3, 5, 6), (1, 2, 4))])
def test_reduced_attention_with_bias_equals_reference(dims, size, ratio) -> None:
    """Keys/values from the reduction branch, bias added to the logits: softmax written out."""
    dim, heads = 8, 2
    attn = LightweightAttention(dims, dim, heads, ratio).double().eval()
    randomize(attn, seed=3)
    pos = RelativePositionBias(dims, heads, ratio).double()
    randomize(pos, seed=4)
    x = torch.randn(2, *size, dim, dtype=torch.float64)
    with torch.no_grad():
        kv = attn.reduce(x.movedim(-1, 1)).movedim(1, -1).reshape(2, -1, dim)  # (N, L_k, C)
        assert kv.shape[1] == math.prod(math.ceil(s / k) for s, k in zip(size, ratio))
        bias = pos(size)  # (h, L_q, L_k)

        def split(t):  # (N, L, C) -> (N, h, L, C/h)
            return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

        q = split(attn.q(x.reshape(2, -1, dim)))
        k, v = split(attn.k(kv)), split(attn.v(kv))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads) + bias, dim=-1)
        ref = attn.proj((w @ v).transpose(1, 2).reshape(2, -1, dim)).reshape(x.shape)
        diff = (attn(x, bias) - ref).abs().max().item()
    print(f"CMT reduced attention with bias vs explicit softmax ({dims}D): max abs diff {diff:.2e}")
    assert diff < 1e-12 and bias.abs().max() > 0.1


@pytest.mark.parametrize("size,ratio", [((5, 7), (2, 4)), ((3, 5, 4), (1, 2, 4)), ((4,), (3,))])
def test_position_bias_geometry_brute_force(size, ratio) -> None:
    """bias[h, q, k] = mlp(sign(r) log2(1 + |r|))[h], r = (i + 1/2) / k - 1/2 - j per axis."""
    heads = 3
    pos = RelativePositionBias(len(size), heads, ratio).double()
    randomize(pos)
    reduced = [math.ceil(s / k) for s, k in zip(size, ratio)]
    with torch.no_grad():
        bias = pos(size)
        assert bias.shape == (heads, math.prod(size), math.prod(reduced))
        for qi, q in enumerate(itertools.product(*map(range, size))):
            for ki, key in enumerate(itertools.product(*map(range, reduced))):
                r = torch.tensor([(i + 0.5) / k - 0.5 - j for i, j, k in zip(q, key, ratio)],
                                 dtype=torch.float64)
                expected = pos.mlp(torch.sign(r) * torch.log2(1 + r.abs()))
                assert torch.allclose(bias[:, qi, ki], expected, atol=1e-12), (q, key)


def test_position_bias_follows_any_size() -> None:
    pos = RelativePositionBias(2, 2, (4, 4))
    assert not list(pos.buffers())
    shapes = [tuple(pos(s).shape) for s in [(3, 3), (8, 8), (13, 6)]]
    assert shapes == [(2, 9, 1), (2, 64, 4), (2, 78, 8)]


# --- the model ----------------------------------------------------------------------------------
# Published totals (Guo et al. 2022) include the classifier (1x1 conv C->1280 + BN, Linear 1280 ->
# 1000) and the (heads, N, N / k^2) position tables at the training resolution of each variant.
PUBLISHED = {"cmt_ti": (9.5, 160), "cmt_xs": (15.2, 192), "cmt_s": (25.1, 224),
             "cmt_b": (45.7, 256)}


def official_extras(model: CMT, resolution: int) -> int:
    c = model.feature_info[-1].channels
    head = c * 1280 + 1280 + 2 * 1280 + 1280 * 1000 + 1000
    tables = 0
    for i, heads in enumerate((1, 2, 4, 8)):
        n, k = (resolution // 2 ** (i + 2)) ** 2, 2 ** (3 - i)
        tables += heads * n * (n // k ** 2)
    return head + tables


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts(name: str) -> None:
    """Printed next to the published figures; Ti, XS and B agree within 0.15M, S is 1.2M above
    (reported, not explained: depths, widths and ratio are those of the paper's table)."""
    model = build_backbone(name, 2, in_chans=3)
    ours = sum(p.numel() for p in model.parameters())
    mlp = sum(p.numel() for n, p in model.named_parameters() if "pos_bias" in n)
    published, resolution = PUBLISHED[name]
    total = (ours - mlp + official_extras(model, resolution)) / 1e6
    print(f"{name}: {ours / 1e6:.2f}M trunk; with the official head and tables "
          f"{total:.2f}M, published {published}M")
    assert abs(total - published) < 1.5


def test_default_strides_and_reduction() -> None:
    model = build_backbone("cmt_ti", 2)
    assert [f.stride for f in model.feature_info] == [(4, 4), (8, 8), (16, 16), (32, 32)]
    assert [s.pos_bias.ratio for s in model.stages] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert isinstance(model.stages[3].blocks[0].attn.reduce, nn.Identity)
    assert model.stages[0].blocks[0].attn.reduce.conv.stride == (8, 8)


def test_anisotropic_strides() -> None:
    strides = ((1, 2, 2), (2, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2))
    model = CMT(3, 1, strides=strides, **TINY).eval()
    assert [f.stride for f in model.feature_info] == [(2, 4, 4), (2, 8, 8), (4, 16, 16),
                                                      (8, 32, 32)]
    assert [s.pos_bias.ratio for s in model.stages] == [(4, 8, 8), (4, 4, 4), (2, 2, 2),
                                                        (1, 1, 1)]
    size = (7, 27, 19)
    with torch.no_grad():
        feats = model(torch.randn(1, 1, *size))
    for info, f in zip(model.feature_info, feats.values()):
        assert tuple(f.shape[2:]) == tuple(math.ceil(s / t) for s, t in zip(size, info.stride))


@pytest.mark.parametrize("dims,size", [(2, (45, 37)), (3, (37, 27, 19))])
def test_output_size_is_ceil_and_grads(dims: int, size: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = CMT(dims, 2, **TINY).train()
    feats = model(torch.randn(2, 2, *size))
    for info, f in zip(model.feature_info, feats.values()):
        assert tuple(f.shape[2:]) == tuple(math.ceil(s / t) for s, t in zip(size, info.stride))
    sum(f.square().mean() for f in feats.values()).backward()
    grads = model.stages[0].pos_bias.mlp[0].weight.grad
    assert grads is not None and grads.abs().sum() > 0  # stage 0 has 2 or more reduced keys


def test_grad_checkpointing_same_gradients() -> None:
    torch.manual_seed(0)
    plain = CMT(3, 1, **TINY).eval()
    ckpt = CMT(3, 1, grad_checkpointing=True, **TINY).eval()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 19, 24, 20)
    for model in (plain, ckpt):
        sum(f.sum() for f in model(x).values()).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'sr_ratios'"):
        build_backbone("cmt_ti", 2, sr_ratio=(8, 4, 2, 1))
    with pytest.raises(ConfigError, match="strides"):
        build_backbone("cmt_ti", 3, strides=(2, 2, 2, 2))
    with pytest.raises(ConfigError, match="sr_ratios"):
        build_backbone("cmt_ti", 2, sr_ratios=(8, 4, 2))
    with pytest.raises(ConfigError, match="out_indices"):
        build_backbone("cmt_ti", 2, out_indices=(4,))
    with pytest.raises(ValueError, match="spatial_dims"):
        build_backbone("cmt_ti", 1)


def test_filter_drops_classifier_and_unbuilt_stages() -> None:
    model = CMT(2, 1, out_indices=(0, 1), **TINY)
    sd = CMT(2, 1, **TINY).state_dict()
    sd["_fc.weight"], sd["head.weight"] = torch.zeros(1280, 32, 1, 1), torch.zeros(1000, 1280)
    assert set(checkpoint_filter_fn(sd, model)) == set(model.state_dict())


def test_2d_weights_in_3d_reproduce_2d_on_identical_slices(tmp_path) -> None:
    """Centre-inflated convs act slice-wise; the widened position MLP ignores depth offsets, so
    each query spreads its 2D attention evenly over the identical depth copies of a key."""
    net2d = CMT(2, 1, **TINY).eval()
    randomize(net2d)
    torch.save(net2d.state_dict(), tmp_path / "cmt.pth")
    net3d = CMT(3, 1, **TINY).eval()
    report = load_pretrained(net3d, tmp_path / "cmt.pth", inflate="center")
    assert "stem.conv1.weight" in report.adapted
    w = net3d.stages[0].pos_bias.mlp[0].weight
    assert w.shape[1] == 3 and not w[:, 0].any()
    img = torch.randn(1, 1, 64, 48)
    vol = img.unsqueeze(2).expand(-1, -1, 64, -1, -1)  # (1, 1, H, W) -> (1, 1, D, H, W)
    with torch.no_grad():
        f2, f3 = net2d(img), net3d(vol)
    assert f3["stage0"].shape[2] == 16  # 2 reduced key slices in stage 0: copies are attended
    worst = max(((f3[k] - f2[k].unsqueeze(2)).abs().max() / f2[k].abs().max()).item()
                for k in f2)
    print(f"CMT 2D->3D on identical slices: max rel diff {worst:.2e}")
    assert worst < 1e-5


def test_trains_through_the_application(tmp_path) -> None:
    """Three iterations of the real training loop on tiny synthetic volumes, with validation."""
    import numpy as np

    from seg.config import apply_overrides
    from seg.train import train
    from helpers import tiny_config, write_case

    rng = np.random.default_rng(0)
    for i in range(4):
        write_case(tmp_path / "ds", f"case{i}", rng)
    cfg = apply_overrides(tiny_config(tmp_path / "ds", tmp_path / "run", 3),
                          ["model.backbone=cmt_ti", "model.backbone_kwargs={}"])
    res = train(cfg, progress=False)
    assert res.iterations == 3 and 0.0 <= res.last_metrics["dice/mean"] <= 1.0
