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

from heads import StandardPointHead, as_feature_info, build_head, nearest_level
from seg import ops
from seg import pointrend as pr
from seg.errors import ConfigError
from seg.losses import masked_cross_entropy, soft_dice_loss
from seg.ops import check_spatial_dims, resize
from seg.registry import unknown_name_message

logger = logging.getLogger(__name__)

#: Default training points per patch, by spatial dims.  The paper's semantic rule ("as many points
#: as a stride-16 map of the crop", D2 Cityscapes 2048 for 512x1024) gives only 144 points for a
#: 2D 192^2 patch and 108 for a 3D 96x96x48 patch, far too thin for small medical patches whose
#: boundaries are a large fraction of the cells.  2D: 1024 = detectron2's semantic base config,
#: 2.8% of a 192^2 patch, ~7 points per stride-16 cell.  3D: boundaries are surfaces, so they hold
#: many more cells per coarse cell (a stride-16 cell face has 256 voxels); 4096 is the lower end of
#: the 3D references (HASSC 4096, Q3 5120), 0.9% of a 96x96x48 patch.  The 3x256 point MLP on 4096
#: points costs ~0.6 GMAC per sample, small next to any 3D backbone, so this is fine on CPU.
DEFAULT_TRAIN_NUM_POINTS = {2: 1024, 3: 4096}

#: Auto subdivision budget per step: c * (cells of the output)^((d-1)/d), i.e. c "full-resolution
#: boundary sheets" -- boundaries are (d-1)-dimensional, so the budget grows like a surface, not a
#: volume (POINTREND.md §10).  2D 512^2 -> 2048 per step; 3D 128^3 -> 65536 per step, which over the
#: 3 steps from stride 8 evaluates 7.8% of the 128^3 cells that the dense point head evaluates.
AUTO_POINTS_PER_SHEET = 4

POINTREND_DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "train_num_points": None,          # N at training; None -> DEFAULT_TRAIN_NUM_POINTS[dims]
    "oversample_ratio": 3.0,           # k, candidates = k N (D2 default 3)
    "importance_sample_ratio": 0.75,   # beta, most-uncertain fraction (D2 default 0.75)
    "subdivision_steps": None,         # None -> until input size (per-axis schedule)
    "subdivision_num_points": None,    # points per step; None -> AUTO_POINTS_PER_SHEET rule
    "in_features": None,               # fine levels; None -> the level with stride closest to 4
    "num_fc": 3,                       # point head hidden layers (D2 NUM_FC)
    "fc_dim": 256,                     # point head width (D2 FC_DIM)
    "coarse_pred_each_layer": False,   # D2 semantic configs: False (more stable)
    "image_features": "none",          # input intensities at the points: 'none' (D2), 'point',
                                       # 'neighbourhood' (point + face neighbours), pr.image_offsets
    "fine_stem_channels": 0,           # >0: a light stride-2 conv branch on the input, sampled at
                                       # the points as one more fine level (FineStem); 0: off (D2)
}


@dataclasses.dataclass
class TrainOutput:
    """Result of ``SegmentationModel.forward_train``.

    Attributes:
        coarse_logits: (N, K, *S_c) coarse head output.
        point_logits: (N, K, P) point head output, or None without PointRend.
        point_coords: (N, P, d) x-first normalised coordinates, or None.
        point_labels: (N, P) int64 nearest-sampled targets (255 = ignore), or None.
    """

    coarse_logits: torch.Tensor
    point_logits: torch.Tensor | None = None
    point_coords: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None


def resolve_pointrend_options(pointrend: dict | bool | None, spatial_dims: int) -> dict | None:
    """Merge user options with ``POINTREND_DEFAULTS``; None when PointRend is off."""
    if pointrend is None or pointrend is False:
        return None
    options = dict(POINTREND_DEFAULTS)
    for key, value in ({} if pointrend is True else dict(pointrend)).items():
        if key not in options:
            raise ConfigError(unknown_name_message("pointrend option", key, options))
        options[key] = value
    if options["image_features"] not in pr.IMAGE_FEATURE_MODES:
        raise ConfigError(unknown_name_message("pointrend image_features", options["image_features"],
                                               pr.IMAGE_FEATURE_MODES))
    if not options["enabled"]:
        return None
    if options["train_num_points"] is None:
        options["train_num_points"] = DEFAULT_TRAIN_NUM_POINTS[spatial_dims]
    return options


