"""Conv2Former: the block against a hand-written per-channel reference, options, per-axis strides,
2D -> 3D weights on identical slices, parameter counts."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from backbones import build_backbone
from backbones.conv2former import Conv2Former, Conv2FormerBlock, checkpoint_filter_fn
from backbones.pretrained import load_pretrained
from seg.errors import ConfigError

ANISO = ((1, 4, 4), (1, 2, 2), (2, 2, 2), (2, 2, 2))


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Layer scales of order 1, LayerNorm affines away from (1, 0), non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


# --- an independent reference: plain tensor ops and explicit loops ------------------------------
def ref_layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the channel axis of (N, C, *S) from its definition."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mu = x.mean(1, keepdim=True)
    var = ((x - mu) ** 2).mean(1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w.view(shape) + b.view(shape)


def ref_pointwise(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1x1 conv: out[n, o] = sum_i w[o, i] x[n, i] + b[o]."""
    out = torch.einsum("oi,ni...->no...", w.reshape(w.shape[0], w.shape[1]), x)
    return out + b.view((1, -1) + (1,) * (x.ndim - 2))


def ref_depthwise(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Depthwise 'same' conv with zero padding, one kernel tap at a time (cross-correlation)."""
    size, kernel = x.shape[2:], w.shape[2:]
    pad = [(k - 1) // 2 for k in kernel]
    padded = x.new_zeros(x.shape[:2] + tuple(s + 2 * p for s, p in zip(size, pad)))
    padded[(slice(None), slice(None)) + tuple(slice(p, p + s) for p, s in zip(pad, size))] = x
    shape = (1, -1) + (1,) * len(size)
    out = b.view(shape).expand_as(x).clone()
    for tap in itertools.product(*(range(k) for k in kernel)):
        window = tuple(slice(t, t + s) for t, s in zip(tap, size))
        out += w[(slice(None), 0) + tap].view(shape) * padded[(slice(None), slice(None)) + window]
    return out


def ref_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0)))


def ref_block(block: Conv2FormerBlock, x: torch.Tensor) -> torch.Tensor:
    """The block from the paper's equations, reading only the parameters."""
    p = {k: v.detach() for k, v in block.named_parameters()}
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = ref_layer_norm(x, p["attn.norm.weight"], p["attn.norm.bias"], 1e-6)
    a = ref_gelu(ref_pointwise(y, p["attn.a.0.weight"], p["attn.a.0.bias"]))
    a = ref_depthwise(a, p["attn.a.2.weight"], p["attn.a.2.bias"])
    v = ref_pointwise(y, p["attn.v.weight"], p["attn.v.bias"])
    x = x + p["layer_scale_1"].view(shape) * ref_pointwise(a * v, p["attn.proj.weight"],
                                                           p["attn.proj.bias"])
    h = ref_layer_norm(x, p["mlp.norm.weight"], p["mlp.norm.bias"], 1e-6)
    h = ref_gelu(ref_pointwise(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"]))
    h = h + ref_gelu(ref_depthwise(h, p["mlp.pos.weight"], p["mlp.pos.bias"]))
    return x + p["layer_scale_2"].view(shape) * ref_pointwise(h, p["mlp.fc2.weight"],
                                                              p["mlp.fc2.bias"])


@pytest.mark.parametrize("dims,kernel,shape", [
    (2, 5, (2, 3, 6, 7)),
    (2, 11, (1, 3, 5, 4)),  # the default kernel, larger than the map
    (3, (3, 5, 3), (1, 3, 4, 6, 5)),
])
def test_block_matches_reference(dims, kernel, shape) -> None:
    torch.manual_seed(0)
    block = Conv2FormerBlock(dims, 3, kernel_size=kernel, mlp_ratio=2.0).double().eval()
    randomize(block)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        out, ref = block(x), ref_block(block, x)
    diff = (out - ref).abs().max().item()
    print(f"Conv2Former block vs reference ({dims}D, k={kernel}): max abs diff {diff:.2e}")
    assert out.shape == x.shape and diff < 1e-10
    assert (out - x).abs().max() > 0.1  # the branches are not negligible


def test_block_matches_reference_float32() -> None:
    torch.manual_seed(1)
    block = Conv2FormerBlock(3, 4, kernel_size=5).eval()
    randomize(block, seed=1)
    x = torch.randn(2, 4, 5, 6, 7)
    with torch.no_grad():
        diff = (block(x).double() - ref_block(block.double(), x.double())).abs().max().item()
    print(f"Conv2Former block vs reference (float32, 3D): max abs diff {diff:.2e}")
    assert diff < 1e-4


# --- parameters and options ---------------------------------------------------------------------
# Published totals (Hou et al. 2022, ImageNet models) include a classifier; our trunks plus a
# final LayerNorm and a pre-logits head (Linear C->1280, Linear 1280->1000) add up to them.
PUBLISHED_M = {"conv2former_n": 15, "conv2former_t": 27, "conv2former_s": 50,
               "conv2former_b": 90, "conv2former_l": 199}


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_param_counts_near_published(name: str) -> None:
    model = build_backbone(name, 2, in_chans=3)
    ours = sum(p.numel() for p in model.parameters())
    c = model.feature_info[-1].channels
    head = 2 * c + c * 1280 + 1280 + 1280 * 1000 + 1000
    print(f"{name}: {ours / 1e6:.2f}M trunk, +head {(ours + head) / 1e6:.2f}M, "
          f"published {PUBLISHED_M[name]}M")
    assert abs((ours + head) / 1e6 - PUBLISHED_M[name]) < 0.5


@pytest.mark.parametrize("dims,size", [(2, (45, 37)), (3, (21, 27, 19))])
def test_output_size_is_ceil(dims: int, size: tuple[int, ...]) -> None:
    model = build_backbone("conv2former_n", dims, kernel_size=5)
    with torch.no_grad():
        feats = model(torch.randn(1, 1, *size))
    for info, f in zip(model.feature_info, feats.values()):
        assert tuple(f.shape[2:]) == tuple(math.ceil(s / t) for s, t in zip(size, info.stride))


def test_anisotropic_strides_and_kernel() -> None:
    model = build_backbone("conv2former_n", 3, strides=ANISO, kernel_size=(3, 7, 7))
    assert [f.stride for f in model.feature_info] == [(1, 4, 4), (1, 8, 8), (2, 16, 16),
                                                      (4, 32, 32)]
    assert model.stem.conv.kernel_size == (1, 4, 4)
    assert model.stages[0].blocks[0].attn.a[2].kernel_size == (3, 7, 7)
    with torch.no_grad():
        feats = model(torch.randn(1, 1, 5, 27, 19))
    assert [tuple(f.shape[2:]) for f in feats.values()] == [(5, 7, 5), (5, 4, 3), (3, 2, 2),
                                                            (2, 1, 1)]


def test_out_indices_and_filter_drops_classifier() -> None:
    model = build_backbone("conv2former_n", 2, out_indices=(1, 2))
    assert len(model.stages) == 3 and model.feature_names() == ["stage1", "stage2"]
    full = build_backbone("conv2former_n", 2).state_dict()
    full["head.fc.weight"], full["norm.weight"] = torch.zeros(10, 512), torch.ones(512)
    assert set(checkpoint_filter_fn(full, model)) == set(model.state_dict())


def test_grad_checkpointing_same_gradients() -> None:
    torch.manual_seed(0)
    plain = build_backbone("conv2former_n", 3, kernel_size=3)
    ckpt = build_backbone("conv2former_n", 3, kernel_size=3, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 9, 16, 12)
    for model in (plain, ckpt):
        sum(f.sum() for f in model(x).values()).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'drop_path_rate'"):
        build_backbone("conv2former_n", 2, drop_path=0.1)
    with pytest.raises(ConfigError, match="kernel_size"):
        build_backbone("conv2former_n", 2, kernel_size=4)
    with pytest.raises(ConfigError, match="strides"):
        build_backbone("conv2former_n", 3, strides=(4, 2, 2))
    with pytest.raises(ConfigError, match="out_indices"):
        build_backbone("conv2former_n", 2, out_indices=(4,))
    with pytest.raises(ValueError, match="spatial_dims"):
        build_backbone("conv2former_n", 1)


def test_2d_weights_in_3d_reproduce_2d_on_identical_slices(tmp_path) -> None:
    """Centre-inflated kernels: every layer acts slice-wise on a volume of identical slices."""
    tiny = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), kernel_size=5)
    net2d = Conv2Former(2, 1, **tiny).eval()
    randomize(net2d)
    torch.save(net2d.state_dict(), tmp_path / "c2f.pth")
    net3d = Conv2Former(3, 1, **tiny).eval()
    report = load_pretrained(net3d, tmp_path / "c2f.pth", inflate="center")
    assert "stages.0.blocks.0.attn.a.2.weight" in report.adapted
    img = torch.randn(1, 1, 64, 48)
    vol = img.unsqueeze(2).expand(-1, -1, 32, -1, -1)  # (1, 1, H, W) -> (1, 1, D, H, W)
    with torch.no_grad():
        f2, f3 = net2d(img), net3d(vol)
    worst = max(((f3[k] - f2[k].unsqueeze(2)).abs().max() / f2[k].abs().max()).item()
                for k in f2)
    print(f"Conv2Former 2D->3D on identical slices: max rel diff {worst:.2e}")
    assert worst < 1e-5
