"""Segmentation model: backbone + coarse head (+ PointRend point head), 2D and 3D.

``build_model(**kwargs)`` takes only JSON-friendly arguments so that the same dict, stored in a
checkpoint, rebuilds the model.  Training and inference are explicit, typed paths:
``forward_train(images, labels) -> TrainOutput`` and ``forward_infer(images, mode) -> Tensor``;
``forward(x)`` is ``forward_infer(x)`` so sliding-window inference can call ``model(x)``.

One head contract (``heads.base``): the model publishes the input as feature levels beside the
backbone's, in one feature dict described by ``SegmentationModel.feature_info`` (``input``: the
image itself at stride 1; ``input_s2``, ...: the learned ``InputStages`` at the strides finer than
the backbone's finest level; then the backbone's levels).  The coarse head and the point head read
only that dict (a U-Net decoder takes ``input_s2`` as its finest skip, the point head samples it as
its finest level: one learned branch on the input serves both), and every coarse head returns a
``heads.HeadOutput`` (logits plus a list of auxiliary logits).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Sequence

import torch
import torch.nn as nn

from backbones import build_backbone
from heads import (INPUT, FeatureInfo, StandardPointHead, as_feature_info, backbone_levels,
                   build_head, input_stage_name, is_input_level, learned_levels, nearest_level)
from seg import ops
from seg import pointrend as pr
from seg.errors import ConfigError
from seg.losses import ce_dice_losses, masked_cross_entropy
from seg.ops import check_spatial_dims, resize
from seg.registry import unknown_name_message

logger = logging.getLogger(__name__)

#: The backbone and coarse head a model gets when none is named: ``hparam.ModelConfig``'s defaults
#: (``tests/test_defaults.py`` keeps the two equal).
DEFAULT_BACKBONE, DEFAULT_HEAD = "convnext_atto", "unet"
#: Widths of the learned input stages (``InputStages``) when none are given: ``hparam.ModelConfig``'s
#: ``input_stages`` (tested equal).
DEFAULT_INPUT_STAGES = (16,)

#: The point-head options, named as ``hparam.PointRendConfig`` names them.  Their defaults live
#: there and only there (per-patch point budgets are planned from the data, ``seg.plan``); this
#: module takes a complete set of values.
POINTREND_OPTIONS = ("enabled", "train_num_points", "oversample_ratio", "importance_sample_ratio",
                     "subdivision_steps", "subdivision_num_points", "in_features", "num_fc", "fc_dim",
                     "coarse_pred_each_layer", "image_features")


@dataclasses.dataclass
class TrainOutput:
    """Result of ``SegmentationModel.forward_train``.

    Attributes:
        coarse_logits: (N, K, *S_c) coarse head output.
        point_logits: (N, K, P) point head output, or None without PointRend.
        point_coords: (N, P, d) x-first normalised coordinates, or None.
        point_labels: (N, P) int64 nearest-sampled targets (255 = ignore), or None.
        aux_logits: deep-supervision logits of coarser decoder stages ('unet' head), coarse first
            after the main one; empty otherwise.
    """

    coarse_logits: torch.Tensor
    point_logits: torch.Tensor | None = None
    point_coords: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    aux_logits: list[torch.Tensor] = dataclasses.field(default_factory=list)


def resolve_pointrend_options(pointrend: Any) -> dict | None:
    """The options of an ``hparam.PointRendConfig`` (or its dict) as a checked dict; None when off.

    Raises:
        ConfigError: unknown or missing options, a point budget that is not a positive number, a bad
            image mode.
    """
    if pointrend is None or pointrend is False:
        return None
    options = dataclasses.asdict(pointrend) if dataclasses.is_dataclass(pointrend) else dict(pointrend)
    for key in options:
        if key not in POINTREND_OPTIONS:
            raise ConfigError(unknown_name_message("pointrend option", key, POINTREND_OPTIONS))
    missing = [k for k in POINTREND_OPTIONS if k not in options]
    if missing:
        raise ConfigError(f"pointrend options lack {', '.join(missing)}: pass a complete "
                          "hparam.PointRendConfig (or its dict)")
    for key in ("train_num_points", "subdivision_num_points"):
        if not isinstance(options[key], int) or options[key] <= 0:
            raise ConfigError(f"pointrend {key} must be a positive number, got {options[key]!r}")
    if options["image_features"] not in pr.IMAGE_FEATURE_MODES:
        raise ConfigError(unknown_name_message("pointrend image_features", options["image_features"],
                                               pr.IMAGE_FEATURE_MODES))
    return options if options["enabled"] else None


def input_stage_strides(finest: Sequence[int]) -> list[tuple[int, ...]]:
    """The strides of the input stages under a backbone whose finest level has stride ``finest``:
    2, 4, ... per axis (an axis stops at its ``finest`` stride), up to but not including it."""
    strides, stride = [], (1,) * len(finest)
    while True:
        stride = tuple(min(2 * s, f) for s, f in zip(stride, finest))
        if stride == tuple(finest):
            return strides
        strides.append(stride)


class InputStages(nn.Module):
    """Learned stages on the input at the strides finer than the backbone's finest level.

    The backbones open with a stride-4 patchify (ConvNeXt): a structure two voxels thick falls
    between its cells.  These stages (two 3^d conv-norm-LeakyReLU each, the first strided: nnU-Net's
    first encoder stages in miniature) give the fine levels back: the U-Net decoder takes them as
    skips and the point head samples them, one branch for both.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        widths: channels of each stage, fine to coarse.
        strides: per-axis stride of each stage (``input_stage_strides``), as many as ``widths``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, widths: Sequence[int],
                 strides: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.names = [input_stage_name(st) for st in strides]
        self.stages = nn.ModuleList()
        cin, prev = in_channels, (1,) * spatial_dims
        for width, st in zip(widths, strides):
            step = tuple(a // b for a, b in zip(st, prev))
            self.stages.append(ops.conv_block(spatial_dims, cin, width, step))
            cin, prev = width, tuple(st)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, C_in, *S) -> {``input_s2``: (N, widths[0], *S / 2), ...}."""
        out, x = {}, images
        for name, stage in zip(self.names, self.stages):
            x = stage(x)
            out[name] = x
        return out


class SegmentationModel(nn.Module):
    """Backbone -> coarse head -> optional PointRend point head.

    Args:
        backbone: module with ``feature_info`` whose forward returns an ordered feature dict.
        head: coarse head (the model's feature dict -> ``HeadOutput`` with (N, K, *S_c) logits
            covering the input).
        spatial_dims: 2 or 3.
        num_classes: K.
        point_head: StandardPointHead or None.
        pointrend: resolved PointRend options (``resolve_pointrend_options``) or None.
        ignore_index: ignored label value.
        input_stages: ``InputStages`` on the input (their levels are published beside the input's)
            or None.
        feature_info: the levels of ``features(images)``, fine to coarse: ``input`` (stride 1),
            the input stages', then the backbone's (``model_feature_info``).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, spatial_dims: int, num_classes: int,
                 point_head: nn.Module | None = None, pointrend: dict | None = None,
                 ignore_index: int = pr.IGNORE_INDEX, input_stages: nn.Module | None = None, *,
                 feature_info: Sequence[FeatureInfo]) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.backbone, self.head, self.point_head = backbone, head, point_head
        self.input_stages = input_stages
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.pointrend = pointrend
        self.last_point_evaluations = 0  # per sample, set by forward_infer
        self.feature_info = list(feature_info)

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The feature dict every head reads: (N, C_in, *S) -> {name: (N, C, *S / stride)} in
        ``feature_info``'s order (the input, its learned stages, the backbone's levels)."""
        if images.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected (N, C, {self.spatial_dims} spatial axes), got "
                             f"{tuple(images.shape)}")
        backbone = self.backbone(images)
        levels = {INPUT: images}
        if self.input_stages is not None:
            levels.update(self.input_stages(images))
        return {**levels, **backbone}

    def _point_fn(self, features: dict[str, torch.Tensor], coarse: torch.Tensor) -> pr.PointFn:
        """The point head at given coordinates: its ``in_features`` and the input level at the
        ``image_features`` offsets, all read from ``features``."""
        fine = [features[name] for name in self.pointrend["in_features"]]
        offsets = pr.image_offsets(self.pointrend["image_features"], self.spatial_dims)
        around = [(features[INPUT], offsets)] if offsets else []
        return lambda coords: pr.point_head_logits(self.point_head, fine, coarse, coords, around)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor) -> TrainOutput:
        """Training forward.

        Args:
            images: (N, C_in, *S).
            labels: (N, *S) int64 (255 = ignore), used for the point targets.
        """
        features = self.features(images)
        head = self.head(features)
        coarse = head.logits
        if self.point_head is None:
            return TrainOutput(coarse, aux_logits=head.aux)
        opt = self.pointrend
        coords = pr.get_uncertain_point_coords_with_randomness(
            coarse, pr.calculate_uncertainty, opt["train_num_points"], opt["oversample_ratio"],
            opt["importance_sample_ratio"])
        point_logits = self._point_fn(features, coarse)(coords)
        return TrainOutput(coarse, point_logits, coords, pr.sample_point_labels(labels, coords),
                           head.aux)

    @torch.no_grad()
    def forward_infer(self, images: torch.Tensor, mode: str = "subdivision") -> torch.Tensor:
        """Full-resolution logits (N, K, *S).

        Args:
            images: (N, C_in, *S).
            mode: 'subdivision' (PointRend; coarse upsampled when PointRend is off), 'coarse'
                (coarse logits upsampled) or 'dense' (point head at every output cell).
        """
        features = self.features(images)
        coarse = self.head(features).logits
        return self.infer_from_features(features, coarse, tuple(images.shape[2:]), mode)

    @torch.no_grad()
    def infer_from_features(self, features: dict[str, torch.Tensor], coarse: torch.Tensor,
                            size: Sequence[int], mode: str = "subdivision") -> torch.Tensor:
        """The part of ``forward_infer`` after the features and the coarse head (benchmarks time it).

        Args:
            features: ``self.features(images)``, the input's levels included.
            coarse: (N, K, *S_c) coarse logits of ``self.head`` (``HeadOutput.logits``).
            size: output spatial size (the input's).
            mode: as ``forward_infer``.

        Returns:
            (N, K, *size) logits; ``self.last_point_evaluations`` holds the point-head
            evaluations per sample.
        """
        if mode not in ("subdivision", "coarse", "dense"):
            raise ValueError(unknown_name_message("inference mode", mode,
                                                  ["subdivision", "coarse", "dense"]))
        size = tuple(int(s) for s in size)
        self.last_point_evaluations = 0
        if mode == "coarse" or (mode == "subdivision" and self.point_head is None):
            return resize(coarse, size, mode="linear")
        if self.point_head is None:
            raise ValueError("mode 'dense' needs a model built with PointRend")
        point_fn = self._point_fn(features, coarse)
        if mode == "dense":
            self.last_point_evaluations = math.prod(size)
            return pr.dense_point_inference(point_fn, coarse.shape[0], size, coarse.device,
                                            coarse.dtype)
        num_points = self.pointrend["subdivision_num_points"]
        logits, self.last_point_evaluations = pr.subdivision_inference(
            coarse, point_fn, size, num_points, self.pointrend["subdivision_steps"])
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward_infer(x)`` in the default mode."""
        return self.forward_infer(x)

    def loss(self, out: TrainOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses: 'coarse_ce' + 'coarse_dice' on the coarse logits upsampled to the label size,
        'point' cross-entropy on the point logits (0 without PointRend), and their sum 'total'.
        With deep supervision the coarse terms are a weighted sum over the main and the auxiliary
        logits (weights 1, 1/2, 1/4, ... normalised, ``seg.losses.deep_supervision_weights``; how they
        differ from nnU-Net's is written there), each auxiliary term against the labels
        nearest-resampled to its grid, as nnU-Net does.

        Args:
            out: ``forward_train`` result.
            labels: (N, *S) int64, 255 = ignore.
        """
        ce, dice = ce_dice_losses([out.coarse_logits, *out.aux_logits], labels,
                                  ignore_index=self.ignore_index)
        point = ce.new_zeros(()) if out.point_logits is None else \
            masked_cross_entropy(out.point_logits, out.point_labels, self.ignore_index)
        return {"coarse_ce": ce, "coarse_dice": dice, "point": point, "total": ce + dice + point}


def model_feature_info(backbone_info: Sequence[Any], spatial_dims: int, in_channels: int,
                       input_stages: Sequence[int] = ()) -> list[FeatureInfo]:
    """The levels of ``SegmentationModel.features``: the input at stride 1, the input stages (as
    many of ``input_stages``' widths as the backbone leaves strides for), then the backbone's.

    Raises:
        ConfigError: a backbone level takes a name of the input's levels.
    """
    info = as_feature_info(backbone_info, spatial_dims)
    taken = [f.name for f in info if is_input_level(f.name)]
    if taken:
        raise ConfigError(f"backbone level {taken[0]!r}: the model publishes the input's levels "
                          f"as {INPUT!r} and {INPUT}_s<stride>; rename the backbone's level")
    strides = input_stage_strides(info[0].stride)
    stages = [FeatureInfo(input_stage_name(st), int(w), st) for w, st in zip(input_stages, strides)]
    return [FeatureInfo(INPUT, in_channels, (1,) * spatial_dims), *stages, *info]


def default_point_features(feature_info: Sequence[FeatureInfo]) -> list[str]:
    """The point head's levels when none are named: the learned level whose stride is closest to 4
    and, when finer, the learned level closest to stride 2 (an input stage or the backbone's)."""
    learned = learned_levels(feature_info)
    names = [nearest_level(backbone_levels(feature_info), 4).name]
    fine = nearest_level(learned, 2)
    if max(fine.stride) == 2 and fine.name not in names:
        names.append(fine.name)
    return names


def build_point_head(options: dict, info: Sequence[FeatureInfo], num_classes: int, in_channels: int,
                     spatial_dims: int) -> StandardPointHead:
    """The point head on the levels ``options["in_features"]`` names (None: ``default_point_features``,
    written back into ``options``), the input's intensities of ``image_features`` and the coarse logits.

    Raises:
        ConfigError: a named level is not a learned level of ``info``.
    """
    by_name = {f.name: f for f in learned_levels(info)}
    names = options["in_features"] or default_point_features(info)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(unknown_name_message("pointrend in_feature", unknown[0], by_name))
    options["in_features"] = list(names)
    image_channels = in_channels * len(pr.image_offsets(options["image_features"], spatial_dims))
    return StandardPointHead(sum(by_name[n].channels for n in names) + image_channels, num_classes,
                             options["num_fc"], options["fc_dim"], options["coarse_pred_each_layer"])


def build_input_stages(info: Sequence[FeatureInfo], read: set[str], in_channels: int,
                       spatial_dims: int) -> tuple[InputStages | None, list[FeatureInfo]]:
    """The input stages some head reads (a chain: up to the coarsest one read), and ``info``
    without the levels of the stages left out."""
    stages = [f for f in info if is_input_level(f.name) and f.name != INPUT]
    used = max((i + 1 for i, f in enumerate(stages) if f.name in read), default=0)
    dropped = {f.name for f in stages[used:]}
    module = InputStages(spatial_dims, in_channels, [f.channels for f in stages[:used]],
                         [f.stride for f in stages[:used]]) if used else None
    return module, [f for f in info if f.name not in dropped]


def assemble_model(backbone: nn.Module, spatial_dims: int, num_classes: int,
                   head: str = DEFAULT_HEAD, head_kwargs: dict | None = None,
                   pointrend: Any = None, in_channels: int = 1,
                   input_stages: Sequence[int] = DEFAULT_INPUT_STAGES) -> SegmentationModel:
    """Build heads for an existing backbone module (anything with ``feature_info``); ``in_channels``
    is the input's channel count (the ``input`` level every head may read); ``input_stages`` the
    widths of the learned input stages (``InputStages``; those no head reads are not built)."""
    if any(not isinstance(w, int) or w <= 0 for w in input_stages):
        raise ConfigError(f"model.input_stages must be positive widths, got {list(input_stages)}")
    options = resolve_pointrend_options(pointrend)
    info = model_feature_info(backbone.feature_info, spatial_dims, in_channels, input_stages)
    coarse_head = build_head(head, info, num_classes, spatial_dims, **(head_kwargs or {}))
    read = set(getattr(coarse_head, "in_features", [f.name for f in info]))
    point_head = None
    if options is not None:
        point_head = build_point_head(options, info, num_classes, in_channels, spatial_dims)
        read.update(options["in_features"])
    stages, info = build_input_stages(info, read, in_channels, spatial_dims)
    return SegmentationModel(backbone, coarse_head, spatial_dims, num_classes, point_head, options,
                             input_stages=stages, feature_info=info)


def build_model(spatial_dims: int, in_channels: int, num_classes: int,
                backbone: str = DEFAULT_BACKBONE, backbone_kwargs: dict | None = None,
                head: str = DEFAULT_HEAD, head_kwargs: dict | None = None,
                pointrend: Any = None,
                input_stages: Sequence[int] = DEFAULT_INPUT_STAGES) -> SegmentationModel:
    """Build a segmentation model from JSON-friendly options.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: K, including background.
        backbone: registered backbone name (``backbones.list_backbones()``).
        backbone_kwargs: options for ``backbones.build_backbone``.
        head: registered coarse head (``heads.list_heads()``: 'unet', 'deeplab', 'mask').
        head_kwargs: options for the head (see ``heads``).
        pointrend: None/False (no point head), or an ``hparam.PointRendConfig`` / its dict with
            every option of ``POINTREND_OPTIONS`` (point budgets resolved, not 'auto').
        input_stages: widths of the learned stages on the input at strides 2, 4, ... finer than
            the backbone's finest level (``InputStages``).
    """
    net = build_backbone(backbone, spatial_dims, in_channels, **(backbone_kwargs or {}))
    return assemble_model(net, spatial_dims, num_classes, head, head_kwargs, pointrend, in_channels,
                          input_stages)
