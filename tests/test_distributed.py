"""Distributed data-parallel training: 2 CPU processes with Gloo, launched by torchrun
(``python -m torch.distributed.run --standalone``, which picks a free port) on tests/ddp_worker.py."""
from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from seg import distributed as distr
from helpers import write_case

HERE = Path(__file__).resolve().parent
WORKER = HERE / "ddp_worker.py"


def torchrun(*args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "--max-restarts=0", str(WORKER), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE.parent)
    return proc, time.monotonic() - t0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp") / "ds"
    rng = np.random.default_rng(0)
    for i in range(4):  # val_fraction 0.5 in the worker: 2 training and 2 validation cases
        write_case(root, f"case{i}", rng, shape=(10, 34, 34))  # 10 slices of 34 x 34
    return root


def test_shards_and_seeds() -> None:
    cases = list(range(7))
    shards = [distr.train_shard(cases, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert distr.train_shard([0, 1], 1, 3) == [0, 1]  # fewer cases than ranks: all, own seed
    assert distr.shard(range(2), 2, 3) == []          # validation: a rank may get no case
    assert distr.rank_seed(123, 0) == 123 and len({distr.rank_seed(123, r) for r in range(8)}) == 8
    ctx = distr.DistContext()  # one process: collectives are no-ops
    assert ctx.all_gather_object(5) == [5] and ctx.mean({"a": 1.5}) == {"a": 1.5} and not ctx.any(False)
    with pytest.raises(ValueError, match="boom"), ctx.guard("x"):
        raise ValueError("boom")


def test_sync_batchnorm_switch() -> None:
    from seg.errors import ConfigError

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.Conv3d(4, 4, 1), torch.nn.BatchNorm3d(4)))
    assert distr.convert_sync_batchnorm(model, distr.DistContext()) is model  # one process: no-op
    with pytest.raises(ConfigError, match="CUDA"):  # PyTorch's SyncBatchNorm is GPU-only
        distr.convert_sync_batchnorm(model, distr.DistContext(world_size=2))
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # what it does on GPUs
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert list(synced.state_dict()) == keys  # checkpoints load into the BatchNorm model
    assert [id(p) for p in synced.parameters()] == params  # the optimiser stays valid


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def resumed(data: Path, tmp_path_factory) -> Path:
    """One process trains 2 of 4 iterations; torchrun with 2 processes first runs the step check
    (ddp_worker.step_check), then resumes the run from its checkpoint to iteration 4."""
    from ddp_worker import tiny
    from seg.train import train

    out = tmp_path_factory.mktemp("resumed")
    run = out / "run"
    train(tiny(str(data), str(run), 4), progress=False, stop_after=2)
    torch.save(torch.load(run / "last.pt", weights_only=True)["model"], out / "one_process.pt")
    proc, _ = torchrun("train", str(out), str(data), "4", str(run / "last.pt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[validation @ 4]" in proc.stdout + proc.stderr
    return out


def test_one_step_on_two_processes_equals_one_process_on_the_whole_batch(resumed: Path) -> None:
    r = json.loads((resumed / "step.json").read_text())
    assert r["step_size"] > 1e-4  # the step moved the weights: the comparison means something
    assert r["same_grads_none"]
    assert r["max_grad_diff"] < 1e-5 * r["max_grad"], r
    assert r["max_param_diff"] < 1e-5, (r["max_param_diff_at"], r["max_param_diff"])
    assert math.isclose(r["losses"][0], r["ref_loss"], rel_tol=1e-5)
    assert all(math.isfinite(v) for v in r["losses"]) and r["losses"][-1] < r["losses"][0], r["losses"]
    assert r["rank_weight_diff"] == 0.0


def test_two_processes_resume_a_one_process_run(data: Path, resumed: Path) -> None:
    from ddp_worker import tiny
    from seg.checkpoint import load_for_inference
    from seg.train import planned_run, prepare_data, validate

    run = resumed / "run"
    rank0, rank1 = torch.load(resumed / "rank0.pt"), torch.load(resumed / "rank1.pt")
    before = torch.load(resumed / "one_process.pt")
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["iteration"] == 4
    for k in rank0:  # both ranks hold the same weights, and rank 0 wrote them unwrapped
        assert torch.equal(rank0[k], rank1[k]), k
        assert torch.equal(rank0[k], last["model"][k]), k
    assert any(not torch.equal(last["model"][k], before[k]) for k in rank0)  # it trained on

    rows = read_csv(run / "train_log.csv")
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]  # one header, rank 0 only
    assert all(math.isfinite(float(r["total"])) for r in rows)
    val = read_csv(run / "val_log.csv")
    assert [int(r["iteration"]) for r in val] == [2, 4]

    # rank 0 reported what one process validating every case gets with the same weights
    spec, cases = planned_run(tiny(str(data), str(run), 4))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process (OMP_NUM_THREADS=1)
    try:
        single = validate(load_for_inference(run / "last.pt").model, prepare_data(spec.config, cases=cases), spec,
                          torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    for k, v in single.items():
        assert float(val[-1][k]) == pytest.approx(v, abs=1e-9, nan_ok=True), k


def launch_without_agent(*args: str, timeout: float = 300) -> tuple[list[int], list[str], float]:
    """Start the 2 ranks as plain processes (torchrun's environment variables, no torchrun agent
    to kill the survivors): what stops them is the job's own failure propagation."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(WORKER), *args], cwd=HERE.parent, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1",
                                       RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    try:
        outputs = [p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], outputs, time.monotonic() - t0


def test_a_failing_rank_stops_the_job(data: Path, tmp_path: Path) -> None:
    # the collective timeout is 10 minutes (ddp_worker.tiny) and no agent kills the other rank:
    # both ending within the 300 s limit means the failure was propagated, not waited out
    codes, outputs, seconds = launch_without_agent("fail", str(tmp_path), str(data), "4")
    assert codes[0] != 0 and codes[1] != 0, outputs
    assert "ValueError: injected failure on rank 1" in outputs[1]
    assert "RankFailure: stopping: iteration 2 failed on 1 of 2 processes" in outputs[0], outputs[0]
    assert "injected failure on rank 1" in outputs[0]  # rank 0 says which rank failed, and why
    assert not (tmp_path / "rank0.pt").exists() and not (tmp_path / "rank1.pt").exists()
    assert seconds < 300
