"""Inverted images as a Hugging Face ``datasets.Dataset``: lossless, self-describing, shareable.

Columns, following the Hub's image-classification conventions:

* ``image``: the full inverted image as a ``datasets.Image()`` (8-bit PNG), what the dataset viewer
  and ``transformers`` image processors expect;
* ``label``: ``ClassLabel`` with the teacher's class names;
* ``patch_mask``: bool ``Array2D`` over the patch grid, True where the patch was kept to the end;
* ``preview``: ``Image()`` of the image with stopped patches blacked out (what was really inverted);
* ``pixel_values``: the exact float32 pixels in ``[0, 1]`` (``Array3D``), *not* normalized: apply the
  teacher's mean/std (``InvertedBatch.normalized()``) before a forward pass. Kept beside ``image``
  because calibration needs the unquantized values;
* ``seed``, ``item`` (the work item that produced the row) and ``teacher``.

Provenance: ``info.description`` holds the run's manifest as JSON (format, config, teacher,
normalization, class names), and ``write_dataset_card`` writes a dataset card ``README.md`` whose
YAML front matter carries the same, for the Hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .batch import InvertedBatch, kept_indices_for

if TYPE_CHECKING:
    import datasets

FORMAT = "smi-plugin/inverted-images/v1"
REQUIRED_COLUMNS = ("pixel_values", "patch_mask", "label")


class NotAnInvertedDatasetError(ValueError):
    """The path or dataset was not written by smi-plugin."""


def inverted_features(image_shape: Sequence[int], grid_size: Sequence[int], class_names: Sequence[str]):
    """The ``datasets.Features`` of an inverted dataset (``image`` first: the viewer's column)."""
    import datasets

    return datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=list(class_names)),
        "patch_mask": datasets.Array2D(shape=tuple(grid_size), dtype="bool"),
        "preview": datasets.Image(),
        "pixel_values": datasets.Array3D(shape=tuple(image_shape), dtype="float32"),
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
        previews = _to_uint8(batch.masked_images())
        full = _to_uint8(batch.images)
        for row in range(len(batch)):
            columns["image"].append(full[row].cpu().numpy())
            columns["pixel_values"].append(batch.images[row].float().cpu().numpy())
            columns["preview"].append(previews[row].cpu().numpy())
            columns["patch_mask"].append(batch.patch_mask[row].cpu().numpy())
            columns["label"].append(int(batch.labels[row]))
            columns["seed"].append(int(batch.provenance.get("seed", -1)))
            columns["item"].append(int(items[position]) if items is not None else position)
            columns["teacher"].append(str(batch.provenance.get("teacher", manifest.get("teacher", ""))))
    info = datasets.DatasetInfo(description=json.dumps(manifest, sort_keys=True), features=features)
    return datasets.Dataset.from_dict(columns, features=features, info=info)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` ``[0, 1]`` floats as ``(B, H, W, C)`` uint8 (one channel squeezed for PIL)."""
    array = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return array[..., 0] if array.shape[-1] == 1 else array


CARD_FILE = "README.md"


def dataset_card(manifest: dict[str, Any], dataset: "datasets.Dataset") -> str:
    """A Hugging Face dataset card (``README.md``): YAML front matter with the run, then a description.

    The front matter holds the Hub's own keys (``pretty_name``, ``task_categories``, ``tags``,
    ``size_categories``) and an ``smi_plugin`` mapping with the teacher, its normalization, the class
    names, the inversion config and the fraction of patches kept.
    """
    import numpy as np
    import yaml

    masks = dataset.with_format("numpy")["patch_mask"]
    kept = float(np.mean([np.asarray(m, dtype=np.float64).mean() for m in masks])) if len(dataset) else 0.0
    rows = len(dataset)
    size = "n<1K" if rows < 1000 else "1K<n<10K" if rows < 10_000 else "10K<n<100K" if rows < 100_000 else "n>100K"
    meta = {
        "pretty_name": f"Sparse model inversions of {manifest.get('teacher', 'a ViT')}",
        "task_categories": ["image-classification"],
        "tags": ["synthetic", "model-inversion", "sparse-model-inversion", "smi-plugin", "data-free"],
        "size_categories": [size],
        "smi_plugin": {
            "format": manifest.get("format", FORMAT),
            "teacher": manifest.get("teacher"),
            "mean": list(manifest.get("mean", [])), "std": list(manifest.get("std", [])),
            "class_names": list(manifest.get("class_names", [])),
            "num_images": rows, "kept_fraction": round(kept, 4),
            "seed": manifest.get("seed"), "config": manifest.get("config", {}),
            "versions": manifest.get("versions", {}),
        },
    }
    meta = json.loads(json.dumps(meta, default=str))  # plain types only (versions are str subclasses)
    front = yaml.safe_dump(meta, sort_keys=False, default_flow_style=None, width=120)
    mean, std = manifest.get("mean"), manifest.get("std")
    return f"""---
{front}---

# Sparse model inversions of `{manifest.get('teacher')}`

{rows} images synthesized from the classifier `{manifest.get('teacher')}` alone, with no real data, by
smi-plugin (Sparse Model Inversion, Hu et al.): patches the teacher attends to least were
*stopped* during inversion and never updated again; on average {kept:.1%} of the patches were kept.

| column | content |
|---|---|
| `image` | the full inverted image (8-bit PNG) |
| `label` | the class the image was inverted for (`ClassLabel`, the teacher's class names) |
| `patch_mask` | bool patch grid, true where the patch was kept to the end |
| `preview` | the image with stopped patches black: what was really inverted |
| `pixel_values` | exact float32 pixels in [0, 1], **not normalized**: normalize with mean {mean} and std {std} |
| `seed`, `item`, `teacher` | the work item that produced the row and its seed |

Load it with `datasets.load_from_disk(DIR)` or `smi_plugin.export.load_inverted(DIR)`; the run's full
configuration is in the front matter above (`smi_plugin`) and in `info.description`.
"""


def write_dataset_card(directory: "str | os.PathLike", manifest: dict[str, Any], dataset: "datasets.Dataset") -> Path:
    """Write ``dataset_card(...)`` to ``directory/README.md`` (atomically) and return its path."""
    from .io import atomic_write_text

    path = Path(directory) / CARD_FILE
    atomic_write_text(path, dataset_card(manifest, dataset))
    return path


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
        return InvertedBatch(images=data["pixel_values"].float(), patch_mask=mask, labels=data["label"].long(),
                             kept_indices=kept_indices_for(mask), mean=self.mean, std=self.std,
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


def push_to_hub(dataset: "datasets.Dataset", repo_id: str, private: bool = True, token: str | None = None,
                card: str | None = None) -> None:
    """``datasets``' own ``push_to_hub``, then ``card`` (a dataset card's text) as the repo's README.

    Raises ``ConnectionError`` with what to do when the Hub cannot be reached.
    """
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConnectionError(f"cannot push to {repo_id!r}: HF_HUB_OFFLINE=1 is set. Unset it on a machine with "
                              "network access, log in with `huggingface-cli login` (or pass a token), and push "
                              "again; the dataset is saved locally meanwhile")
    try:
        dataset.push_to_hub(repo_id, private=private, token=token)
        if card is not None:
            from huggingface_hub import DatasetCard

            DatasetCard(card).push_to_hub(repo_id, token=token)
    except Exception as err:  # the hub client raises many types (HTTP, connection, auth)
        raise ConnectionError(f"could not push to the Hugging Face Hub as {repo_id!r}: {err}. Check the network "
                              "and your token (`huggingface-cli login`); the dataset is saved locally") from err
