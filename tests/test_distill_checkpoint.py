"""Checkpoints without pickle: plain tensors and JSON, every file carrying its step, foreign files refused."""

import json

import pytest
import torch

from smi_plugin.distill.checkpoint import Checkpoint, CheckpointMismatchError, settings_differences


def test_a_checkpoint_is_plain_state_and_keeps_only_its_last_step(tmp_path):
    checkpoint = Checkpoint(tmp_path, rank=1)
    for step in (2, 4):
        checkpoint.write_source(step, {"pool": {"images": torch.full((2, 3), float(step))}, "rounds": step})
        checkpoint.write_trainer({"step": step, "history": {"kd_loss": [[step, 0.5]]}},
                                 {"student": {"w": torch.ones(2) * step}, "optimizer": None})
    assert json.loads((checkpoint.folder / "trainer.json").read_text())["step"] == 4
    assert sorted(p.name for p in checkpoint.folder.iterdir()) == ["source-rank1-step4.pt", "trainer-step4.pt",
                                                                  "trainer.json"]
    assert checkpoint.read_meta()["history"] == {"kd_loss": [[4, 0.5]]}
    assert torch.equal(checkpoint.read_trainer(4, "cpu")["student"]["w"], torch.full((2,), 4.0))
    assert checkpoint.read_source(4, "cpu")["rounds"] == 4
    assert Checkpoint(tmp_path / "empty").read_meta() is None


def test_a_pickle_or_another_format_is_refused_before_it_is_read(tmp_path):
    class Payload:
        def __reduce__(self):  # what a pickle from a folder could run
            return (print, ("ran code from a checkpoint",))

    torch.save({"state": Payload()}, tmp_path / "checkpoint.pt")  # an earlier version's form
    with pytest.raises(CheckpointMismatchError, match="earlier version as a pickle"):
        Checkpoint(tmp_path).read_meta()
    checkpoint = Checkpoint(tmp_path / "other")
    checkpoint.folder.mkdir(parents=True)
    (checkpoint.folder / "trainer.json").write_text(json.dumps({"format": "something-else/9", "step": 1}))
    with pytest.raises(CheckpointMismatchError, match="not a checkpoint of this version"):
        checkpoint.read_meta()
    torch.save({"state": Payload()}, checkpoint.folder / "trainer-step1.pt")
    with pytest.raises(Exception, match="Weights only load failed"):  # the safe loader runs nothing
        checkpoint.read_trainer(1, "cpu")


def test_settings_differences_name_each_changed_field():
    saved = {"DistillConfig": {"lr": 0.1, "steps": 5}, "InversionConfig": None, "processes": 1}
    now = {"DistillConfig": {"lr": 0.2, "steps": 5}, "InversionConfig": None, "processes": 2}
    assert settings_differences(saved, now) == ["DistillConfig.lr 0.1 -> 0.2", "processes 1 -> 2"]
    assert settings_differences(saved, saved) == []
