"""The training loop behind ``train_seg.py``.

Determinism and resume: the run is cut into segments of ``train.val_every`` iterations.  At the start
of every segment all random generators are re-seeded from (seed, iteration) and a fresh data loader is
built, and a checkpoint is written at the end of every segment.  A run resumed from such a checkpoint
therefore replays exactly the iterations an uninterrupted run would have made.

Distributed (``torchrun --nproc_per_node=N train_seg.py``, see ``seg.distributed``): every process
trains on its own shard of the training cases with its own seed (``rank_seed``; rank 0 keeps the
single-process seed), gradients are averaged by DistributedDataParallel, validation cases are dealt
round robin and their metrics gathered, and only rank 0 logs and writes checkpoints.  Checkpoints hold
the unwrapped model, and the segment re-seeding above is per rank, so a run can resume on a different
number of processes (it then continues with the new number's data streams, not the old ones).
``train.batch_size`` is per process.  Without torchrun nothing of this runs.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import datasets as ds
from backbones.pretrained import load_pretrained
from seg import distributed as distr
from seg import plan as planning
from seg.checkpoint import checkpoint_state, inference_bundle, load_checkpoint, restore, save_checkpoint
from seg.config import Provenance, anchored, resolve_data_path
from seg.dataset_json import describe_data
from seg.errors import ConfigError
from seg.inference import count_windows
from seg.metrics import MetricAccumulator, evaluate_case
from seg.model import build_model
from seg.predict import Predictor, labels_from_logits, to_input_grid
from seg.spec import RunSpec, resolve

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- set-up helpers
def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def segment_seed(seed: int, iteration: int) -> int:
    """Seed of the data/augmentation stream starting at ``iteration``."""
    return (seed * 1_000_003 + iteration * 7919) % 2**31


def decay_factor(progress: float, schedule: str) -> float:
    """The LR factor after warm-up at ``progress`` in [0, 1]: cosine, or poly(0.9), to zero."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return (1.0 - progress) ** 0.9


def lr_lambda(cfg_train: Any) -> Any:
    """Linear warm-up then cosine or poly(0.9) decay to zero, as a LambdaLR factor."""
    total, warm = cfg_train.iterations, cfg_train.warmup_iterations

    def factor(it: int) -> float:
        if it < warm:
            return (it + 1) / max(1, warm)
        return decay_factor(min(1.0, (it - warm) / max(1, total - warm)), cfg_train.schedule)
    return factor


class CsvLog:
    """Append rows to a CSV file, writing the header once."""

    def __init__(self, path: Path, fields: list[str]) -> None:
        self.path, self.fields = path, fields
        if not path.exists():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(fields)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in self.fields])


# ----------------------------------------------------------------------------- data
@dataclasses.dataclass
class DataBundle:
    train_cases: list
    val_cases: list
    val_data: list              # preloaded validation cases of this process (all of them on one):
                                # images on the network's grid, labels on the files' (load_validation_case)
    val_index: list[int] | None = None  # their positions in val_cases (None: all, in order)


def paired_cases(cfg: Any) -> tuple[list, list | None]:
    """(cases of the training folders, cases of the validation folders or None when there are none)."""
    d = cfg.data
    cases = ds.find_cases(resolve_data_path(cfg, d.images_dir), resolve_data_path(cfg, d.labels_dir),
                          pattern=d.pattern)
    val_img = resolve_data_path(cfg, d.val_images_dir)
    if val_img is not None and val_img.exists():
        return cases, ds.find_cases(val_img, resolve_data_path(cfg, d.val_labels_dir), pattern=d.pattern)
    return cases, None


def described_config(cfg: Any, progress: bool = False) -> Any:
    """A copy of ``cfg`` with the fields the data describe resolved (``seg.dataset_json``:
    class names, label values, channels, file pattern from ``dataset.json``, else from the data)."""
    return describe(cfg, None, progress)[0]


def describe(cfg: Any, provenance: Provenance | None = None, progress: bool = False
             ) -> tuple[Any, list[tuple[str, Any, str, str]]]:
    """``described_config`` of ``cfg`` (its ``data.root`` anchored to ``provenance.source``), and the
    rows that say where each described field came from (the first rows of the plan)."""
    def all_cases(described: Any) -> list:
        train_cases, val_cases = paired_cases(described)
        return train_cases + (val_cases or [])

    cfg = anchored(cfg, provenance)
    user_set = provenance.user_set if provenance is not None else frozenset()
    return describe_data(cfg, resolve_data_path(cfg, "root"), all_cases, progress, user_set)


