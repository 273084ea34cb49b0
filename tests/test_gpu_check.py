"""``benchmarks/gpu_check.py``, the prepared check for a lent GPU: the no-CUDA exit, the figures read
from a run's logs, a failing part reported while the next one runs, the table; a tiny ``--dry-run-cpu``
run of every part but DDP on synthetic cases (the logic the GPU run takes); and, with CUDA, the check
itself on the same tiny cases.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import gpu_check as gc
from helpers import tiny_sets, write_case

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> list[str]:
    """``--set`` items of four synthetic 3D cases (3 training, 1 validation) and a small model."""
    root = tmp_path_factory.mktemp("gpu_check_data")
    rng = np.random.default_rng(5)
    for i in range(4):
        write_case(root, f"case{i}", rng)
    own = ("train.iterations", "train.val_every", "train.output_dir")  # gpu_check sets these
    return [s for s in tiny_sets(root, root / "unused", 3) if not s.startswith(own)]


def parse(*argv: str):
    return gc.with_defaults(gc.build_parser().parse_args(list(argv)))


# ------------------------------------------------------------------------------------------ no CUDA
def test_without_cuda_main_exits_2_with_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main(["--out", str(tmp_path / "out")]) == gc.EXIT_NO_CUDA == 2
    err = capsys.readouterr().err
    assert err.strip() == gc.NO_CUDA and err.count("\n") == 1
    assert "CUDA GPU" in err and "--dry-run-cpu" in err
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run")
def test_without_cuda_script_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [gc.NO_CUDA]
    assert proc.stdout == ""


# ------------------------------------------------------------------------------------------ pieces
def write_logs(run: Path, seconds: list[float], dice: float | None = 0.5) -> None:
    run.mkdir(parents=True)
    rows = ["iteration,total,coarse_ce,coarse_dice,point,lr,seconds"]
    rows += [f"{i + 1},{2.0 - i / 100},1,1,0.1,0.001,{s}" for i, s in enumerate(seconds)]
    (run / "train_log.csv").write_text("\n".join(rows) + "\n")
    if dice is not None:
        (run / "val_log.csv").write_text(f"iteration,dice/a,dice/mean\n{len(seconds)},0.4,0.3\n"
                                         f"{len(seconds)},0.6,{dice}\n")


def test_run_figures_from_the_logs(tmp_path):
    # 20 steps: the first takes 2 s (warm-up), then 0.5 s each
    write_logs(tmp_path / "run", [2.0 + 0.5 * i for i in range(20)], dice=0.75)
    fig = gc.run_figures(tmp_path / "run")
    assert fig["iterations"] == 20 and fig["loop_s"] == 11.5
    assert fig["steps_per_s"] == round(20 / 11.5, 3)
    assert fig["steps_per_s_after_warmup"] == 2.0  # the 18 steps after the first tenth (2 rows)
    assert fig["final_dice"] == 0.75 and fig["final_loss"] == 1.81


def test_run_figures_one_step_without_validation(tmp_path):
    write_logs(tmp_path / "run", [1.25], dice=None)
    fig = gc.run_figures(tmp_path / "run")
    assert fig["steps_per_s"] == 0.8 and fig["steps_per_s_after_warmup"] is None
    assert fig["final_dice"] is None


def test_a_failing_part_is_reported_and_the_next_runs(tmp_path, capsys):
    check = gc.Check(parse("--dry-run-cpu", "--out", str(tmp_path)))

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access\nsecond line")

    check.part("one", "1 broken", broken)
    check.part("two", "2 fine", lambda: {"figure": 1.5})
    check.part("three", "3 skipped", lambda: gc.skipped("not enough time left"))
    report = json.loads((tmp_path / gc.REPORT).read_text())
    assert report["parts"]["one"]["status"] == "failed"
    assert report["parts"]["one"]["error"] == "RuntimeError: CUDA error: an illegal memory access second line"
    assert report["parts"]["two"]["status"] == "ok" and report["parts"]["two"]["figure"] == 1.5
    assert report["parts"]["three"] == {"status": "skipped", "reason": "not enough time left",
                                        "wall_s": report["parts"]["three"]["wall_s"]}
    out = capsys.readouterr()
    assert "Traceback" in out.err and "1 broken: failed (RuntimeError" in out.out
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


def test_summary_table_and_speed_ratio():
    report = {"machine": {"device": "NVIDIA H200", "torch": "2.x"}, "elapsed_s": 12.0,
              "parts": {"train_amp": {"status": "ok", "steps_per_s_after_warmup": 6.0, "checkpoint": "x"},
                        "train_fp32": {"status": "ok", "steps_per_s_after_warmup": 4.0},
                        "export": {"status": "failed", "error": "a | b", "diffs": {"1": 0.5}}}}
    rows = gc.summary_rows(report)
    assert ("train", "amp / fp32 speed ratio (after warm-up)", 1.5) in rows
    assert all(k != "checkpoint" for _, k, _ in rows)
    table = gc.markdown(rows).splitlines()
    assert table[:2] == ["| part | figure | value |", "|---|---|---|"]
    assert "| export | error | a \\| b |" in table and '| export | diffs | {"1": 0.5} |' in table
    assert "| machine | device | NVIDIA H200 |" in table and table[-1] == "| total | elapsed_s | 12 |"


def test_defaults_tiny_on_cpu_full_on_gpu():
    dry, gpu = parse("--dry-run-cpu"), parse()
    assert (dry.iterations, dry.cases, dry.ddp_iterations, dry.ddp_nproc) == (2, 1, 2, 2)
    assert (gpu.iterations, gpu.cases, gpu.ddp_iterations) == (300, 3, 40)
    assert gpu.ddp_nproc == max(1, torch.cuda.device_count())
    assert parse("--iterations", "7").iterations == 7


def test_training_sets_put_the_runs_own_fields_last(tmp_path):
    check = gc.Check(parse("--dry-run-cpu", "--out", str(tmp_path), "--set", "train.iterations=99",
                           "data.num_workers=2"))
    sets = gc.train_sets(check, tmp_path / "r", 5, True, 1.5)
    assert sets[:2] == ["train.iterations=99", "data.num_workers=2"]
    assert sets[2:] == ["train.iterations=5", "train.val_every=5", "train.device=cpu", "train.amp=True",
                        f"train.output_dir='{tmp_path / 'r'}'", "train.max_minutes=1.50"]


def test_heartbeat_prints_the_last_logged_step(tmp_path, capsys):
    write_logs(tmp_path / "run", [0.5, 1.0, 1.5], dice=None)
    check = gc.Check(parse("--dry-run-cpu", "--out", str(tmp_path)))
    with gc.heartbeat(check, tmp_path / "run" / "train_log.csv", total=10, every=0.05):
        time.sleep(0.3)
    assert "run: step 3/10, loss 1.980, 1.5 s in the loop" in capsys.readouterr().out


def test_a_subprocess_past_its_timeout_is_stopped(tmp_path):
    start = time.perf_counter()
    rc = gc.torchrun([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                     tmp_path / "log.txt", timeout=3)
    assert rc is None and time.perf_counter() - start < 20
    assert "started" in (tmp_path / "log.txt").read_text()


def test_time_left_decides_the_fp32_run_and_ddp(tmp_path):
    check = gc.Check(parse("--dry-run-cpu", "--out", str(tmp_path)))
    check.report["parts"]["train_amp"] = {"wall_s_train": 100.0}
    assert gc.fp32_minutes(check) == 2.5  # --train-minutes caps it
    check.deadline = time.perf_counter() + 150
    assert 1.5 < gc.fp32_minutes(check) < 1.7  # (150 s - 20 s for the summary - 30 s) / 60
    check.deadline = time.perf_counter() + 60
    assert gc.fp32_minutes(check) is None
    ddp = gc.part_ddp(check)
    assert ddp["status"] == "skipped" and ddp["reason"].endswith("s left of the budget")

# ------------------------------------------------------------------------------------- whole runs
def test_dry_run_cpu_every_part_but_ddp(tiny_data, tmp_path):
    """The parts the GPU run takes, on CPU with two steps (about 15 s on 2 cores)."""
    out = tmp_path / "check"
    assert gc.main(["--dry-run-cpu", "--skip-ddp", "--out", str(out), "--set", *tiny_data]) == 0
    parts = json.loads((out / gc.REPORT).read_text())["parts"]
    assert {k: p["status"] for k, p in parts.items()} == {
        "train_amp": "ok", "inference": "ok", "export": "ok", "ddp": "skipped", "train_fp32": "ok"}
    amp = parts["train_amp"]
    assert amp["iterations"] == 2 and amp["steps_per_s"] > 0 and 0 <= amp["final_dice"] <= 1
    assert amp["precision"].startswith("float32 (train.amp=True on cpu") and amp["first_conv_dtype"] == "float32"
    assert amp["peak_cuda_gib"] is None
    inf = parts["inference"]
    assert len(inf["cases"]) == 1 and inf["max_abs_logit_diff"] == 0 and inf["label_differ_fraction"] == 0
    assert parts["export"]["device_ok"] and max(parts["export"]["device_max_abs_diff"].values()) <= 1e-4
    for name in ("train_amp", "train_fp32"):
        assert (out / name / "last.pt").is_file() and (out / name / "val_log.csv").is_file()
    assert (out / "export" / "export.json").is_file()


@NEEDS_CUDA
def test_gpu_check_on_cuda(tiny_data, tmp_path):
    """The check itself on the tiny cases: AMP in float16 autocast, CUDA and CPU agree, the export runs
    on CUDA, torchrun trains."""
    out = tmp_path / "check"
    rc = gc.main(["--iterations", "4", "--ddp-iterations", "2", "--cases", "1", "--out", str(out),
                  "--set", *tiny_data])
    parts = json.loads((out / gc.REPORT).read_text())["parts"]
    assert rc == 0, {k: p.get("error") for k, p in parts.items()}
    amp, fp32 = parts["train_amp"], parts["train_fp32"]
    assert amp["precision"].startswith("autocast") and amp["first_conv_dtype"] in ("float16", "bfloat16")
    assert amp["peak_cuda_gib"] > 0 and fp32["first_conv_dtype"] == "float32"
    assert parts["inference"]["label_differ_fraction"] < 0.01
    assert parts["export"]["device_ok"]
    assert parts["ddp"]["returncode"] == 0 and parts["ddp"]["iterations"] == 2
    if torch.cuda.device_count() == 1:
        assert parts["ddp"]["nccl_all_reduce"] == "ok"

