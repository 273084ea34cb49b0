"""One process of the distributed tests, launched by tests/test_distributed.py as
``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py MODE OUT DATA N [RESUME]``.

Modes:
    train   first the step check (``step_check``: rank 0 writes OUT/step.json), then
            ``seg.train.train`` of the tiny 2D config (``tiny``) for N iterations into OUT/run,
            resuming RESUME, in the process group set up here; every rank saves its final weights to
            OUT/rank{r}.pt.
    fail    ``seg.train.train`` (which joins the process group itself), with rank 1's forward
            raising at its second step.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402

from seg.spec import model_config_from, resolve  # noqa: E402
from seg.model import build_model  # noqa: E402

#: every planned field of a 2D config set by hand (a config planned without data: ``seg.spec.resolve``)
RESOLVED_2D = ["data.dataset_json=None", "data.target_spacing=None", "data.patch_size=(32, 32)", "data.slice_axis=2",
               "data.normalization='none'", "data.mirror_axes=()", "data.rotation_axes=()", "train.batch_size=2",
               "model.pointrend.train_num_points=256", "model.pointrend.subdivision_num_points=256",
               "data.patch_voxel_budget=32768"]


def tiny(data: str, out: str, iterations: int):
    from seg.config import apply_overrides
    from helpers import tiny_config

    cfg = tiny_config(Path(data), Path(out), 2, iterations=iterations)
    return apply_overrides(cfg, ["data.val_fraction=0.5", "train.device='cpu'",
                                 "train.dist_timeout_minutes=10"])


def ce_only(model):
    """The model with the cross-entropy as its whole loss: a mean over the batch (the batch Dice of
    ``model.loss`` is computed per process, see docs/distributed.md, so it does not split over ranks)."""
    model.loss = lambda out, labels: {"total": type(model).loss(model, out, labels)["coarse_ce"]}
    return model


def step_check(ctx, out: Path) -> None:
    """One optimisation step on a fixed batch split over the ranks, against one process on the whole
    batch (rank 0 computes the reference from the same start); then a few more steps on the same
    batch.  Rank 0 writes the figures to OUT/step.json."""
    from hparam import Config
    from seg.config import apply_overrides
    from seg.distributed import wrap_model
    from seg.train import TrainForward, build_training, train_step

    cpu = torch.device("cpu")
    rank, world, b = ctx.rank, ctx.world_size, 2
    # no batch statistics (ConvNeXt: LayerNorm, U-Net head: GroupNorm here; InstanceNorm over the
    # 2x2 stride-16 map of these 32x32 images leaves gradients that Adam's first step amplifies from
    # float noise), no dropout, no point sampling
    cfg = apply_overrides(Config(), [
        "data.spatial_dims=2", "data.class_names=['bg','a','b']", "data.in_channels=1", "model.pointrend.enabled=False",
        "model.head_kwargs={'norm': 'group'}", "train.lr=3e-4", "train.warmup_iterations=1",
        "train.iterations=10", "train.device='cpu'", *RESOLVED_2D])
    spec = resolve(cfg, None, None)

    def fresh():
        torch.manual_seed(0)
        model, *rest = build_training(spec, cpu)
        return (ce_only(model), *rest)

    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 3, (b * world, 4, 4), generator=g)  # 8x8-pixel blobs
    labels = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)
    images = (labels[:, None].float() + 0.7 * torch.randn(b * world, 1, 32, 32, generator=g))
    batch = {"image": images, "label": labels}
    mine = {"image": images[rank * b:(rank + 1) * b], "label": labels[rank * b:(rank + 1) * b]}

    result = {}
    if rank == 0:  # the reference: one process, the whole batch (world x b), same start
        ref, *opt_state = fresh()
        start = [p.detach().clone() for p in ref.parameters()]
        result["ref_loss"] = train_step(ref, batch, *opt_state, cfg, cpu)["total"]
        ref_params = [p.detach().clone() for p in ref.parameters()]
        ref_grads = [None if p.grad is None else p.grad.clone() for p in ref.parameters()]
        result["step_size"] = max(float((a - s).abs().max()) for a, s in zip(ref_params, start))

    model, *opt_state = fresh()
    ddp = wrap_model(TrainForward(model), ctx)
    losses = [train_step(ddp, mine, *opt_state, cfg, cpu, ctx)["total"]]
    if rank == 0:  # gradients (averaged by DDP) and weights after the step
        names = [n for n, _ in model.named_parameters()]
        diffs = [float((p.detach() - r).abs().max()) for p, r in zip(model.parameters(), ref_params)]
        result["max_param_diff"] = max(diffs)
        result["max_param_diff_at"] = names[diffs.index(max(diffs))]
        result["same_grads_none"] = [p.grad is None for p in model.parameters()] == [g is None for g in ref_grads]
        result["max_grad_diff"] = max(float((p.grad - g).abs().max())
                                      for p, g in zip(model.parameters(), ref_grads) if g is not None)
        result["max_grad"] = max(float(g.abs().max()) for g in ref_grads if g is not None)
    for _ in range(5):  # the same (easy) batch again: the loss must fall
        losses.append(train_step(ddp, mine, *opt_state, cfg, cpu, ctx)["total"])
    gathered = ctx.all_gather_object(torch.cat([p.detach().flatten() for p in model.parameters()]))
    if rank == 0:
        result["losses"] = losses
        result["rank_weight_diff"] = float((gathered[0] - gathered[1]).abs().max())
        (out / "step.json").write_text(json.dumps(result))


def train_mode(out: Path, data: str, iterations: int, resume: str | None, fail: bool = False) -> None:
    from seg import distributed as distr
    from seg.train import train

    rank = int(os.environ["RANK"])
    built = []

    def factory(cfg):
        model = build_model(**model_config_from(cfg))
        if fail and rank == 1:
            calls = [0]
            forward_train = model.forward_train

            def failing(images, labels):
                calls[0] += 1
                if calls[0] == 2:
                    raise ValueError("injected failure on rank 1")
                return forward_train(images, labels)
            model.forward_train = failing
        built.append(model)
        return model

    ctx = None if fail else distr.setup(torch.device("cpu"))
    try:
        if ctx is not None:
            step_check(ctx, out)
        train(tiny(data, str(out / "run"), iterations), resume=resume, progress=False,
              model_factory=factory)
    finally:
        if ctx is not None:
            ctx.close()
    torch.save(built[0].state_dict(), out / f"rank{rank}.pt")


def main() -> None:
    mode, out, data, iterations = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    if mode not in ("train", "fail"):
        raise SystemExit(f"unknown mode {mode}")
    resume = sys.argv[5] if len(sys.argv) > 5 else None
    train_mode(out, data, iterations, resume, fail=mode == "fail")


if __name__ == "__main__":
    main()