def find_data(cfg: Any) -> tuple[list, list]:
    """Find, pair, check and split the cases: (training cases, validation cases); ``cfg`` described
    (``described_config``)."""
    d = cfg.data
    if d.fold == "all":
        raise ConfigError("data.fold='all' trains every fold in turn (train_seg.py, seg.crossval.train_folds); "
                          "this step works on one fold: set data.fold=N")
    cases, val = paired_cases(cfg)
    split = resolve_data_path(cfg, "root", d.split_file)
    if val is not None:
        train_cases, val_cases = cases, val
    elif split is not None and split.is_file():
        train_cases, val_cases = ds.split_from_file(cases, split, d.fold)
    else:
        train_cases, val_cases = ds.split_cases(cases, d.val_fraction, cfg.train.seed)
    for case in list(train_cases) + list(val_cases):
        ds.check_case(case, d.num_classes, label_remap=d.label_remap, data_cfg=d)
    return train_cases, val_cases


def plan_run(cfg: Any, train_cases: list, out_dir: Path | None, ctx: distr.DistContext | None = None,
             progress: bool = True, described: list | tuple = (), provenance: Provenance | None = None
             ) -> RunSpec:
    """The run specification of a described ``cfg``: fingerprint the training cases (cached in
    ``out_dir/fingerprint.json``), resolve every 'auto' field (``seg.plan``) for this process's
    device (``ctx.device``; without ``ctx``, ``train.device`` resolved), show the plan (after the
    ``described`` rows of ``describe``), write ``out_dir/plan.json`` (rank 0) and freeze the result
    (``seg.spec.resolve``)."""
    ctx = ctx or distr.DistContext(device=resolve_device(cfg.train.device))
    main = ctx.is_main and out_dir is not None
    strides = planning.level_strides(cfg)  # a bad backbone option stops here, before any file is written
    fp = planning.compute_fingerprint(train_cases, cfg.data, out_dir / "fingerprint.json" if main else None,
                                      progress=progress and ctx.is_main)
    decisions = planning.make_plan(fp, cfg, strides, described, ctx.device)
    planned = planning.apply_plan(cfg, decisions)
    if planned.data.intensity_stats is None:
        planned.data.intensity_stats = planning.intensity_statistics(fp)
    planned.validate()
    if ctx.is_main:
        tqdm.write(planning.format_tables(fp, decisions))
    record = planning.plan_record(fp, decisions)
    if main:
        planning.write_json_atomic(record, out_dir / "plan.json")
    return resolve(planned, provenance or Provenance(), record)


def planned_run(cfg: Any, out_dir: str | Path | None = None, progress: bool = False,
                overwrite: bool = False, provenance: Provenance | None = None
                ) -> tuple[RunSpec, tuple[list, list]]:
    """The run specification of ``cfg`` and its (training, validation) cases: what ``train`` does
    before the first step (benchmarks and tests use it to get the same settings;
    ``train_seg.py --plan-only``).  ``out_dir`` (for ``plan.json`` and ``fingerprint.json``) follows
    training's folder rule (``claim_output_dir``): a folder holding another run is refused, or with
    ``overwrite`` that run's files are deleted first.  ``provenance``: where ``cfg`` came from
    (``seg.config.load_request``)."""
    cfg, described = describe(with_iterations(cfg.validate()), provenance, progress)
    cases = find_data(cfg)
    out = None if out_dir is None else Path(out_dir)
    if out is not None:
        claim_output_dir(out, overwrite)
        out.mkdir(parents=True, exist_ok=True)
    return plan_run(cfg, cases[0], out, progress=progress, described=described, provenance=provenance), cases


def prepare_data(cfg: Any, ctx: distr.DistContext | None = None, cases: tuple[list, list] | None = None
                 ) -> DataBundle:
    """Cases (``find_data``, unless given) and this process's share of the validation volumes,
    preloaded with the (planned) preprocessing."""
    train_cases, val_cases = cases if cases is not None else find_data(cfg)
    ctx = ctx or distr.DistContext()
    val_index = distr.shard(range(len(val_cases)), ctx.rank, ctx.world_size)
    val_data = [ds.load_validation_case(val_cases[i], cfg.data) for i in val_index]
    if ctx.is_main:
        log.info("%d training and %d validation cases", len(train_cases), len(val_cases))
    return DataBundle(train_cases, val_cases, val_data, val_index)


