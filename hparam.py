"""The one file a user edits: data, model, training.

Switch 2D / 3D with ``data.spatial_dims``; sizes that depend on it (patch size, points per patch)
follow automatically.  Any field can be overridden from the command line, e.g.::

    python train_seg.py --set data.spatial_dims=2 model.backbone=repvgg_a0 train.iterations=500

or a whole other file passed with ``--config my_hparam.py`` (it must define ``get_config()``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    spatial_dims: int = 3                        # 2 or 3: the one 2D/3D switch
    root: str = "data/demo/hippocampus"          # dataset folder (relative paths: from this file's folder)
    images_dir: str = "imagesTr"                 # training images, under root (nnU-Net layout works as-is)
    labels_dir: str = "labelsTr"                 # training label maps, paired with images BY NAME
    val_images_dir: str | None = "imagesVal"     # explicit validation folders (used when they exist); None: split_file, else a seeded split
    val_labels_dir: str | None = "labelsVal"     # validation label maps
    split_file: str | None = "splits_final.json"  # nnU-Net-style folds under root ([{"train": [...], "val": [...]}, ...]), used when there are no validation folders
    fold: int | str = 0                          # the fold of split_file to train; 'all': every fold in turn into train.output_dir/fold_<k>/ (5 seeded folds without a split file), then the cross-validation summary (docs/crossval.md)
    val_fraction: float = 0.2                    # fraction of cases held out when neither validation folders nor split_file exist
    # ---- described by the data (seg/dataset_json.py): nnU-Net's dataset.json under root when there
    # ---- is one, else the label values and channels found; an explicit value must agree with dataset.json
    dataset_json: str | None = "auto"            # auto: root/dataset.json if it exists; a path (relative to root); None: ignore it
    pattern: str = "*"                           # glob of image file names (.nii.gz .nii .nrrd .nhdr .mha .mhd .png); *: dataset.json's file_ending
    class_names: list[str] | str = "auto"        # background first; auto: dataset.json's labels in value order, else background + label_<value> per value found
    label_remap: dict[int, int] | None = None    # {file value: class index}, e.g. {255: 1}; None: from dataset.json / the values found (gaps closed)
    in_channels: int | str = "auto"              # image channels; auto: dataset.json's channel_names, else the first case's
    channel_names: list[str] | None = None       # set from dataset.json: a channel named CT plans CT normalisation, noNorm none (nnU-Net)
    # ---- planned from the data (seg/plan.py): "auto" = the rule's value, printed at start and
    # ---- written to RUN/plan.json; any explicit value overrides it (docs/configuration.md: "The plan")
    target_spacing: tuple[float, ...] | None | str = "auto"  # mm per axis; auto: median (thick axis of anisotropic data kept thick); None: native grids
    patch_size: tuple[int, ...] | str = "auto"   # training patch (X, Y, Z) in 3D, the two in-plane axes in 2D; auto: median case, rounded up to the model's strides, within the budget
    patch_voxel_budget: int | str = "auto"       # voxels a patch may hold (the batch fills it); auto: CPU seg/plan.py's PATCH_BUDGET, CUDA from the device's memory (seg.plan.cuda_patch_budget)
    slice_axis: int | str = "auto"               # 2D: array axis of (X, Y, Z) volumes sliced along; auto: the thickest (ties: axial)
    normalization: str | list[str] = "auto"      # 'zscore', 'zscore_nonzero', 'ct' (clip + z-score by training-set stats), 'window' (ct_window to [-1, 1]), 'none', 'rescale_to_0_1', 'rgb_to_0_1', or one per channel; auto: the scheme nnU-Net gives a dataset.json channel name (any other name: z-score), else CT by HU range; z-score masked to non-zero by nnU-Net's crop rule
    ct_window: tuple[float, float] = (-1000.0, 1000.0)   # HU window for normalization='window'; = seg.preprocess.Preprocessing's default (tested)
    intensity_stats: list[dict[str, float]] | None = None  # set by the plan: per-channel foreground mean/std/clip of the training set ('ct'); leave None
    mirror_axes: tuple[int, ...] | str = "auto"  # axes of the patch mirrored in augmentation (and --tta); (): off; auto: all
    rotation_axes: tuple[int, ...] | str = "auto"  # axes rotated about (augment_affine); auto: all, only the thick axis on anisotropic data
    foreground_ratio: float = 0.33               # share of patches centred on a labelled voxel (nnU-Net's 1/3); the rest anywhere, so the model sees what lies away from the target
    lookalike_ratio: float = 0.5                 # share of the other patches centred on a look-alike: an unlabelled voxel within the case's foreground intensities (5-95 %)
    samples_per_volume: int = 8                  # 3D: patches drawn from a volume each time it is loaded
    queue_length: int = 64                       # 3D: torchio queue length
    num_workers: int = 0                         # data-loading worker processes
    augment_affine: bool = True                  # random scaling/rotation
    augment_elastic: bool = False                # random elastic deformation (slow on CPU)
    augment_intensity: bool = True               # random gamma / noise / bias field

    @property
    def num_classes(self) -> int:
        if isinstance(self.class_names, str):
            raise ValueError("data.class_names is 'auto': describe the data first (seg.dataset_json)")
        return len(self.class_names)


@dataclass
class PointRendConfig:
    enabled: bool = True                         # refine boundaries with the point head
    train_num_points: int | str = "auto"         # N per training patch; auto: 1/32 of the patch cells (>= 256)
    oversample_ratio: float = 3.0                # k: candidates = k·N
    importance_sample_ratio: float = 0.75        # beta: share of N taken by uncertainty
    subdivision_steps: int | None = None         # None: until the input resolution is reached
    subdivision_num_points: int | str = "auto"   # points re-rendered per subdivision step; auto: 3/64 of the patch cells in 3D (6144 at 64x64x32), 1/4 in 2D
    in_features: list[str] | None = None         # learned levels read by the point head (backbone levels, input stages 'input_s2', ...); None: the levels of stride closest to 4 and, when finer, 2 (ConvNeXt: its first stage and input_s2)
    num_fc: int = 3                              # point head hidden layers
    fc_dim: int = 256                            # point head width
    coarse_pred_each_layer: bool = True          # re-concatenate coarse logits at every layer
    image_features: str = "cube"                 # input intensities fed to the point head: 'none' (as detectron2), 'point', 'neighbourhood' (point + face neighbours), 'cube' (3^d around it), 'cube5' (5^d)


@dataclass
class ModelConfig:
    backbone: str = "convnext_atto"              # any name of backbones.list_backbones()
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # your options, merged over the variant's registered defaults (ConvNeXt: {"kernel_size": 3}, 3^d depthwise kernels, a third of the 7^d backbone's time, same Dice: docs/figures.md; {"kernel_size": 7} for timm's weights)
    pretrained: str | None = None                # local path to 2D ImageNet weights (inflated in 3D)
    head: str = "unet"                           # coarse head: 'unet' (U-Net decoder, input stages, deep supervision; options: heads/unet.py), 'deeplab' (ASPP, stride 8) or 'mask' (7^d MLP); = seg.model.DEFAULT_HEAD (tested)
    head_kwargs: dict[str, Any] = field(default_factory=dict)      # e.g. {"output_stride": 1} (unet), {"output_stride": 8} (deeplab)
    input_stages: list[int] = field(default_factory=lambda: [16])  # widths of learned conv stages on the input at strides 2, 4, ... finer than the backbone's finest level (ConvNeXt: one, at stride 2): the U-Net's finest skip and the point head's finest level; narrow because at stride 2 a stage and its decoder stage cost most of the head (twice the width: ~1.6x slower); [] for none
    pointrend: PointRendConfig = field(default_factory=PointRendConfig)


@dataclass
class TrainConfig:
    iterations: int | None = None                # optimisation steps; None: iterations_3d or iterations_2d by data.spatial_dims
    iterations_3d: int = 2700                    # default steps in 3D (hippocampus demo: ~14 min on a 2-core CPU, see docs/figures.md)
    iterations_2d: int = 3000                    # default steps in 2D (a 2D step costs about a third of a 3D one)
    batch_size: int | str = "auto"               # patches per step PER PROCESS (torchrun: global batch = N x this); auto: as many as the patch budget holds, >= 2 (3D hippocampus 2, its 2D slices 14)
    lr: float = 2e-3                             # peak learning rate (AdamW)
    weight_decay: float = 0.05                   # AdamW weight decay
    warmup_iterations: int = 50                  # linear warm-up steps
    schedule: str = "cosine"                     # 'cosine' or 'poly' decay after warm-up
    grad_clip: float = 1.0                       # max gradient norm (0 disables)
    val_every: int = 250                         # checkpoint every N iterations, validated there while validation takes <= val_share of the training time; always validated at the end
    val_share: float = 0.1                       # most of the training time spent validating (0: only the final validation, 1: every checkpoint)
    val_overlap: float = 0.25                    # sliding-window overlap during validation
    seed: int = 0                                # seeds splits, sampling, augmentation, init
    device: str = "auto"                         # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    amp: bool = True                             # mixed precision on CUDA: bfloat16 autocast where the GPU has it, else float16 with loss scaling; CPU: float32
    output_dir: str = "runs/demo"                # checkpoints, logs, TensorBoard
    num_threads: int = 0                         # torch CPU threads; 0 = torch default
    max_minutes: float = 0.0                     # stop training after this wall-clock time (0 = off)
    sync_batchnorm: bool = False                 # torchrun on GPUs: nn.SyncBatchNorm, BatchNorm stats over all processes (RepVGG, small batches)
    dist_timeout_minutes: float = 30.0           # torchrun: a collective waiting longer than this fails the job


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        """Check every field; raise ``seg.errors.ConfigError`` with a clear message."""
        # reason: the user's config file stays importable alone (seg.config pulls in torch and every backbone)
        from seg.config import validate_config
        validate_config(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def get_config() -> Config:
    """The configuration used by ``train_seg.py`` unless ``--config`` names another file."""
    return Config()