def auto_subdivision_points(out_size: Sequence[int]) -> int:
    """Points per subdivision step for an output of ``out_size`` (see AUTO_POINTS_PER_SHEET)."""
    d = len(out_size)
    return round(AUTO_POINTS_PER_SHEET * math.prod(out_size) ** ((d - 1) / d))


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
        if self.point_head is None:
            return TrainOutput(coarse)
        opt = self.pointrend
        coords = pr.get_uncertain_point_coords_with_randomness(
            coarse, pr.calculate_uncertainty, opt["train_num_points"], opt["oversample_ratio"],
            opt["importance_sample_ratio"])
        point_logits = self._point_fn(features, coarse, images)(coords)
        return TrainOutput(coarse, point_logits, coords, pr.sample_point_labels(labels, coords))

    @torch.no_grad()
    def forward_infer(self, images: torch.Tensor, mode: str = "subdivision") -> torch.Tensor:
        """Full-resolution logits (N, K, *S).

        Args:
            images: (N, C_in, *S).
            mode: 'subdivision' (PointRend; coarse upsampled when PointRend is off), 'coarse'
                (coarse logits upsampled) or 'dense' (point head at every output cell).
        """
        features, coarse = self._features_and_coarse(images)
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
        num_points = self.pointrend["subdivision_num_points"] or auto_subdivision_points(size)
        logits, self.last_point_evaluations = pr.subdivision_inference(
            coarse, point_fn, size, num_points, self.pointrend["subdivision_steps"])
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward_infer(x)`` in the default mode."""
        return self.forward_infer(x)

    def loss(self, out: TrainOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses: 'coarse_ce' + 'coarse_dice' on the coarse logits upsampled to the label size,
        'point' cross-entropy on the point logits (0 without PointRend), and their sum 'total'.

        Args:
            out: ``forward_train`` result.
            labels: (N, *S) int64, 255 = ignore.
        """
        coarse = resize(out.coarse_logits, labels.shape[1:], mode="linear")
        ce = masked_cross_entropy(coarse, labels, self.ignore_index)
        dice = soft_dice_loss(coarse, labels, self.ignore_index)
        point = coarse.new_zeros(()) if out.point_logits is None else \
            masked_cross_entropy(out.point_logits, out.point_labels, self.ignore_index)
        return {"coarse_ce": ce, "coarse_dice": dice, "point": point, "total": ce + dice + point}


def assemble_model(backbone: nn.Module, spatial_dims: int, num_classes: int,
                   head: str = "deeplab", head_kwargs: dict | None = None,
                   pointrend: dict | bool | None = None, in_channels: int = 1) -> SegmentationModel:
    """Build heads for an existing backbone module (anything with ``feature_info``); ``in_channels``
    is the input's channel count (the point head reads it with ``image_features``)."""
    info = as_feature_info(backbone.feature_info, spatial_dims)
    coarse_head = build_head(head, info, num_classes, spatial_dims, **(head_kwargs or {}))
    options = resolve_pointrend_options(pointrend, spatial_dims)
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
                backbone: str = "convnext_atto", backbone_kwargs: dict | None = None,
                head: str = "deeplab", head_kwargs: dict | None = None,
                pointrend: dict | bool | None = None) -> SegmentationModel:
    """Build a segmentation model from JSON-friendly options.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: K, including background.
        backbone: registered backbone name (``backbones.list_backbones()``).
        backbone_kwargs: options for ``backbones.build_backbone``.
        head: 'deeplab' or 'mask'.
        head_kwargs: options for the head (see ``heads``).
        pointrend: None/False (no point head), True (defaults) or a dict of options overriding
            ``POINTREND_DEFAULTS``.
    """
    from backbones import build_backbone

    net = build_backbone(backbone, spatial_dims, in_channels, **(backbone_kwargs or {}))
    return assemble_model(net, spatial_dims, num_classes, head, head_kwargs, pointrend, in_channels)
