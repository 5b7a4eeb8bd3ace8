"""Distributed, resumable inversion into a directory that is also a Hugging Face dataset.

The requested images are planned as work items (one inversion batch each, seeded from the run
seed and the item's index), so the output does not depend on how many processes share the work.
Each process takes every ``world``-th item (``accelerate``'s process index and count), writes each
finished batch atomically to ``DIR/shards/item-NNNNNN.safetensors`` and skips items already there,
so a killed run started again with the same command ends with exactly the requested images. When
all items are done the main process assembles ``DIR`` as a saved ``datasets.Dataset``
(``datasets.load_from_disk(DIR)``) with a dataset card ``DIR/README.md`` (YAML front matter: teacher,
normalization, class names, config, kept fraction) and ``DIR/manifest.json`` describing the run, then
removes ``DIR/shards``. Running the same command on a finished directory does nothing.

Example (any number of processes, CPUs or GPUs)::

    accelerate launch --num_processes 4 -m smi_plugin.cli invert --teacher fashion-mnist-vit \\
        --num-images 1024 --iterations 300 --schedule paper --seed 0 --out inverted/
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .config import InversionConfig
from .export import FORMAT, to_hf_dataset, write_dataset_card
from .inverter import SparseInverter, check_labels, derive_seed
from .batch import InvertedBatch
from .io import atomic_path, atomic_write_text

MANIFEST = "manifest.json"
SHARDS = "shards"
FINISHED = "state.json"  # written last by save_to_disk's files, so its presence means a complete dataset

logger = logging.getLogger(__name__)


class OutputDirectoryError(ValueError):
    """The output directory belongs to something else (another run, other files) or is corrupted."""


@dataclass(frozen=True)
class WorkItem:
    """One inversion batch of a run: its index, its labels and its seed."""

    index: int
    labels: tuple[int, ...]
    seed: int


def plan_work(labels: Sequence[int], batch_size: int, seed: int) -> list[WorkItem]:
    """Split ``labels`` into batches; item ``i`` is seeded with ``derive_seed(seed, i)``."""
    labels = [int(label) for label in labels]
    return [WorkItem(i, tuple(labels[start:start + batch_size]), derive_seed(seed, i))
            for i, start in enumerate(range(0, len(labels), batch_size))]


def _library_versions() -> dict[str, str]:
    import accelerate
    import datasets
    import timm

    try:
        version = importlib.metadata.version("smi-plugin")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        version = "unknown"
    return {"smi_plugin": version, "torch": torch.__version__, "timm": timm.__version__,
            "accelerate": accelerate.__version__, "datasets": datasets.__version__}


def run_manifest(teacher: str, config: InversionConfig, labels: Sequence[int], seed: int,
                 mean: Sequence[float], std: Sequence[float], class_names: Sequence[str], num_classes: int) -> dict:
    """What identifies a run; a resumed run must match it exactly (versions are informative only)."""
    return {"format": FORMAT, "teacher": teacher, "config": config.to_dict(), "labels": [int(x) for x in labels],
            "num_images": len(labels), "seed": int(seed), "mean": list(mean), "std": list(std),
            "class_names": list(class_names), "num_classes": int(num_classes)}


class ShardDirectory:
    """The on-disk state of one run: manifest plus one safetensors shard per finished work item."""

    def __init__(self, root: str | os.PathLike, manifest: dict[str, Any]) -> None:
        self.root, self.manifest = Path(root), manifest

    @property
    def shard_dir(self) -> Path:
        return self.root / SHARDS

    def shard_path(self, item: WorkItem) -> Path:
        return self.shard_dir / f"item-{item.index:06d}.safetensors"

    @property
    def finished(self) -> bool:
        """Whether the dataset of this run has been assembled (``state.json`` is moved in last)."""
        return (self.root / FINISHED).is_file() and (self.root / MANIFEST).is_file()

    def claim(self) -> None:
        """Create the directory for this run, or check that it already belongs to this run."""
        manifest_path = self.root / MANIFEST
        if manifest_path.is_file():
            try:
                existing = json.loads(manifest_path.read_text())
            except json.JSONDecodeError as err:
                raise OutputDirectoryError(f"{manifest_path} is corrupted ({err}); delete {self.root} or choose "
                                           "another --out") from err
            identity = {k: v for k, v in existing.items() if k != "versions"}
            if identity != self.manifest:
                differing = sorted(k for k in set(identity) | set(self.manifest)
                                   if identity.get(k) != self.manifest.get(k))
                raise OutputDirectoryError(
                    f"{self.root} holds a different run (differs in {differing}); resume it with the same "
                    "command, or choose another --out")
            if self.finished:
                return
        elif self.root.exists() and any(self.root.iterdir()):
            raise OutputDirectoryError(f"{self.root} is not empty and has no {MANIFEST}: it was not written by "
                                       "`smi invert`; refusing to write into it. Choose another --out")
        else:
            self.shard_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(manifest_path, json.dumps({**self.manifest, "versions": _library_versions()},
                                                        indent=2, sort_keys=True) + "\n")
        self.shard_dir.mkdir(exist_ok=True)
        for stale in self.shard_dir.glob(".item-*.tmp"):  # partial writes of a killed run
            stale.unlink(missing_ok=True)

    def is_done(self, item: WorkItem) -> bool:
        """Whether the item's shard exists (and is readable: a corrupted shard is an error)."""
        path = self.shard_path(item)
        if not path.is_file():
            return False
        self.read(item)
        return True

    def write(self, item: WorkItem, batch: InvertedBatch) -> None:
        from safetensors.torch import save_file

        tensors = {"images": batch.images.float().cpu().contiguous(),
                   "patch_mask": batch.patch_mask.to(torch.uint8).cpu().contiguous(),
                   "labels": batch.labels.cpu().contiguous(), "kept_indices": batch.kept_indices.cpu().contiguous()}
        metadata = {"item": str(item.index), "seed": str(item.seed),
                    "provenance": json.dumps(batch.provenance, default=str)}
        with atomic_path(self.shard_path(item)) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    def read(self, item: WorkItem) -> InvertedBatch:
        from safetensors import safe_open

        path = self.shard_path(item)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata()
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as err:
            raise OutputDirectoryError(f"shard {path} is corrupted ({err}); delete it and run the same command "
                                       "again to redo that batch") from err
        if metadata.get("item") != str(item.index) or tensors["labels"].tolist() != list(item.labels):
            raise OutputDirectoryError(f"shard {path} does not hold work item {item.index} of this run; "
                                       "delete it and run the same command again")
        return InvertedBatch(images=tensors["images"], patch_mask=tensors["patch_mask"].bool(),
                             labels=tensors["labels"], kept_indices=tensors["kept_indices"],
                             mean=tuple(self.manifest["mean"]), std=tuple(self.manifest["std"]),
                             provenance=json.loads(metadata["provenance"]))

    def assemble(self, items: Sequence[WorkItem]) -> Path:
        """Write the saved ``datasets.Dataset`` into the run directory (``state.json`` last)."""
        batches = [self.read(item) for item in items]
        dataset = to_hf_dataset(batches, self.manifest, items=[item.index for item in items])
        staging = self.root / ".dataset-staging"
        shutil.rmtree(staging, ignore_errors=True)
        dataset.save_to_disk(str(staging))
        write_dataset_card(staging, {**self.manifest, "versions": _library_versions()}, dataset)
        names = sorted(p.name for p in staging.iterdir())
        for name in [n for n in names if n != FINISHED] + [FINISHED]:
            os.replace(staging / name, self.root / name)
        shutil.rmtree(staging, ignore_errors=True)
        self.remove_shards()
        return self.root

    def remove_shards(self) -> None:
        """Drop the per-item shards once the dataset holds every row (they would double the disk use)."""
        shutil.rmtree(self.shard_dir, ignore_errors=True)


