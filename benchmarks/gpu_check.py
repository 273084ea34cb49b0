#!/usr/bin/env python
"""A prepared check for one lent NVIDIA GPU: training, inference, export and DDP through the project's
own functions, in a few minutes (issue 24 item 4).

    python benchmarks/gpu_check.py --iterations 300 --out runs/gpu_check
    python benchmarks/gpu_check.py --dry-run-cpu --iterations 2 --out /tmp/gpu_check   # the logic, on CPU

Parts, in order (each one reports its failure in one line, with the traceback above it, and the next
part runs; the JSON report is rewritten after every part):

1. training: ``seg.train.train`` with the default ``hparam.py`` configuration on the demo data,
   ``train.device=cuda train.amp=True`` for ``--iterations`` steps (one validation, at the end):
   steps/s (``train_log.csv``'s ``seconds``, over all steps and after the first tenth), peak CUDA
   memory, the final mean validation Dice (``val_log.csv``), the precision (``seg.train.amp_dtype``:
   bfloat16 autocast where the GPU has it, else float16 with a GradScaler; and the dtype seen at the
   first convolution of the first training step).
2. inference: the checkpoint (``seg.checkpoint.load_for_inference``) through ``seg.predict.Predictor``
   on CUDA and on CPU for ``--cases`` validation cases (read with ``seg.io``, the inference path of
   ``infer_seg.py``): seconds per case, peak CUDA memory, and the agreement of the two devices (max
   |logit| difference, share of voxels whose label differs).
3. export: ``seg.export.export_checkpoint`` (the function behind ``python -m seg.export``; it traces
   and checks on CPU, it has no device option), then the TorchScript file loaded on CUDA
   (``seg.export.load_export``, whose dry run runs there) against the eager model on CUDA.
4. DDP: ``torchrun --standalone --nproc_per_node=N train_seg.py`` (N = ``--ddp-nproc``, default the
   number of GPUs) for ``--ddp-iterations`` steps in a subprocess with a timeout; with N = 1
   ``seg.distributed`` makes no process group, so an NCCL all-reduce on one rank is checked as well.
5. fp32: training as in 1 with ``train.amp=False`` when the time left allows (``--skip-fp32``), for
   the AMP / fp32 speed ratio.

Then a markdown table of every figure (with the GPU, torch, CUDA, cuDNN and NCCL versions), also
written to ``OUT/gpu_check.json``.  The parts keep to ``--budget-minutes`` (default 7; the imports
and CUDA's start-up come on top): trainings are capped with ``train.max_minutes``, the DDP run has a
timeout, and the fp32 training runs only when the time left allows.

Without CUDA it stops at once (exit status 2) unless ``--dry-run-cpu``: then the same parts run on
CPU with tiny defaults (2 iterations, 1 case, 2 Gloo processes for DDP, no NCCL).  ``--set KEY=VALUE``
items go to every training (e.g. ``data.num_workers=8``, or a small synthetic data set); the run's own
fields (iterations, device, amp, output folder, validation) are set after them.
Exit status: 0 every part passed or was skipped, 1 a part failed, 2 no CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from seg import io  # noqa: E402
from seg.checkpoint import load_for_inference  # noqa: E402
from seg.cli import one_line  # noqa: E402
from seg.config import load_request  # noqa: E402
from seg.export import ATOL, CHECK_BATCHES, export_checkpoint, load_export  # noqa: E402
from seg.files import write_bytes_atomic  # noqa: E402
from seg.model import build_model  # noqa: E402
from seg.predict import Predictor, labels_from_logits  # noqa: E402
from seg.spec import model_config_from  # noqa: E402
from seg.train import amp_dtype, claim_output_dir, described_config, find_data, train, with_iterations  # noqa: E402

NO_CUDA = "gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run-cpu runs its logic on CPU"
REPORT = "gpu_check.json"
EXIT_NO_CUDA = 2
GIB = 2.0 ** 30


# ------------------------------------------------------------------------------------------ plumbing
class Check:
    """The run's settings, clock and report (rewritten to ``out/REPORT`` after every part)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, Path(args.out).absolute()  # torchrun runs in the repository
        self.device = torch.device("cpu" if args.dry_run_cpu else "cuda")
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + 60.0 * args.budget_minutes
        self.report: dict[str, Any] = {"dry_run_cpu": args.dry_run_cpu, "command": " ".join(sys.argv),
                                       "started": datetime.datetime.now().isoformat(timespec="seconds"),
                                       "machine": machine(self.device), "parts": {}}

    def left(self) -> float:
        """Seconds left of the budget."""
        return self.deadline - time.perf_counter()

    def say(self, text: str) -> None:
        print(f"[gpu_check {time.perf_counter() - self.t0:6.1f} s] {text}", flush=True)

    def part(self, key: str, title: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one part: its result, or its failure in one line (the traceback printed), saved."""
        self.say(f"== {title}")
        start = time.perf_counter()
        try:
            result = {"status": "ok", **fn()}
        except Exception as exc:  # noqa: BLE001 - one failing part must not stop the others
            traceback.print_exc()
            result = {"status": "failed", "error": f"{type(exc).__name__}: {one_line(exc)[:300]}"}
            if self.device.type == "cuda":
                with contextlib.suppress(Exception):  # a broken CUDA context fails here too
                    torch.cuda.empty_cache()
        result["wall_s"] = round(time.perf_counter() - start, 1)
        self.report["parts"][key] = result
        self.say(f"{title}: {result['status']}" + (f" ({result['error']})" if "error" in result else "")
                 + (f" ({result['reason']})" if "reason" in result else ""))
        self.save()
        return result

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        write_bytes_atomic(self.out / REPORT, json.dumps(self.report, indent=1, default=str) + "\n")


def skipped(reason: str) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason}


def machine(device: torch.device) -> dict[str, Any]:
    """The GPU (or CPU) and the versions the figures belong to."""
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type != "cuda":
        return {**info, "device": f"cpu ({platform.processor() or platform.machine()})"}
    try:
        return {**info, **gpu_info()}
    except Exception as exc:  # noqa: BLE001 - the parts will tell what works
        return {**info, "device": f"cuda (properties unreadable: {type(exc).__name__}: {one_line(exc)[:200]})"}


def gpu_info() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    nccl = torch.cuda.nccl.version() if dist.is_nccl_available() else None
    return {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / GIB, 1),
            "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GIB, 3) if device.type == "cuda" else None


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_figures(run_dir: Path) -> dict[str, Any]:
    """Steps/s of a run (``train_log.csv``'s ``seconds``: since the loop started, validations included,
    so the runs here validate only after their last step), overall and after the first tenth of the
    steps (warm-up: CUDA start-up, the first data), the final loss and mean validation Dice."""
    rows = read_rows(run_dir / "train_log.csv")
    its, secs = [int(r["iteration"]) for r in rows], [float(r["seconds"]) for r in rows]
    k = min(len(rows) - 1, max(1, len(rows) // 10))
    out: dict[str, Any] = {"iterations": its[-1], "loop_s": secs[-1],
                           "steps_per_s": round(its[-1] / secs[-1], 3) if secs[-1] > 0 else None}
    span = secs[-1] - secs[k - 1] if k >= 1 else 0.0
    out["steps_per_s_after_warmup"] = round((its[-1] - its[k - 1]) / span, 3) if span > 0 else None
    val = read_rows(run_dir / "val_log.csv") if (run_dir / "val_log.csv").is_file() else []
    out["final_dice"] = round(float(val[-1]["dice/mean"]), 4) if val else None
    out["final_loss"] = round(float(rows[-1]["total"]), 4)
    return out


# ------------------------------------------------------------------------------------ 1/5 training
class FirstConvDtype:
    """The output dtype of the model's first convolution in its first forward (the first training
    step's, under the loop's own autocast); the hook removes itself after that one call."""

    def __init__(self) -> None:
        self.dtype: str | None = None
        self.handles: list[Any] = []

    def __call__(self, cfg: Any) -> torch.nn.Module:
        """``model_factory`` of ``seg.train.train``: the model the registry builds, watched."""
        model = build_model(**model_config_from(cfg))
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
                self.handles.append(m.register_forward_hook(self.seen))
        return model

    def seen(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and self.dtype is None:
            self.dtype = str(output.dtype).replace("torch.", "")
            for h in self.handles:
                h.remove()


def train_sets(check: Check, run_dir: Path, iterations: int, amp: bool, minutes: float) -> list[str]:
    """``--set`` items of one training: the user's, then the run's own fields (which win)."""
    return [*check.args.set, f"train.iterations={iterations}", f"train.val_every={iterations}",
            f"train.device={check.device.type}", f"train.amp={amp}", f"train.output_dir='{run_dir}'",
            f"train.max_minutes={minutes:.2f}"]


def precision(cfg: Any, device: torch.device) -> str:
    """What ``seg.train.forward_losses`` runs in: autocast (and its dtype) or float32."""
    dtype = amp_dtype(cfg, device)
    if dtype is not None:
        return f"autocast {str(dtype).replace('torch.', '')}" + (" + GradScaler" if dtype == torch.float16 else "")
    return f"float32 (train.amp={cfg.train.amp} on {device.type}: no autocast)"


@contextlib.contextmanager
def heartbeat(check: Check, log: Path, total: int, every: float = 20.0) -> Iterator[None]:
    """Print the last row of ``log`` (a run's ``train_log.csv``) every ``every`` seconds while the
    block runs (``seg.train.train`` prints no progress without its bar)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            rows = read_rows(log) if log.is_file() else []
            if rows:
                r = rows[-1]
                check.say(f"{log.parent.name}: step {r['iteration']}/{total}, loss {float(r['total']):.3f}, "
                          f"{r['seconds']} s in the loop")
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def part_train(check: Check, name: str, amp: bool, minutes: float) -> dict[str, Any]:
    """One training through ``seg.train.train``; its figures (``run_figures``)."""
    run_dir = check.out / name
    cfg, provenance = load_request(None, train_sets(check, run_dir, check.args.iterations, amp, minutes))
    claim_output_dir(run_dir, overwrite=True)
    reuse_fingerprint(check, run_dir)
    watch = FirstConvDtype()
    reset_peak(check.device)
    start = time.perf_counter()
    with heartbeat(check, run_dir / "train_log.csv", check.args.iterations):
        result = train(cfg, progress=False, overwrite=True, provenance=provenance, model_factory=watch)
    sync(check.device)
    out = {"wall_s_train": round(time.perf_counter() - start, 1), **run_figures(run_dir),
           "peak_cuda_gib": peak_gib(check.device), "precision": precision(cfg, check.device),
           "first_conv_dtype": watch.dtype, "max_minutes": round(minutes, 2),
           "checkpoint": str(result.output_dir / "last.pt")}
    check.say(f"{name}: {out['iterations']} steps, {out['steps_per_s']} steps/s "
              f"({out['steps_per_s_after_warmup']} after warm-up), peak CUDA {out['peak_cuda_gib']} GiB, "
              f"Dice {out['final_dice']}, {out['precision']}, first conv {watch.dtype}")
    return out


def reuse_fingerprint(check: Check, run_dir: Path) -> None:
    """Copy the first run's ``fingerprint.json`` (a cache keyed by the case files, ``seg.plan``)."""
    first = check.out / "train_amp" / "fingerprint.json"
    if first.is_file() and run_dir != first.parent:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(first, run_dir / "fingerprint.json")


def fp32_minutes(check: Check) -> float | None:
    """Minutes the fp32 training may take (None: not enough time left)."""
    amp = check.report["parts"].get("train_amp", {})
    need = 1.5 * amp.get("wall_s_train", 60.0) + 30.0  # fp32 is slower; the final validation
    left = check.left() - 20.0  # the summary
    if left < min(need, 60.0):
        return None
    return max(0.2, min(check.args.train_minutes, (left - 30.0) / 60.0))


# ----------------------------------------------------------------------------------- 2 inference
def checkpoint_of(check: Check) -> Path:
    for key in ("train_amp", "train_fp32"):
        path = check.report["parts"].get(key, {}).get("checkpoint")
        if path and Path(path).is_file():
            return Path(path)
    raise FileNotFoundError("no checkpoint: the training part failed")


def validation_cases(check: Check) -> list[Any]:
    """The first ``--cases`` validation cases of the training's configuration."""
    cfg, _ = load_request(None, check.args.set)
    return find_data(described_config(with_iterations(cfg.validate())))[1][:check.args.cases]


def segment(predictor: Predictor, images: list[tuple[Any, Any]], device: torch.device
            ) -> tuple[list[torch.Tensor], list[float]]:
    """Logits on the input grid of each (image, meta) and the seconds each took (after one warm-up)."""
    predictor.input_grid_logits(images[0][0], images[0][1].spacing)
    logits, times = [], []
    for image, meta in images:
        sync(device)
        start = time.perf_counter()
        logits.append(predictor.input_grid_logits(image, meta.spacing))
        sync(device)
        times.append(time.perf_counter() - start)
    return logits, times


def part_inference(check: Check) -> dict[str, Any]:
    ckpt, cases = checkpoint_of(check), validation_cases(check)
    images = [io.read_case(c.images) for c in cases]
    out: dict[str, Any] = {"checkpoint": str(ckpt), "device": str(check.device), "cases": [c.name for c in cases],
                           "shapes": [list(im.shape[1:]) for im, _ in images]}
    results = {}
    for label, device in (("device", check.device), ("cpu", torch.device("cpu"))):
        predictor = Predictor(load_for_inference(ckpt, device))
        reset_peak(device)
        results[label], times = segment(predictor, images, device)
        out[f"s_per_case_{label}"] = round(sum(times) / len(times), 4)
        if device.type == "cuda":
            out["peak_cuda_gib"] = peak_gib(device)
        check.say(f"inference on {device}: {out[f's_per_case_{label}']:.3f} s per case ({len(times)} cases)")
    diffs = [float((a - b).abs().max()) for a, b in zip(results["device"], results["cpu"])]
    differ = sum(int((labels_from_logits(a) != labels_from_logits(b)).sum())
                 for a, b in zip(results["device"], results["cpu"]))
    out["max_abs_logit_diff"] = max(diffs)
    out["label_differ_fraction"] = differ / sum(a[0].numel() for a in results["device"])
    check.say(f"{check.device} vs cpu: max |logit diff| {out['max_abs_logit_diff']:.3g}, labels differ on "
              f"{out['label_differ_fraction']:.2e} of the voxels")
    return out


# -------------------------------------------------------------------------------------- 3 export
def part_export(check: Check) -> dict[str, Any]:
    """``export_checkpoint`` (CPU), the TorchScript file then run on the device against eager."""
    ckpt, folder = checkpoint_of(check), check.out / "export"
    result = export_checkpoint(ckpt, folder, onnx=check.args.onnx, overwrite=True)
    nets = result.manifest["networks"]
    out: dict[str, Any] = {"note": "export_checkpoint (python -m seg.export) traces and checks on CPU: it has "
                                   "no device option; the file is then loaded and compared on the device",
                           "cpu_max_abs_diff": nets["torchscript"]["max_abs_diff_vs_eager"],
                           "onnx": nets["onnx"].get("skipped") or nets["onnx"].get("max_abs_diff_vs_eager")}
    device = check.device
    scripted = load_export(folder, device, unsafe_load=True).model  # its dry run runs on the device
    eager = load_for_inference(ckpt, device).model
    g = torch.Generator().manual_seed(0)
    diffs = {}
    with torch.no_grad():
        for n in CHECK_BATCHES:
            x = torch.randn((n, result.manifest["in_channels"], *result.manifest["patch_size"]), generator=g).to(device)
            diffs[str(n)] = float((scripted(x).float() - eager(x).float()).abs().max())
        out["ms_per_window_eager"], out["ms_per_window_torchscript"] = (
            window_ms(net, x, device) for net in (eager, scripted))
    out["device_max_abs_diff"], out["atol"] = diffs, ATOL
    out["device_ok"] = max(diffs.values()) <= ATOL
    check.say(f"TorchScript on {device} vs eager on {device}: max |diff| {diffs} (accepted {ATOL:g}); "
              f"{out['ms_per_window_torchscript']} vs {out['ms_per_window_eager']} ms per window")
    if not out["device_ok"]:
        raise AssertionError(f"TorchScript on {device} differs from eager by {max(diffs.values()):.3g} > {ATOL:g}")
    return out


def window_ms(net: Any, x: torch.Tensor, device: torch.device, repeats: int = 5) -> float:
    """Milliseconds per window of ``net`` on the batch ``x`` (after one warm-up call)."""
    net(x)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        net(x)
    sync(device)
    return round(1000 * (time.perf_counter() - start) / (repeats * x.shape[0]), 2)


# ----------------------------------------------------------------------------------------- 4 DDP
def torchrun(cmd: list[str], log_path: Path, timeout: float) -> int | None:
    """Run ``cmd`` in its own process group, output to ``log_path``; None when it ran past
    ``timeout`` (the group is then terminated, then killed)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    continue
            return None


def part_ddp(check: Check) -> dict[str, Any]:
    n, its = check.args.ddp_nproc, check.args.ddp_iterations
    timeout = min(check.args.ddp_timeout, check.left() - 60.0)
    if timeout < 30:
        return skipped(f"{check.left():.0f} s left of the budget")
    run_dir = check.out / "ddp"
    claim_output_dir(run_dir, overwrite=True)
    reuse_fingerprint(check, run_dir)
    sets = train_sets(check, run_dir, its, True, timeout / 60.0 * 0.6)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(ROOT / "train_seg.py"), "--no-progress", "--overwrite", "--set", *sets]
    check.say(f"torchrun, {n} process(es), timeout {timeout:.0f} s: log in {run_dir / 'torchrun.log'}")
    rc = torchrun(cmd, run_dir / "torchrun.log", timeout)
    backend = ("nccl" if check.device.type == "cuda" else "gloo") if n > 1 else \
        "none (world size 1: seg.distributed runs the single-process path)"
    out: dict[str, Any] = {"nproc": n, "backend": backend, "returncode": rc, "command": " ".join(cmd)}
    if rc != 0:
        tail = (run_dir / "torchrun.log").read_text(errors="replace").strip().splitlines()[-15:]
        print("\n".join(tail), flush=True)
        raise RuntimeError(f"torchrun {'timed out' if rc is None else f'exited {rc}'}: {tail[-1] if tail else ''}")
    out.update(run_figures(run_dir))
    if check.device.type == "cuda" and n == 1:
        out["nccl_all_reduce"] = nccl_all_reduce(check.device)
    check.say(f"DDP: {out['iterations']} steps, {out['steps_per_s']} steps/s, backend {backend}, "
              f"NCCL all-reduce {out.get('nccl_all_reduce', 'not run')}")
    return out


def nccl_all_reduce(device: torch.device) -> str:
    """An NCCL process group of one rank on ``device`` and one all-reduce: 'ok' or the error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        index = torch.device(device.type, torch.cuda.current_device() if device.index is None else device.index)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60), device_id=index)
        x = torch.ones(4, device=index)
        dist.all_reduce(x)
        torch.cuda.synchronize(index)
        return "ok" if bool((x == 1).all()) else f"wrong result {x.tolist()}"
    except Exception as exc:  # noqa: BLE001 - reported, the check goes on
        return f"failed: {type(exc).__name__}: {one_line(exc)[:200]}"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# -------------------------------------------------------------------------------------- summary
