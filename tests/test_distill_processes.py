"""Data parallelism that is real: KD under ``accelerate launch`` with two CPU processes (gloo)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smi_plugin import load_teacher

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
LAUNCH = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2"]
# smi distill with the settings of kd_rank_worker.py (the Python one-call form)
DISTILL = ["-m", "smi_plugin.cli", "distill", "--teacher", "digits-vit", "--mode", "full", "--steps", "6",
           "--num-images", "16", "--checkpoint-every", "2", "--eval-every", "1000", "--iterations", "6", "--seed", "3",
           "--eval-images", "20"]


def _run(command, **kwargs):
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The worker's run on two processes: per step, each rank's batch and weights."""
    out = tmp_path_factory.mktemp("two")
    _run([*LAUNCH, str(HERE / "kd_rank_worker.py"), str(out)])
    return out, [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow(seconds=30)
def test_ranks_train_on_their_own_batches_and_hold_one_student(two_processes):
    _, (rank0, rank1) = two_processes
    assert rank0["processes"] == rank1["processes"] == 2 and len(rank0["steps"]) == len(rank1["steps"]) == 6
    for step0, step1 in zip(rank0["steps"], rank1["steps"]):
        assert step0["batch"] != step1["batch"]  # each process inverts and samples its own data
        assert step0["weights"] == step1["weights"]  # gradients are averaged: one student after every step
    assert len({step["weights"] for step in rank0["steps"]}) == 6  # and it does learn
    # each process's online pool is its own (one slot of 16, renewed once in 6 steps): counted over both
    assert rank0["seen"] == rank1["seen"] == 2 * 16 and rank0["inverted"] == rank1["inverted"] == 2 * 2 * 16


@pytest.mark.slow(seconds=60)
def test_a_killed_two_process_run_resumes_to_the_python_calls_student(two_processes, tmp_path):
    reference, _ = two_processes
    out = tmp_path / "run"
    command = [*LAUNCH, *DISTILL, "--out", str(out), "--json", str(tmp_path / "kd.json")]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    meta, deadline = out / "checkpoint" / "trainer.json", time.time() + 300
    while not meta.is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert json.loads(meta.read_text())["step"] < 6  # killed part-way
    _run(command)  # the same command resumes
    report = json.loads((tmp_path / "kd.json").read_text())
    assert report["processes"] == 2 and report["steps"] == 6 and report["inverted_images"] == 2 * 2 * 16
    assert [step for step, _ in report["kd_loss"]] == list(range(1, 7))
    # smi distill and the Python one-call form give the same student for the same seed, killed or not
    expected = load_file(reference / "student.safetensors")
    resumed = load_teacher(str(out)).state_dict()
    assert all(torch.allclose(resumed[name], value, atol=1e-6) for name, value in expected.items())