def batches(cfg: Any, cases: list, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    return iter(ds.build_train_loader(cases, cfg.data, cfg.train.batch_size, seed))


# ----------------------------------------------------------------------------- validation
def validation_windows(data: DataBundle, cfg: Any) -> int:
    """Sliding windows one validation runs over this process's volumes (its cost, in windows)."""
    d = cfg.data
    return sum(count_windows(case.image.shape[1:], d.spatial_dims, d.patch_size, cfg.train.val_overlap,
                             d.slice_axis) for case in data.val_data)


class ValidationClock:
    """When to validate: at every ``train.val_every`` checkpoint while the time spent validating
    stays within ``train.val_share`` of the time spent training, and always at the end.

    Large volumes make a validation expensive (many windows per case); this keeps its cost a small,
    bounded share of the run on any data and machine.  Which checkpoints get validated depends on
    measured times; training does not (the data stream is seeded per segment), so a run's weights
    are the same whatever was validated.  Before the first validation its cost is estimated from
    the windows it will run, each costed at half a training patch (forward and backward of
    ``batch_size`` patches take one step).
    """

    def __init__(self, share: float, windows: int, batch_size: int) -> None:
        self.share, self.windows, self.batch_size = share, windows, max(1, batch_size)
        self.train_s = self.val_s = 0.0
        self.steps, self.last_val_s = 0, None

    def add_step(self, seconds: float) -> None:
        self.train_s += seconds
        self.steps += 1

    def expected(self) -> float:
        if self.last_val_s is not None:
            return self.last_val_s
        return self.windows * (self.train_s / max(1, self.steps)) / (2 * self.batch_size)

    def due(self) -> bool:
        if self.share >= 1.0:  # every checkpoint
            return True
        return self.val_s + self.expected() <= self.share * self.train_s

    def add_validation(self, seconds: float) -> None:
        self.val_s += seconds
        self.last_val_s = seconds


def validate(model: torch.nn.Module, data: DataBundle, spec: RunSpec, device: torch.device,
             ctx: distr.DistContext | None = None) -> dict[str, float]:
    """Dice and Boundary IoU per foreground class on the validation volumes, and their means.

    Each case is segmented as ``infer_seg.py`` segments it (``seg.predict.Predictor`` on the network's
    grid, logits resampled to the file's grid before the argmax) and scored against its label as
    stored, with the file's spacing.  Distributed: each process evaluates its share of the cases, the
    per-case results are gathered and reduced in case order on every rank, so all ranks return what
    one process would.
    """
    ctx = ctx or distr.DistContext()
    cfg = spec.config
    predictor = Predictor(inference_bundle(spec, model), overlap=cfg.train.val_overlap,
                          batch_size=max(1, cfg.train.batch_size))  # puts the model in eval mode
    labels = list(range(1, cfg.data.num_classes))
    index = data.val_index if data.val_index is not None else list(range(len(data.val_data)))
    results = []
    with ctx.guard("validation"):
        for i, case in zip(index, tqdm(data.val_data, desc="validate", leave=False, dynamic_ncols=True,
                                       disable=not ctx.is_main)):
            logits = to_input_grid(predictor.predict_logits(case.image), case.label.shape)
            pred = labels_from_logits(logits).astype(np.int64)
            results.append((i, case.name, evaluate_case(pred, case.label, case.spacing, labels,
                                                        metrics=("dice", "boundary_iou"))))
    model.train()
    acc = MetricAccumulator()
    for _, name, result in sorted((r for part in ctx.all_gather_object(results) for r in part),
                                  key=lambda r: r[0]):
        acc.add(name, result)
    summary = acc.summary()
    out: dict[str, float] = {}
    for lab in labels:
        name = cfg.data.class_names[lab]
        for metric in ("dice", "boundary_iou"):
            out[f"{metric}/{name}"] = float(summary[lab][metric]["mean"])
    for metric in ("dice", "boundary_iou"):
        vals = [out[f"{metric}/{cfg.data.class_names[l]}"] for l in labels]
        out[f"{metric}/mean"] = float(np.nanmean(vals)) if vals else float("nan")
    return out


# ----------------------------------------------------------------------------- main loop
@dataclasses.dataclass
class TrainResult:
    output_dir: Path
    iterations: int
    best_dice: float
    last_metrics: dict[str, float]


def build_training(spec: RunSpec, device: torch.device, model_factory: Any = None, unsafe_load: bool = False):
    """Model, optimiser, scheduler and grad scaler of a run.

    ``model_factory(cfg)`` replaces the registry-built model (benchmarks compare other networks
    through the very same loop); it must offer ``forward_train``, ``loss`` and ``forward``.
    ``unsafe_load`` admits a ``model.pretrained`` file that needs full unpickling (trusted files).
    """
    cfg = spec.config
    model = model_factory(cfg) if model_factory else build_model(**spec.inference.model_config)
    if cfg.model.pretrained:
        load_pretrained(model.backbone, cfg.model.pretrained, unsafe_load=unsafe_load)
    model.to(device)
    # fused: one kernel over all parameters (3.5x faster than the per-tensor loop on CPU; same
    # update rule, and its state dict is the plain AdamW one, so checkpoints resume either way)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype(cfg, device) == torch.float16)
    return model, optimizer, scheduler, scaler


def amp_dtype(cfg: Any, device: torch.device) -> torch.dtype | None:
    """The autocast precision of a training step: ``train.amp`` on CUDA gives bfloat16 where the GPU
    has it (no loss scaling needed: float32's exponent range), else float16 with a GradScaler; None
    (float32) on other devices or with ``train.amp=False``."""
    if not cfg.train.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def use_amp(cfg: Any, device: torch.device) -> bool:
    return amp_dtype(cfg, device) is not None


class TrainForward(torch.nn.Module):
    """``forward_train`` and ``loss`` as one ``forward``: DistributedDataParallel synchronises the
    gradients of what runs through the forward of the module it wraps."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.loss(self.model.forward_train(images, labels), labels)


def forward_losses(model, batch, cfg, device) -> dict[str, torch.Tensor]:
    """The loss terms of ``batch``; ``model`` is the model or its DDP-wrapped ``TrainForward``."""
    images = batch["image"].to(device, non_blocking=True).float()
    labels = batch["label"].to(device, non_blocking=True).long()
    dtype = amp_dtype(cfg, device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return model(images, labels)
        return model.loss(model.forward_train(images, labels), labels)


def optimise(losses, model, optimizer, scheduler, scaler, cfg,
             ctx: distr.DistContext | None = None) -> dict[str, float]:
    """Backward and optimiser step; returns the loss terms as floats (the mean over processes).

    A non-finite loss stops training before the step, on every rank at once (the mean is shared).
    """
    values = (ctx or distr.DistContext()).mean({k: float(v.detach()) for k, v in losses.items()})
    if not math.isfinite(values["total"]):
        raise RuntimeError(f"training loss became {values['total']} at this step: {values}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses["total"]).backward()
    if cfg.train.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return values


def train_step(model, batch, optimizer, scheduler, scaler, cfg, device,
               ctx: distr.DistContext | None = None, what: str = "the training step") -> dict[str, float]:
    """One optimisation step; returns the loss terms as floats (averaged over processes).

    ``model`` is the model, or (distributed) ``wrap_model(TrainForward(model))``.  An exception in
    the forward on any rank stops every rank (``DistContext.guard``, its message naming ``what``)
    before the gradient all-reduce; a non-finite loss stops every rank before the step (``optimise``).
    The loop of ``train`` calls exactly this, so tests and benchmarks time what training runs.
    """
    ctx = ctx or distr.DistContext()
    with ctx.guard(what):
        losses = forward_losses(model, batch, cfg, device)
    return optimise(losses, model, optimizer, scheduler, scaler, cfg, ctx)


def with_iterations(cfg: Any) -> Any:
    """``cfg`` with ``train.iterations`` set: an explicit value wins, else the default for the
    spatial dims (``train.iterations_3d`` / ``iterations_2d``).  The caller's object is not changed."""
    if cfg.train.iterations is not None:
        return cfg
    out = copy.deepcopy(cfg)
    out.train.iterations = (cfg.train.iterations_3d if cfg.data.spatial_dims == 3
                            else cfg.train.iterations_2d)
    return out


def train(cfg: Any, resume: str | None = None, progress: bool = True, model_factory: Any = None,
          stop_after: int | None = None, unsafe_load: bool = False, overwrite: bool = False,
          provenance: Provenance | None = None) -> TrainResult:
    """Train ``cfg`` (an hparam ``Config``), on one process or, under torchrun, on all of them.

    Args:
        cfg: the configuration (``hparam.Config``).
        resume: path of a checkpoint to continue from (readable by every process).
        progress: show a tqdm bar (rank 0 only).
        model_factory: optional ``f(cfg) -> model`` replacing the registry-built model.
        stop_after: stop after this iteration as if interrupted (tests of resume).
        overwrite: a new run may replace another run in ``train.output_dir`` (its checkpoints, logs,
            plan and TensorBoard files are deleted first); without it that is a ConfigError.
        unsafe_load: admit ``resume`` and ``model.pretrained`` files that need full unpickling
            (it runs code stored in the file: trusted files only).
        provenance: where ``cfg`` came from (``seg.config.load_request``; ``resume_config``): its
            config file and the fields the user set. None: a config made in code.
    """
    provenance = provenance or Provenance()
    cfg, described = describe(with_iterations(cfg.validate()), provenance, progress)
    t = cfg.train
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
    ctx = distr.setup(resolve_device(t.device), t.dist_timeout_minutes)
    try:
        return _train(cfg, ctx, resume, progress, model_factory, stop_after, unsafe_load, overwrite,
                      (described, provenance))
    finally:
        ctx.close()


#: the files a run writes into its output folder
RUN_FILES = ("last.pt", "best.pt", "train_log.csv", "val_log.csv", "plan.json", "fingerprint.json",
             "tensorboard")


def claim_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that holds another run, or (``overwrite``) delete that run's files."""
    other = [n for n in ("last.pt", "best.pt", "train_log.csv") if (out_dir / n).exists()]
    if not other:
        return
    if not overwrite:
        raise ConfigError(f"holds another run ({', '.join(other)}): choose another train.output_dir, "
                          "continue it with --resume, or replace it with --overwrite", out_dir)
    for name in RUN_FILES:
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _train(cfg: Any, ctx: distr.DistContext, resume: str | None, progress: bool, model_factory: Any,
           stop_after: int | None, unsafe_load: bool = False, overwrite: bool = False,
           origin: tuple[list, Provenance] = ((), Provenance())) -> TrainResult:
    """The run of ``train`` of a described ``cfg``; ``origin``: the rows ``describe`` returned and
    the request's provenance."""
    described, provenance = origin
    t, device = cfg.train, ctx.device
    seed_everything(t.seed)
    out_dir = Path(t.output_dir)
    with ctx.guard("data preparation"):
        cases = find_data(cfg)  # bad data stops here, before the output folder exists
        if ctx.is_main:
            if not resume:
                claim_output_dir(out_dir, overwrite)
            out_dir.mkdir(parents=True, exist_ok=True)
        resumed = load_checkpoint(resume, unsafe_load=unsafe_load) if resume else None  # read once
        stored = resumed.get("plan") if resumed is not None else None
        if stored is not None and not planning.unresolved(cfg):  # the run's own plan, as it was
            spec = resolve(cfg, provenance, stored)
        else:
            spec = plan_run(cfg, cases[0], out_dir, ctx, progress, described, provenance)
        cfg = spec.config  # resolved once, frozen from here on
        data = prepare_data(cfg, ctx, cases)
        train_cases = distr.train_shard(data.train_cases, ctx.rank, ctx.world_size)
    with ctx.guard("model set-up"):
        model, optimizer, scheduler, scaler = build_training(spec, device, model_factory, unsafe_load)
        if t.sync_batchnorm:
            model = distr.convert_sync_batchnorm(model, ctx)
        start, best = 0, -1.0
        if resume:
            start, best = restore(resume, model, optimizer, scheduler, scaler, ckpt=resumed)
            if ctx.is_main:
                log.info("resumed from %s at iteration %d", resume, start)
    step_model = distr.wrap_model(TrainForward(model), ctx) if ctx.distributed else model
    writer = train_csv = val_csv = None
    if ctx.is_main:
        writer = SummaryWriter(str(out_dir / "tensorboard"))
        train_csv = CsvLog(out_dir / "train_log.csv", ["iteration", "total", "coarse_ce", "coarse_dice",
                                                       "point", "lr", "seconds"])
        val_fields = ["iteration"] + [f"{m}/{n}" for m in ("dice", "boundary_iou")
                                      for n in cfg.data.class_names[1:] + ["mean"]]
        val_csv = CsvLog(out_dir / "val_log.csv", val_fields)
    metrics: dict[str, float] = {}
    clock = ValidationClock(t.val_share, validation_windows(data, cfg), cfg.train.batch_size)
    t0 = time.time()
    bar = tqdm(total=t.iterations, initial=start, desc="train", disable=not (progress and ctx.is_main),
               dynamic_ncols=True)
    it, stream = start, None
    model.train()
    while it < t.iterations:
        if stream is None or it % t.val_every == 0:  # a new segment: re-seed (per rank)
            begin = it - it % t.val_every
            seed = distr.rank_seed(segment_seed(t.seed, begin), ctx.rank)
            if it == begin:
                seed_everything(seed)
            # resumed mid-segment (a train.max_minutes stop): the restored generators go on, and the
            # segment's data stream is replayed up to here, so the run continues exactly
            stream = batches(cfg, train_cases, seed)
            for _ in range(it - begin):
                next(stream)
        # an exception on any rank stops them all (two guards: DDP's forward has its own collectives,
        # so loading the batch and the forward, inside train_step, are guarded apart)
        t_step = time.time()
        with ctx.guard(f"loading the batch of iteration {it + 1}"):
            batch = next(stream)
        values = train_step(step_model, batch, optimizer, scheduler, scaler, cfg, device, ctx,
                            what=f"iteration {it + 1}")
        clock.add_step(time.time() - t_step)
        it += 1
        values.update(iteration=it, lr=scheduler.get_last_lr()[0], seconds=round(time.time() - t0, 2))
        if ctx.is_main:
            train_csv.write(values)
            for k in ("total", "coarse_ce", "coarse_dice", "point"):
                if k in values:
                    writer.add_scalar(f"loss/{k}", values[k], it)
        bar.update(1)
        bar.set_postfix(loss=f"{values['total']:.3f}", dice=f"{metrics.get('dice/mean', float('nan')):.3f}")
        out_of_time = t.max_minutes > 0 and ctx.any((time.time() - t0) / 60 >= t.max_minutes)
        last = it == t.iterations or out_of_time
        if it % t.val_every == 0 or last:  # a checkpoint; validated when due (ValidationClock)
            validated = last or ctx.any(clock.due())
            if validated:
                t_val = time.time()
                metrics = validate(model, data, spec, device, ctx)
                clock.add_validation(time.time() - t_val)
            with ctx.guard("writing checkpoints"):  # rank 0 writes, the others wait here
                if ctx.is_main:
                    state = checkpoint_state(spec, model, optimizer, scheduler, scaler, it, best)
                    if validated:
                        val_csv.write({"iteration": it, **metrics})
                        for k, v in metrics.items():
                            writer.add_scalar(f"val/{k}", v, it)
                        if metrics["dice/mean"] > best:
                            state["best"] = metrics["dice/mean"]
                            save_checkpoint(state, out_dir / "best.pt")
                        log_metrics(it, metrics, cfg.data.class_names)
                    save_checkpoint(state, out_dir / "last.pt")
            if validated:
                best = max(best, metrics["dice/mean"])
        if out_of_time:
            if ctx.is_main:
                log.info("stopping after %.1f minutes (train.max_minutes)", t.max_minutes)
            break
        if stop_after is not None and it >= stop_after:
            break
    bar.close()
    if writer is not None:
        writer.close()
    return TrainResult(out_dir, it, best, metrics)


def log_metrics(it: int, metrics: dict[str, float], class_names: list[str]) -> None:
    rows = [f"{n}: Dice {metrics[f'dice/{n}']:.4f}  Boundary IoU {metrics[f'boundary_iou/{n}']:.4f}"
            for n in class_names[1:]]
    rows.append(f"mean: Dice {metrics['dice/mean']:.4f}  Boundary IoU {metrics['boundary_iou/mean']:.4f}")
    tqdm.write(f"[validation @ {it}] " + " | ".join(rows))
