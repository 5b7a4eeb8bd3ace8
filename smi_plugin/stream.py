"""Streams of inverted samples for training loops: ``datasets.IterableDataset`` views.

* ``distillation_stream``: samples produced on the fly by the inverter, one shard per list of work
  items, so ``split_dataset_by_node`` and DataLoader workers get distinct shards.
* ``stream_from_inverted``: the same rows read from an exported dataset (``smi invert --out``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .config import InversionConfig
from .inverter import SparseInverter
from .tokens import forward_kept_tokens


def _invert_shard(items: list[dict], teacher: nn.Module, config: dict, with_logits: bool) -> Iterator[dict]:
    inverter = SparseInverter(teacher, InversionConfig.from_dict(config), progress=False)
    for item in items:
        batch = inverter.invert(item["labels"], seed=item["seed"])
        pixels = batch.normalized()
        logits = forward_kept_tokens(teacher, pixels, batch.patch_mask).detach() if with_logits else None
        for row in range(len(batch)):
            sample = {"pixel_values": pixels[row].cpu().numpy(), "patch_mask": batch.patch_mask[row].cpu().numpy(),
                      "label": int(batch.labels[row]), "seed": int(item["seed"]), "item": int(item["index"])}
            if with_logits:
                sample["teacher_logits"] = logits[row].cpu().numpy()
            yield sample


def distillation_stream(teacher: nn.Module, config: InversionConfig, labels: Sequence[int], seed: int = 0,
                        num_shards: int = 2, with_logits: bool = False):
    """A ``datasets.IterableDataset`` inverting ``labels`` on the fly, in ``num_shards`` shards.

    Work items are the same as ``smi invert``'s (batches of ``config.batch_size`` seeded from
    ``seed`` and their index) and spread round-robin over shards; choose ``num_shards`` as a
    multiple of the number of processes so ``split_dataset_by_node`` gives each a whole share.

    Example:
        >>> stream = distillation_stream(teacher, config, labels=range(256), num_shards=4)
        >>> loader = DataLoader(stream.with_format("torch"), batch_size=32)
    """
    import datasets

    from .distributed import plan_work

    items = [{"index": w.index, "labels": list(w.labels), "seed": w.seed}
             for w in plan_work(list(labels), config.batch_size, seed)]
    num_shards = max(1, min(num_shards, len(items)))
    shards = [items[s::num_shards] for s in range(num_shards)]
    return datasets.IterableDataset.from_generator(
        _stream_generator, gen_kwargs={"shards": shards, "teacher": teacher, "config": config.to_dict(),
                                       "with_logits": with_logits})


def _stream_generator(shards: list[list[dict]], teacher: nn.Module, config: dict, with_logits: bool):
    for items in shards:
        yield from _invert_shard(items, teacher, config, with_logits)


def stream_from_inverted(inverted: Any, num_shards: int = 2):
    """A ``datasets.IterableDataset`` of normalized samples read from an exported dataset."""
    from .export import load_inverted

    inverted = load_inverted(inverted)
    mean = torch.tensor(inverted.mean).view(-1, 1, 1)
    std = torch.tensor(inverted.std).view(-1, 1, 1)

    def normalize(row: dict) -> dict:
        pixels = torch.as_tensor(row["pixel_values"])
        return {"pixel_values": ((pixels - mean) / std).numpy()}

    stream = inverted.dataset.select_columns(["pixel_values", "patch_mask", "label", "seed", "item"])
    return stream.to_iterable_dataset(num_shards=num_shards).map(normalize)