def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(part, figure, value) of every figure of the report."""
    rows = [("machine", k, v) for k, v in report["machine"].items()]
    for part, result in report["parts"].items():
        rows += [(part, k, v) for k, v in result.items() if k not in ("command", "checkpoint")]
    amp, fp32 = (report["parts"].get(k, {}).get("steps_per_s_after_warmup") for k in ("train_amp", "train_fp32"))
    if amp and fp32:
        rows.append(("train", "amp / fp32 speed ratio (after warm-up)", round(amp / fp32, 3)))
    rows.append(("total", "elapsed_s", report.get("elapsed_s")))
    return rows


def markdown(rows: list[tuple[str, str, Any]]) -> str:
    def show(v: Any) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
        return text.replace("|", "\\|")
    return "\n".join(["| part | figure | value |", "|---|---|---|",
                      *(f"| {p} | {k} | {show(v)} |" for p, k, v in rows)])


# -------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, help="training steps (default 300; 2 with --dry-run-cpu)")
    ap.add_argument("--out", default="runs/gpu_check", help="folder of the runs, the export and gpu_check.json")
    ap.add_argument("--cases", type=int, help="validation cases to segment (default 3; 1 with --dry-run-cpu)")
    ap.add_argument("--ddp-nproc", type=int, help="torchrun processes (default: the GPUs; 2 with --dry-run-cpu)")
    ap.add_argument("--ddp-iterations", type=int, help="steps of the DDP run (default 40; 2 with --dry-run-cpu)")
    ap.add_argument("--ddp-timeout", type=float, default=240.0, help="seconds the torchrun may take")
    ap.add_argument("--train-minutes", type=float, default=2.5, help="cap of each training (train.max_minutes)")
    ap.add_argument("--budget-minutes", type=float, default=7.0, help="the whole script's time")
    ap.add_argument("--skip-fp32", action="store_true", help="no fp32 training (no speed ratio)")
    ap.add_argument("--skip-ddp", action="store_true", help="no torchrun part")
    ap.add_argument("--onnx", action="store_true", help="also export and check ONNX (on CPU)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every training")
    ap.add_argument("--dry-run-cpu", action="store_true", help="run the parts on CPU, tiny, to test the script")
    return ap


def with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    tiny = args.dry_run_cpu
    for name, gpu, cpu in (("iterations", 300, 2), ("cases", 3, 1), ("ddp_iterations", 40, 2),
                           ("ddp_nproc", torch.cuda.device_count() or 1, 2)):
        if getattr(args, name) is None:
            setattr(args, name, cpu if tiny else gpu)
    return args


def run(check: Check) -> int:
    args = check.args
    check.say(f"{check.report['machine']['device']}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
              f"out {check.out}, budget {args.budget_minutes} min")
    amp_minutes = min(args.train_minutes, 0.35 * check.left() / 60.0)
    check.part("train_amp", "1 training, AMP", lambda: part_train(check, "train_amp", True, amp_minutes))
    check.part("inference", "2 inference", lambda: part_inference(check))
    check.part("export", "3 export", lambda: part_export(check))
    check.part("ddp", "4 DDP (torchrun)", lambda: skipped("--skip-ddp") if args.skip_ddp else part_ddp(check))
    minutes = None if args.skip_fp32 else fp32_minutes(check)
    check.part("train_fp32", "5 training, fp32",
               lambda: skipped("--skip-fp32" if args.skip_fp32 else "not enough time left") if minutes is None
               else part_train(check, "train_fp32", False, minutes))
    check.save()
    print("\n" + markdown(summary_rows(check.report)), flush=True)
    failed = [k for k, r in check.report["parts"].items() if r["status"] == "failed"]
    check.say(f"done in {time.perf_counter() - check.t0:.0f} s; report {check.out / REPORT}"
              + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.dry_run_cpu and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return EXIT_NO_CUDA
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(Check(with_defaults(args)))


if __name__ == "__main__":
    sys.exit(main())
