"""Resumable KD checkpoints without pickle.

A checkpoint is a folder ``OUT/checkpoint/``:

* ``trainer.json``: the step it holds, the seconds trained, the number of processes, the history and the
  settings (``DistillConfig`` and the inverter's ``InversionConfig``), written last: it names the step;
* ``trainer-step{N}.pt``: the student's weights, the optimizer's state and the least-squares head's sums;
* ``source-rank{R}-step{N}.pt``: each process's data source (its pool of inverted samples with their
  inversion states, Adam moments and generator states).

The ``.pt`` files hold only tensors, numbers, strings, lists and dicts, read with
``torch.load(weights_only=True)``, which refuses anything else: a checkpoint never runs code. Every file is
written atomically and carries its step, so a run killed while writing resumes from the last complete one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_path, atomic_write_text

FORMAT = "smi-plugin-kd-checkpoint/1"
LEGACY_CHECKPOINT = "checkpoint.pt"  # the pickled form of earlier versions


class CheckpointMismatchError(ValueError):
    """An output directory's checkpoint was written by a run with other settings, so it cannot be resumed."""


@dataclass
class Checkpoint:
    """The files of ``directory/checkpoint``; a run with ``rank`` of ``processes`` reads and writes its share."""

    directory: Path
    rank: int = 0

    @property
    def folder(self) -> Path:
        return self.directory / "checkpoint"

    def _trainer_file(self, step: int) -> Path:
        return self.folder / f"trainer-step{step}.pt"

    def _source_file(self, step: int, rank: int | None = None) -> Path:
        return self.folder / f"source-rank{self.rank if rank is None else rank}-step{step}.pt"

    def read_meta(self) -> dict[str, Any] | None:
        """``trainer.json``, or None when there is no checkpoint; an earlier version's pickle is refused."""
        legacy = self.directory / LEGACY_CHECKPOINT
        if legacy.is_file() and not (self.folder / "trainer.json").is_file():
            raise CheckpointMismatchError(
                f"{legacy} was written by an earlier version as a pickle, which this version does not load (it "
                "could run code): delete it to start again, or choose another output directory")
        path = self.folder / "trainer.json"
        if not path.is_file():
            return None
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT:
            raise CheckpointMismatchError(f"{path} is not a checkpoint of this version ({FORMAT}): delete the "
                                          "folder to start again, or choose another output directory")
        return meta

    def write_source(self, step: int, state: dict[str, Any]) -> None:
        """This process's source state at ``step`` (every process writes its own, before ``write_trainer``)."""
        with atomic_path(self._source_file(step)) as tmp:
            torch.save(state, tmp)

    def write_trainer(self, meta: dict[str, Any], tensors: dict[str, Any]) -> None:
        """The shared state at ``meta["step"]`` (main process, after every source file of that step), then the
        files of earlier steps are removed."""
        step = meta["step"]
        with atomic_path(self._trainer_file(step)) as tmp:
            torch.save(tensors, tmp)
        atomic_write_text(self.folder / "trainer.json", json.dumps({"format": FORMAT, **meta}) + "\n")
        for path in self.folder.glob("*-step*.pt"):
            if not path.name.endswith(f"-step{step}.pt"):
                path.unlink(missing_ok=True)

    def read_trainer(self, step: int, map_location: torch.device | str) -> dict[str, Any]:
        return _load(self._trainer_file(step), map_location)

    def read_source(self, step: int, map_location: torch.device | str) -> dict[str, Any]:
        return _load(self._source_file(step), map_location)


def _load(path: Path, map_location: torch.device | str) -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


def settings_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"Name.field saved -> now"`` for every setting that differs between two ``{name: settings}`` maps."""
    differences = []
    for name in saved.keys() | now.keys():
        old, new = saved.get(name) or {}, now.get(name) or {}
        if not isinstance(old, dict) or not isinstance(new, dict):
            if old != new:
                differences.append(f"{name} {old!r} -> {new!r}")
            continue
        differences += [f"{name}.{field} {old.get(field)!r} -> {new.get(field)!r}"
                        for field in sorted(old.keys() | new.keys()) if old.get(field) != new.get(field)]
    return sorted(differences)


def mismatch_error(folder: os.PathLike, differences: list[str]) -> CheckpointMismatchError:
    return CheckpointMismatchError(
        f"{folder} holds a run with other settings ({'; '.join(differences)}): give the settings it was written "
        "with to resume it, or another output directory")
