"""Inverted images as a Hugging Face ``datasets.Dataset``: lossless, self-describing, shareable.

Columns: ``pixel_values`` (float32 ``[0, 1]`` pixels, ``Array3D``: exact), ``preview`` (uint8
``Image()`` with stopped patches blacked out, for viewers), ``patch_mask`` (bool ``Array2D``),
``label`` (``ClassLabel`` with the teacher's class names), ``seed`` and ``item`` (the work item that
produced the row) and ``teacher``. ``info.description`` holds the run's manifest as JSON (config,
teacher, normalization, seed, library versions).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .batch import InvertedBatch
from .tokens import mask_to_indices

if TYPE_CHECKING:
    import datasets

FORMAT = "smi-plugin/inverted-images/v1"
REQUIRED_COLUMNS = ("pixel_values", "patch_mask", "label")


class NotAnInvertedDatasetError(ValueError):
    """The path or dataset was not written by smi-plugin."""


def inverted_features(image_shape: Sequence[int], grid_size: Sequence[int], class_names: Sequence[str]):
    import datasets

    return datasets.Features({
        "pixel_values": datasets.Array3D(shape=tuple(image_shape), dtype="float32"),
        "preview": datasets.Image(),
        "patch_mask": datasets.Array2D(shape=tuple(grid_size), dtype="bool"),
        "label": datasets.ClassLabel(names=list(class_names)),
        "seed": datasets.Value("int64"),
        "item": datasets.Value("int64"),
        "teacher": datasets.Value("string"),
    })


def to_hf_dataset(batches: Sequence[InvertedBatch], manifest: dict[str, Any],
                  items: Sequence[int] | None = None, class_names: Sequence[str] | None = None) -> "datasets.Dataset":
    """Rows from inverted batches (``items[i]`` is the work-item index of ``batches[i]``)."""
    import datasets

    if not batches:
        raise ValueError("no inverted batches to export")
    first = batches[0]
    num_classes = int(manifest.get("num_classes") or (max(int(b.labels.max()) for b in batches) + 1))
    names = list(class_names or manifest.get("class_names") or [str(i) for i in range(num_classes)])
    features = inverted_features(first.images.shape[1:], first.patch_mask.shape[1:], names)
    columns: dict[str, list] = {name: [] for name in features}
    for position, batch in enumerate(batches):
        previews = (batch.masked_images() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        for row in range(len(batch)):
            columns["pixel_values"].append(batch.images[row].float().cpu().numpy())
            columns["preview"].append(previews[row].cpu().numpy())
            columns["patch_mask"].append(batch.patch_mask[row].cpu().numpy())
            columns["label"].append(int(batch.labels[row]))
            columns["seed"].append(int(batch.provenance.get("seed", -1)))
            columns["item"].append(int(items[position]) if items is not None else position)
            columns["teacher"].append(str(batch.provenance.get("teacher", manifest.get("teacher", ""))))
    info = datasets.DatasetInfo(description=json.dumps(manifest, sort_keys=True), features=features)
    return datasets.Dataset.from_dict(columns, features=features, info=info)


class InvertedDataset:
    """A loaded inverted dataset with its manifest; feeds calibration and distillation directly."""

    def __init__(self, dataset: "datasets.Dataset") -> None:
        missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
        try:
            manifest = json.loads(dataset.info.description or "{}")
        except json.JSONDecodeError:
            manifest = {}
        if missing or manifest.get("format") != FORMAT:
            raise NotAnInvertedDatasetError(
                f"this dataset was not written by smi-plugin (missing columns {missing} or manifest format "
                f"{manifest.get('format')!r}); create one with `smi invert --out DIR`")
        self.dataset, self.manifest = dataset, manifest

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.manifest["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.manifest["std"])

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.features["label"].names)

    def tensors(self) -> dict[str, torch.Tensor]:
        """All rows as tensors: ``pixel_values`` in [0, 1], ``patch_mask``, ``label``, ``seed``, ``item``."""
        table = self.dataset.select_columns(["pixel_values", "patch_mask", "label", "seed", "item"]).with_format("torch")
        return dict(table[:])

    def to_batch(self) -> InvertedBatch:
        """All rows as one ``InvertedBatch`` (the manifest as its provenance)."""
        data = self.tensors()
        mask = data["patch_mask"].bool()
        counts = mask.flatten(1).sum(1)
        same = bool((counts == counts[0]).all()) if len(counts) else True
        kept = mask_to_indices(mask) if same else torch.zeros(len(counts), 0, dtype=torch.long)
        return InvertedBatch(images=data["pixel_values"].float(), patch_mask=mask, labels=data["label"].long(),
                             kept_indices=kept, mean=self.mean, std=self.std,
                             provenance={**self.manifest, "source": "sparse-inverted"})


def load_inverted(source: "str | os.PathLike | datasets.Dataset | InvertedDataset") -> InvertedDataset:
    """Open a dataset written by ``smi invert`` (a directory, or an already loaded dataset)."""
    import datasets

    if isinstance(source, InvertedDataset):
        return source
    if isinstance(source, datasets.Dataset):
        return InvertedDataset(source)
    path = Path(source)
    if not (path / "state.json").is_file() or not (path / "dataset_info.json").is_file():
        raise NotAnInvertedDatasetError(f"{path} holds no saved dataset (no state.json/dataset_info.json); "
                                        "pass the --out directory of a finished `smi invert` run")
    return InvertedDataset(datasets.load_from_disk(str(path)))


def push_to_hub(dataset: "datasets.Dataset", repo_id: str, private: bool = True, token: str | None = None) -> None:
    """``datasets``' own ``push_to_hub``, with a clear error when the Hub cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConnectionError(f"cannot push to {repo_id!r}: HF_HUB_OFFLINE=1 is set. Unset it on a machine with "
                              "network access, log in with `huggingface-cli login` (or pass a token), and push "
                              "again; the dataset is saved locally meanwhile")
    try:
        dataset.push_to_hub(repo_id, private=private, token=token)
    except Exception as err:  # the hub client raises many types (HTTP, connection, auth)
        raise ConnectionError(f"could not push to the Hugging Face Hub as {repo_id!r}: {err}. Check the network "
                              "and your token (`huggingface-cli login`); the dataset is saved locally") from err