def distributed_state():
    """accelerate's ``PartialState``, on gloo when the machine has no accelerator.

    accelerate only builds a multi-CPU state when told ``cpu=True`` and launched by torchrun
    (``accelerate launch --multi_gpu``); its ``--cpu`` flag alone starts one process unless mpirun
    is configured. Passing ``cpu=True`` on accelerator-less machines makes both work.
    """
    from accelerate import PartialState

    has_accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) \
        or torch.backends.mps.is_available()
    return PartialState(cpu=not has_accelerator)


def invert_to_directory(model: nn.Module, config: InversionConfig, out_dir: str | os.PathLike,
                        labels: Sequence[int], seed: int | None = None, teacher: str | None = None,
                        class_names: Sequence[str] | None = None, progress: bool = True) -> Path:
    """Invert ``labels`` (one image each) across all processes of the current accelerate launch.

    Resumes a killed run in ``out_dir`` with the same arguments; refuses a directory holding
    anything else. Returns ``out_dir``, a saved dataset once every item is done.
    """
    state = distributed_state()
    seed = config.seed if seed is None else seed
    inverter = SparseInverter(model.to(state.device), config, progress=False)
    teacher = teacher or model.pretrained_cfg.get("zoo_name") or model.pretrained_cfg.get("architecture", "model")
    names = class_names or model.pretrained_cfg.get("label_names") or [str(i) for i in range(inverter.num_classes)]
    check_labels(list(labels), inverter.num_classes, inverter.device)
    manifest = run_manifest(teacher, config, labels, seed, inverter.mean, inverter.std, names, inverter.num_classes)
    shards = ShardDirectory(out_dir, manifest)
    if state.is_main_process:
        shards.claim()
    state.wait_for_everyone()
    if not state.is_main_process:
        shards.claim()  # validates only: the main process created the directory
    if shards.finished:
        if state.is_main_process:
            logger.info("%s already holds this finished run; nothing to do", out_dir)
            shards.remove_shards()  # a run killed between assembling and cleaning up
        state.wait_for_everyone()
        return Path(out_dir)
    items = plan_work(labels, config.batch_size, seed)
    mine = items[state.process_index::state.num_processes]
    bar = _progress(len(labels), state.is_main_process and progress)
    started, done_before = time.perf_counter(), _images_done(shards, items)
    if state.is_main_process:
        done_items = sum(shards.shard_path(item).is_file() for item in items)
        if done_items:
            logger.info("resuming: %d of %d work items already done", done_items, len(items))
    if bar is not None:
        bar.update(done_before)
    for item in mine:
        if shards.is_done(item):
            continue
        batch = inverter.invert(torch.tensor(item.labels, device=state.device), seed=item.seed)
        batch.provenance["item"] = item.index
        shards.write(item, batch)
        if bar is not None:
            done = _images_done(shards, items)
            bar.update(done - bar.n)
            bar.set_postfix(images_per_s=f"{(done - done_before) / (time.perf_counter() - started):.2f}")
    state.wait_for_everyone()
    if state.is_main_process:
        if bar is not None:
            bar.update(len(labels) - bar.n)
            bar.close()
        shards.assemble(items)
    state.wait_for_everyone()
    return Path(out_dir)


def _images_done(shards: ShardDirectory, items: Sequence[WorkItem]) -> int:
    return sum(len(item.labels) for item in items if shards.shard_path(item).is_file())


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="inverting (all processes)", unit="img")
