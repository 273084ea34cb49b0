"""One source for each default: where a default must be stated twice (``hparam.py`` is plain Python
and imports nothing of ``seg``), a test keeps the copies equal; everywhere else the code reads the
one constant."""
from __future__ import annotations

import inspect

from hparam import Config, DataConfig, ModelConfig


def _default(fn, name: str):
    return inspect.signature(fn).parameters[name].default


def test_build_model_defaults_are_hparams() -> None:
    from seg import model

    for fn in (model.build_model, model.assemble_model):
        assert _default(fn, "head") == model.DEFAULT_HEAD == ModelConfig().head == "unet"
    assert _default(model.build_model, "backbone") == model.DEFAULT_BACKBONE == ModelConfig().backbone
    assert list(_default(model.build_model, "input_stages")) == list(model.DEFAULT_INPUT_STAGES) \
        == ModelConfig().input_stages


def test_backbone_defaults_live_in_the_registry() -> None:
    """``model.backbone_kwargs`` holds the user's options only; the variant's run defaults (ConvNeXt:
    3^d kernels) are its registry entry's, merged under them (``backbone_options``)."""
    import hparam
    from backbones import BACKBONES, backbone_options
    from backbones.convnext import RUN_DEFAULTS

    assert ModelConfig().backbone_kwargs == {}
    assert BACKBONES.defaults(ModelConfig().backbone) == RUN_DEFAULTS == {"kernel_size": 3}
    line = next(l for l in inspect.getsource(hparam.ModelConfig).splitlines() if "backbone_kwargs" in l)
    assert f'"kernel_size": {RUN_DEFAULTS["kernel_size"]}' in line  # the comment states the registry's default
    assert backbone_options(ModelConfig().backbone, ModelConfig().backbone_kwargs) == RUN_DEFAULTS


def test_ct_window_has_one_default() -> None:
    from seg.preprocess import Preprocessing

    assert Preprocessing().ct_window == DataConfig().ct_window
    # a stored preprocessing without the field (older checkpoints) gets the same default
    assert Preprocessing.from_dict({"normalization": "window"}).ct_window == Preprocessing().ct_window
    assert Preprocessing.from_dict({"normalization": "window", "ct_window": [-100, 300]}).ct_window == (-100, 300)


def test_inference_defaults_have_one_source() -> None:
    import infer_seg
    from seg import inference
    from seg.predict import Predictor

    args = infer_seg.parse_args(["-i", "x", "-o", "y", "-m", "z"])
    assert (args.overlap, args.batch_size, args.blend) == (
        inference.DEFAULT_OVERLAP, inference.DEFAULT_BATCH_SIZE, inference.DEFAULT_BLEND)
    for fn in (Predictor.__init__, inference.sliding_window_inference):
        assert _default(fn, "overlap") == inference.DEFAULT_OVERLAP
        assert _default(fn, "batch_size") == inference.DEFAULT_BATCH_SIZE
        assert _default(fn, "blend") == inference.DEFAULT_BLEND
    assert _default(inference.blend_weight, "blend") == inference.DEFAULT_BLEND
    assert inference.DEFAULT_BLEND in inference.BLEND_MODES


def test_patch_budget_default_is_the_plans() -> None:
    """``data.patch_voxel_budget`` 'auto' means ``seg.plan``'s rule, on a CPU ``seg.plan.PATCH_BUDGET``
    (hparam names no number)."""
    import hparam
    from seg import plan

    assert DataConfig().patch_voxel_budget == plan.AUTO
    source = inspect.getsource(hparam.DataConfig)
    line = next(l for l in source.splitlines() if "patch_voxel_budget" in l)
    assert "PATCH_BUDGET" in line and not any(str(v) in line for v in plan.PATCH_BUDGET.values())
    dims = Config().data.spatial_dims
    assert plan.plan_patch_budget(dims, "cpu")[0] == plan.PATCH_BUDGET[dims]
