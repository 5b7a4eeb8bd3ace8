"""Distributed, resumable inversion through the real CLI (subprocesses, gloo on the CPU)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

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


@pytest.mark.slow(seconds=25)
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
    # Each item is seeded on its own, so two processes give the rows one process gives, bit for bit.
    order_two, order_one = rows_two["item"].argsort(stable=True), rows_one["item"].argsort(stable=True)
    assert torch.equal(rows_two["pixel_values"][order_two], rows_one["pixel_values"][order_one])
    assert not torch.equal(rows_two["pixel_values"][0], rows_two["pixel_values"][1])
    assert not (tmp_path / "two" / "shards").exists() and (tmp_path / "two" / "README.md").is_file()


@pytest.mark.slow(seconds=20)
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
    before = {int(name[5:11]): load_file(str(out / "shards" / name))["images"] for name in finished}
    resumed = _cli(*args)
    assert f"resuming: {len(finished)} of 6 work items already done" in resumed.stderr  # logged, not redone
    rows = _rows(out)
    assert rows["label"].tolist() == [i % 10 for i in range(18)]
    assert sorted(set(rows["item"].tolist())) == list(range(6))
    for item, images in before.items():  # the finished shards' rows, unchanged
        assert torch.equal(rows["pixel_values"][rows["item"] == item], images)
    assert not (out / "shards").exists()  # no leftovers once the dataset is assembled
    again = _cli(*args)  # a finished run is a no-op
    assert "18 inverted images" in again.stdout and "nothing to do" in again.stderr
    assert not (out / "shards").exists()


@pytest.mark.slow(seconds=15)
def test_foreign_and_mismatched_directories_are_refused(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = _cli(*INVERT, "--num-images", "3", "--out", str(foreign), check=False)
    assert result.returncode != 0 and "not written by `smi invert`" in result.stderr
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1

    run = tmp_path / "run"
    _cli(*INVERT, "--num-images", "3", "--out", str(run))
    # A finished run is a Hub-style dataset: an image column the viewer shows, a card, no shards left.
    saved = datasets.load_from_disk(str(run))
    assert isinstance(saved.features["image"], datasets.Image) and saved[0]["image"].size == (32, 32)
    card = (run / "README.md").read_text()
    assert card.startswith("---\n") and "teacher: digits-vit" in card and "kept_fraction:" in card
    assert not (run / "shards").exists() and load_inverted(run).to_batch().images.shape == (3, 3, 32, 32)
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
