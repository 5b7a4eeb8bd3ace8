"""Distributed, resumable inversion through the real CLI (subprocesses, gloo on the CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch

from smi_plugin.distributed import OutputDirectoryError, ShardDirectory, WorkItem, plan_work
from smi_plugin.export import NotAnInvertedDatasetError, load_inverted

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
INVERT = ["invert", "--teacher", "digits-vit", "--iterations", "6", "--batch-size", "3", "--seed", "5", "--quiet"]


def _cli(*args, launcher=(sys.executable, "-m", "smi_plugin.cli"), check=True):
    result = subprocess.run([*launcher, *args], env=ENV, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    return result


def _rows(path):
    return datasets.load_from_disk(str(path)).with_format("torch")[:]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    accelerate = (str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
                  "-m", "smi_plugin.cli")
    two = _cli(*INVERT, "--num-images", "10", "--out", str(tmp_path / "two"), launcher=accelerate)
    assert "2 process(es)" in two.stdout
    _cli(*INVERT, "--num-images", "10", "--out", str(tmp_path / "one"))
    rows_two, rows_one = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert len(rows_two["label"]) == 10 and rows_two["label"].tolist() == [i % 10 for i in range(10)]
    items = set(zip(rows_two["seed"].tolist(), rows_two["label"].tolist()))
    assert items == set(zip(rows_one["seed"].tolist(), rows_one["label"].tolist())) and len(items) == 10
    assert len(set(rows_two["item"].tolist())) == 4  # ceil(10 / 3) work items, none duplicated
    # Rows load back bit-identical to the shards each process wrote.
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    shards = ShardDirectory(tmp_path / "two", {k: v for k, v in manifest.items() if k != "versions"})
    plan = plan_work(manifest["labels"], 3, manifest["seed"])
    written = torch.cat([shards.read(item).images for item in plan])
    assert torch.equal(rows_two["pixel_values"], written)
    assert not torch.equal(written[0], written[1])


@pytest.mark.slow
def test_killed_run_resumes_without_loss_or_duplicates(tmp_path):
    out = tmp_path / "run"
    args = [*INVERT, "--iterations", "40", "--num-images", "18", "--out", str(out)]
    process = subprocess.Popen([sys.executable, "-m", "smi_plugin.cli", *args], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / "shards").glob("item-*.safetensors")) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = sorted(p.name for p in (out / "shards").glob("item-*.safetensors"))
    assert 1 <= len(finished) < 6 and not (out / "state.json").exists()
    (out / "shards" / ".item-000005.safetensors.abc.tmp").write_bytes(b"partial")  # a write cut short
    before = {name: (out / "shards" / name).read_bytes() for name in finished}
    _cli(*args)
    rows = _rows(out)
    assert rows["label"].tolist() == [i % 10 for i in range(18)]
    assert sorted(set(rows["item"].tolist())) == list(range(6))
    assert all((out / "shards" / name).read_bytes() == data for name, data in before.items())  # not redone
    assert not list((out / "shards").glob(".*.tmp"))
    again = _cli(*args)  # a finished run is a no-op
    assert "18 inverted images" in again.stdout


def test_foreign_and_mismatched_directories_are_refused(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = _cli(*INVERT, "--num-images", "3", "--out", str(foreign), check=False)
    assert result.returncode != 0 and "not written by `smi invert`" in result.stderr
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1

    run = tmp_path / "run"
    _cli(*INVERT, "--num-images", "3", "--out", str(run))
    other = _cli(*INVERT, "--num-images", "3", "--out", str(run), "--lr", "0.1", check=False)
    assert other.returncode != 0 and "different run" in other.stderr and "config" in other.stderr


def test_corrupted_shard_is_reported_not_overwritten(tmp_path):
    manifest = {"mean": [0.5] * 3, "std": [0.25] * 3}
    shards = ShardDirectory(tmp_path, manifest)
    shards.shard_dir.mkdir(parents=True)
    item = WorkItem(0, (1, 2), 7)
    shards.shard_path(item).write_bytes(b"not a safetensors file")
    with pytest.raises(OutputDirectoryError, match="corrupted.*delete it"):
        shards.is_done(item)
    assert shards.shard_path(item).read_bytes() == b"not a safetensors file"


def test_plan_is_independent_of_process_count():
    plan = plan_work(list(range(7)), 3, seed=1)
    assert [item.labels for item in plan] == [(0, 1, 2), (3, 4, 5), (6,)]
    assert len({item.seed for item in plan}) == 3 and plan == plan_work(list(range(7)), 3, seed=1)
    assert plan_work(list(range(7)), 3, seed=2)[0].seed != plan[0].seed


def test_input_that_is_not_an_inverted_dataset_is_refused(tmp_path):
    with pytest.raises(NotAnInvertedDatasetError, match="no saved dataset"):
        load_inverted(tmp_path)
    plain = datasets.Dataset.from_dict({"x": [1, 2]})
    with pytest.raises(NotAnInvertedDatasetError, match="not written by smi-plugin"):
        load_inverted(plain)
