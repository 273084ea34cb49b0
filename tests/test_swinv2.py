"""SwinV2 backbone: contract (2D/3D, odd sizes), shifted-window mask against a brute-force
reference, equivalence with timm (timm and official key layouts), and 2D -> 3D inflation."""
import math
import re

import pytest
import torch

from backbones import build_backbone
from backbones.swinv2 import SwinV2Block, SwinTransformerV2
from seg.errors import ConfigError

TINY = dict(embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), drop_path_rate=0.0)
# spatial_dims -> (input shape, options): shifted windows active in stage 0 on every axis, and
# at least 2 tokens in the last stage (a lone token's attention logits get no gradient)
CASES = {2: ((1, 1, 45, 37), dict(window_size=4)),
         3: ((1, 1, 19, 27, 23), dict(window_size=(2, 4, 4), patch_size=2))}


def randomize(model: torch.nn.Module, seed: int = 0, max_log_scale: float = 5.0) -> None:
    """Non-trivial weights: post-norms != 0, q/v biases, logit scales (some past the clamp when
    max_log_scale > log 100) and a position-bias MLP whose sigmoid is far from constant."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.copy_(torch.rand(p.shape, generator=g) * max_log_scale)
            elif "cpb_mlp" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if ".0." in name else 0.5))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias") or name.endswith("_bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def tiny(spatial_dims: int, **kwargs) -> SwinTransformerV2:
    return build_backbone("swinv2_tiny", spatial_dims, **{**TINY, **kwargs})


# ---------------------------------------------------------------------------------------------
# Contract
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shapes_gradients_no_nan(spatial_dims):
    shape, options = CASES[spatial_dims]
    torch.manual_seed(0)
    model = tiny(spatial_dims, **options)
    randomize(model, max_log_scale=4.0)  # below the clamp: every logit scale gets a gradient
    first = model.stages[0].blocks[1]
    grid = [math.ceil(s / p) for s, p in zip(shape[2:], model.patch_embed.patch_size)]
    assert all(first.window_and_shift(grid)[1]), "shifted windows must be active on every axis"
    out = model(torch.randn(shape))
    assert list(out) == [f.name for f in model.feature_info]
    for info, (name, feat) in zip(model.feature_info, out.items()):
        assert len(info.stride) == spatial_dims
        size = tuple(math.ceil(s / t) for s, t in zip(shape[2:], info.stride))  # ceil rule
        expected = (shape[0], info.channels, *size)
        assert tuple(feat.shape) == expected, name
        assert torch.isfinite(feat).all(), name
    loss = sum((f * torch.randn_like(f)).sum() for f in out.values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_new_input_size_and_window_size(spatial_dims):
    shape, options = CASES[spatial_dims]
    other = shape[:2] + tuple(s + 6 for s in shape[2:])
    torch.manual_seed(1)
    model = tiny(spatial_dims, **options).eval()
    randomize(model, seed=1)
    x, y = torch.randn(shape), torch.randn(other)
    with torch.no_grad():
        first = model(x)
        second = model(y)  # tables and masks are rebuilt for the new size ...
        again = model(x)  # ... and the old ones are not corrupted
        assert all(torch.equal(first[k], again[k]) for k in first)
        assert second["stage0"].shape[2:] != first["stage0"].shape[2:]
        new_window = 2 if spatial_dims == 2 else (2, 2, 2)
        model.set_window_size(new_window)
        changed = model(x)
        fresh = tiny(spatial_dims, **{**options, "window_size": new_window}).eval()
        fresh.load_state_dict(model.state_dict())  # no size-dependent state to carry over
        reference = fresh(x)
    for k in first:
        torch.testing.assert_close(changed[k], reference[k], rtol=0, atol=1e-5)
    assert (changed["stage0"] - first["stage0"]).abs().max() > 1e-3


def test_anisotropic_patch_and_merge_factors():
    model = tiny(3, patch_size=(1, 4, 4), merge_factors=((1, 2, 2), (2, 2, 2), (1, 2, 2)),
                 window_size=(2, 4, 4))
    strides = [f.stride for f in model.feature_info]
    assert strides == [(1, 4, 4), (1, 8, 8), (2, 16, 16), (2, 32, 32)]
    shape = (2, 1, 5, 33, 29)
    out = model(torch.randn(shape))
    for info, feat in zip(model.feature_info, out.values()):
        assert feat.shape[2:] == tuple(math.ceil(s / t) for s, t in zip(shape[2:], info.stride))


def test_out_indices_and_grad_checkpointing():
    torch.manual_seed(2)
    model = tiny(2, window_size=4, out_indices=(1, 3))
    assert [f.name for f in model.feature_info] == ["stage1", "stage3"]
    randomize(model, seed=2, max_log_scale=4.0)
    ckpt = tiny(2, window_size=4, out_indices=(1, 3), grad_checkpointing=True)
    ckpt.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 45, 37)
    grads = []
    for m in (model, ckpt):
        out = m(x)
        assert list(out) == ["stage1", "stage3"]
        sum(f.square().mean() for f in out.values()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)
    short = tiny(2, out_indices=(0, 1))
    assert len(short.stages) == 2  # stages after the last output are not built


def test_unknown_option_suggests_name():
    with pytest.raises(ConfigError, match="drop_path_rate"):
        build_backbone("swinv2_tiny", 2, drop_path_rat=0.1)


# ---------------------------------------------------------------------------------------------
# Shifted-window attention mask against a brute-force reference
# ---------------------------------------------------------------------------------------------
def brute_force_block(block: SwinV2Block, x: torch.Tensor) -> torch.Tensor:
    """Reference SwinV2 block over all pairs of real tokens, no partition, roll or padding.

    The feature map is (conceptually) padded to a multiple of the window and rolled by -shift;
    a query sees a key iff both fall in the same window of the rolled map and, per axis, either
    both or neither were wrapped around the border by the roll.
    """
    _, *size, c = x.shape
    d, h = len(size), block.attn.num_heads
    window = torch.tensor([min(w, s) for w, s in zip(block.window_size, size)])
    size_t = torch.tensor(size)
    shift = torch.where(window < size_t, window // 2, 0)
    padded = (size_t + window - 1) // window * window
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in size], indexing="ij"), -1)
    coords = coords.reshape(-1, d)  # (N, d) original positions
    rolled = (coords - shift) % padded  # where the roll puts each token
    wrapped = coords < shift  # rolled past the start, reappearing at the end
    same_window = ((rolled // window)[:, None] == (rolled // window)[None]).all(-1)
    same_side = (wrapped[:, None] == wrapped[None]).all(-1)
    allowed = same_window & same_side  # (N, N)

    attn, tokens = block.attn, x.reshape(-1, c)
    wq, wk, wv = attn.qkv.weight.split(c)
    q = (tokens @ wq.T + attn.q_bias).view(-1, h, c // h)
    k = (tokens @ wk.T).view(-1, h, c // h)
    v = (tokens @ wv.T + attn.v_bias).view(-1, h, c // h)
    cos = torch.einsum("nhc,mhc->hnm", torch.nn.functional.normalize(q, dim=-1),
                       torch.nn.functional.normalize(k, dim=-1))
    scale = attn.logit_scale.clamp(max=math.log(100)).exp().view(h, 1, 1)
    delta = (rolled[:, None] - rolled[None]).float() / (window - 1).clamp(min=1) * 8
    delta = torch.sign(delta) * torch.log2(delta.abs() + 1) / 3
    bias = 16 * torch.sigmoid(attn.cpb_mlp(delta)).permute(2, 0, 1)  # (h, N, N)
    logits = (cos * scale + bias).masked_fill(~allowed, float("-inf"))
    out = torch.einsum("hnm,mhc->nhc", logits.softmax(-1), v).reshape(-1, c)
    y = tokens + block.norm1(attn.proj(out))
    y = y + block.norm2(block.mlp(y))
    return y.view(x.shape)


@pytest.mark.parametrize("size,window", [((8, 8), (4, 4)), ((7, 10), (4, 4)), ((3, 9), (4, 4)),
                                         ((5, 6, 7), (2, 4, 4))])
def test_shifted_block_matches_brute_force(size, window):
    torch.manual_seed(3)
    block = SwinV2Block(len(size), dim=8, num_heads=2, window_size=window, shifted=True).eval()
    randomize(block, seed=3)
    with torch.no_grad():
        block.norm1.weight.fill_(1.0)
        block.norm2.weight.fill_(1.0)
    assert any(block.window_and_shift(size)[1])
    x = torch.randn(1, *size, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), brute_force_block(block, x), rtol=0, atol=1e-4)
        unshifted = SwinV2Block(len(size), dim=8, num_heads=2, window_size=window, shifted=False)
        unshifted.load_state_dict(block.state_dict())
        assert (unshifted(x) - block(x)).abs().max() > 1e-3  # the reference does see the shift


# ---------------------------------------------------------------------------------------------
# Pretrained weights: timm and official layouts, 2D -> 3D inflation
# ---------------------------------------------------------------------------------------------
def to_official(sd: dict) -> dict:
    """timm SwinV2 keys -> microsoft/Swin-Transformer keys (merge at the end of the stage before,
    plain head, persistent derived buffers), wrapped as the official files are."""
    out = {}
    for key, value in sd.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        if m:
            key = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        out[key.replace("head.fc.", "head.")] = value
        m = re.match(r"(layers\.\d+\.blocks\.(\d+)\.)attn\.logit_scale", key)
        if m:
            out[m.group(1) + "attn.relative_coords_table"] = torch.zeros(1, 15, 15, 2)
            out[m.group(1) + "attn.relative_position_index"] = torch.zeros(64, 64, dtype=torch.long)
            out[m.group(1) + "attn_mask"] = torch.zeros(4, 64, 64)
    out["head.weight"], out["head.bias"] = torch.zeros(10, 768), torch.zeros(10)
    return {"model": out}


@pytest.mark.parametrize("layout", ["timm", "official"])
def test_matches_timm(layout, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(4)
    reference = timm.create_model("swinv2_tiny_window8_256", pretrained=False, num_classes=0,
                                  img_size=128).eval()
    randomize(reference, seed=4)
    sd = reference.state_dict()
    assert "layers.0.downsample.reduction.weight" not in sd
    path = tmp_path / "swinv2.pth"
    torch.save(sd if layout == "timm" else to_official(sd), path)
    model = build_backbone("swinv2_tiny", 2, in_chans=3, pretrained=str(path), window_size=8).eval()
    assert SwinTransformerV2.stem_key in model.state_dict()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, intermediates_only=True)  # NCHW
        ours = model(x)
    assert len(expected) == len(ours) == 4
    for e, (name, o) in zip(expected, ours.items()):
        assert e.shape == o.shape, name
        torch.testing.assert_close(o, e, rtol=0, atol=1e-4)


@pytest.mark.parametrize("options,depth", [
    (dict(window_size=(4, 4, 4)), 32),  # 2x2x2 merges: reduction 4C -> 8C, stem inflated to 4
    (dict(window_size=(2, 4, 4), patch_size=(1, 4, 4), merge_factors=(1, 2, 2)), 4),
])
def test_inflated_3d_matches_2d_on_identical_slices(options, depth, tmp_path):
    torch.manual_seed(5)
    model2d = tiny(2, window_size=4).eval()
    randomize(model2d, seed=5)
    path = tmp_path / "swinv2_2d.pth"
    torch.save(model2d.state_dict(), path)
    model3d = build_backbone("swinv2_tiny", 3, pretrained=str(path), **{**TINY, **options}).eval()
    assert model3d.stages[0].blocks[1].window_and_shift((depth // model3d.patch_embed.patch_size[0],
                                                         16, 12))[1][0] > 0, "no depth shift"
    x2 = torch.randn(1, 1, 64, 48)
    x3 = x2[:, :, None].expand(-1, -1, depth, -1, -1).contiguous()  # (1, 1, D, 64, 48)
    with torch.no_grad():
        f2, f3 = model2d(x2), model3d(x3)
    for name in f2:
        assert f3[name].shape[3:] == f2[name].shape[2:]
        for z in range(f3[name].shape[2]):
            torch.testing.assert_close(f3[name][:, :, z], f2[name], rtol=0, atol=1e-4)
