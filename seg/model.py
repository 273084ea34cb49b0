"""Segmentation model: backbone + coarse head (+ PointRend point head), 2D and 3D.

``build_model(**kwargs)`` takes only JSON-friendly arguments so that the same dict, stored in a
checkpoint, rebuilds the model.  Training and inference are explicit, typed paths:
``forward_train(images, labels) -> TrainOutput`` and ``forward_infer(images, mode) -> Tensor``;
``forward(x)`` is ``forward_infer(x)`` so sliding-window inference can call ``model(x)``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Sequence

import torch
import torch.nn as nn

from backbones import build_backbone
from heads import HEADS, StandardPointHead, as_feature_info, build_head, nearest_level
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

#: The point-head options, named as ``hparam.PointRendConfig`` names them.  Their defaults live
#: there and only there (per-patch point budgets are planned from the data, ``seg.plan``); this
#: module takes a complete set of values.
POINTREND_OPTIONS = ("enabled", "train_num_points", "oversample_ratio", "importance_sample_ratio",
                     "subdivision_steps", "subdivision_num_points", "in_features", "num_fc", "fc_dim",
                     "coarse_pred_each_layer", "image_features", "fine_stem_channels")


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
        ConfigError: unknown or missing options, a point budget still 'auto', a bad image mode.
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
            raise ConfigError(f"pointrend {key} must be a positive number, got {options[key]!r} "
                              "('auto' is resolved by the plan, seg.plan)")
    if options["image_features"] not in pr.IMAGE_FEATURE_MODES:
        raise ConfigError(unknown_name_message("pointrend image_features", options["image_features"],
                                               pr.IMAGE_FEATURE_MODES))
    return options if options["enabled"] else None


class FineStem(nn.Module):
    """A light stride-2 feature branch on the input for the point head (our extension).

    The backbone's finest level is stride 4; a structure two voxels thick falls between its cells.
    Two 3^d convolutions (the first with stride 2), each with GroupNorm and ReLU, give the point
    head learned features at twice that resolution for about the cost of one backbone block.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        channels: output channels.
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels: int) -> None:
        super().__init__()
        groups = max(1, min(8, channels // 4))
        self.layers = nn.Sequential(
            ops.conv(spatial_dims, in_channels, channels, 3, stride=2, bias=False),
            nn.GroupNorm(groups, channels), nn.ReLU(inplace=True),
            ops.conv(spatial_dims, channels, channels, 3, bias=False),
            nn.GroupNorm(groups, channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, *S) -> (N, channels, *ceil(S / 2))."""
        return self.layers(x)


class SegmentationModel(nn.Module):
    """Backbone -> coarse head -> optional PointRend point head.

    Args:
        backbone: module with ``feature_info`` whose forward returns an ordered feature dict.
        head: coarse head (features dict -> (N, K, *S_c) logits covering the input).
        spatial_dims: 2 or 3.
        num_classes: K.
        point_head: StandardPointHead or None.
        pointrend: resolved PointRend options (``resolve_pointrend_options``) or None.
        ignore_index: ignored label value.
        fine_stem: optional ``FineStem`` on the input, one more fine level for the point head.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, spatial_dims: int, num_classes: int,
                 point_head: nn.Module | None = None, pointrend: dict | None = None,
                 ignore_index: int = pr.IGNORE_INDEX, fine_stem: nn.Module | None = None) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.backbone, self.head, self.point_head = backbone, head, point_head
        self.fine_stem = fine_stem
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.pointrend = pointrend
        self.last_point_evaluations = 0  # per sample, set by forward_infer

    def _features_and_coarse(self, images: torch.Tensor):
        if images.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected (N, C, {self.spatial_dims} spatial axes), got "
                             f"{tuple(images.shape)}")
        features = self.backbone(images)
        if getattr(self.head, "reads_input", False):
            return features, self.head(features, images)
        return features, self.head(features)

    def _point_fn(self, features: dict, coarse: torch.Tensor, images: torch.Tensor | None):
        fine = [features[name] for name in self.pointrend["in_features"]]
        offsets = pr.image_offsets(self.pointrend["image_features"], self.spatial_dims)
        if (offsets or self.fine_stem is not None) and images is None:
            raise ValueError("this model's point head reads the input image (image_features="
                             f"{self.pointrend['image_features']!r}, fine_stem_channels="
                             f"{self.pointrend['fine_stem_channels']}): pass images")
        if self.fine_stem is not None:
            fine.append(self.fine_stem(images))
        return lambda coords: pr.point_head_logits(self.point_head, fine, coarse, coords, images,
                                                   offsets)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor) -> TrainOutput:
        """Training forward.

        Args:
            images: (N, C_in, *S).
            labels: (N, *S) int64 (255 = ignore), used for the point targets.
        """
        features, coarse = self._features_and_coarse(images)
        aux: list[torch.Tensor] = []
        if isinstance(coarse, tuple):  # deep supervision (training mode)
            coarse, aux = coarse
        if self.point_head is None:
            return TrainOutput(coarse, aux_logits=aux)
        opt = self.pointrend
        coords = pr.get_uncertain_point_coords_with_randomness(
            coarse, pr.calculate_uncertainty, opt["train_num_points"], opt["oversample_ratio"],
            opt["importance_sample_ratio"])
        point_logits = self._point_fn(features, coarse, images)(coords)
        return TrainOutput(coarse, point_logits, coords, pr.sample_point_labels(labels, coords), aux)

    @torch.no_grad()
    def forward_infer(self, images: torch.Tensor, mode: str = "subdivision") -> torch.Tensor:
        """Full-resolution logits (N, K, *S).

        Args:
            images: (N, C_in, *S).
            mode: 'subdivision' (PointRend; coarse upsampled when PointRend is off), 'coarse'
                (coarse logits upsampled) or 'dense' (point head at every output cell).
        """
        features, coarse = self._features_and_coarse(images)
        if isinstance(coarse, tuple):  # a deep-supervised head called in training mode
            coarse = coarse[0]
        return self.infer_from_features(features, coarse, tuple(images.shape[2:]), mode, images)

    @torch.no_grad()
    def infer_from_features(self, features: dict[str, torch.Tensor], coarse: torch.Tensor,
                            size: Sequence[int], mode: str = "subdivision",
                            images: torch.Tensor | None = None) -> torch.Tensor:
        """The part of ``forward_infer`` after backbone and coarse head (benchmarks time it).

        Args:
            features: backbone output.
            coarse: (N, K, *S_c) coarse logits of ``self.head``.
            size: output spatial size (the input's).
            mode: as ``forward_infer``.
            images: the input, needed when the point head reads it (``image_features``).

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
        point_fn = self._point_fn(features, coarse, images)
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


def assemble_model(backbone: nn.Module, spatial_dims: int, num_classes: int,
                   head: str = DEFAULT_HEAD, head_kwargs: dict | None = None,
                   pointrend: Any = None, in_channels: int = 1) -> SegmentationModel:
    """Build heads for an existing backbone module (anything with ``feature_info``); ``in_channels``
    is the input's channel count (the point head reads it with ``image_features``)."""
    info = as_feature_info(backbone.feature_info, spatial_dims)
    head_kwargs = dict(head_kwargs or {})
    if head in HEADS and getattr(HEADS.get(head), "reads_input", False):
        if "in_channels" in head_kwargs:
            raise ConfigError("head option in_channels is set from data.in_channels; remove it")
        head_kwargs["in_channels"] = in_channels
    coarse_head = build_head(head, info, num_classes, spatial_dims, **head_kwargs)
    options = resolve_pointrend_options(pointrend)
    point_head = fine_stem = None
    if options is not None:
        names = options["in_features"] or [nearest_level(info, 4).name]
        by_name = {f.name: f for f in info}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ConfigError(unknown_name_message("pointrend in_feature", unknown[0], by_name))
        options["in_features"] = list(names)
        image_channels = in_channels * len(pr.image_offsets(options["image_features"], spatial_dims))
        if options["fine_stem_channels"] < 0:
            raise ConfigError(f"pointrend fine_stem_channels must be >= 0, got "
                              f"{options['fine_stem_channels']}")
        if options["fine_stem_channels"]:
            fine_stem = FineStem(spatial_dims, in_channels, options["fine_stem_channels"])
            image_channels += options["fine_stem_channels"]
        point_head = StandardPointHead(sum(by_name[n].channels for n in names) + image_channels,
                                       num_classes,
                                       options["num_fc"], options["fc_dim"],
                                       options["coarse_pred_each_layer"])
    return SegmentationModel(backbone, coarse_head, spatial_dims, num_classes, point_head, options,
                             fine_stem=fine_stem)


def build_model(spatial_dims: int, in_channels: int, num_classes: int,
                backbone: str = DEFAULT_BACKBONE, backbone_kwargs: dict | None = None,
                head: str = DEFAULT_HEAD, head_kwargs: dict | None = None,
                pointrend: Any = None) -> SegmentationModel:
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
    """
    net = build_backbone(backbone, spatial_dims, in_channels, **(backbone_kwargs or {}))
    return assemble_model(net, spatial_dims, num_classes, head, head_kwargs, pointrend, in_channels)
