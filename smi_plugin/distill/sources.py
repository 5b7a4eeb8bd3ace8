"""Where a KD step's inputs come from: sources, each one small object behind one protocol.

* ``PoolSource``: a fixed pool of inverted images (an ``InvertedBatch``), sampled with replacement.
* ``AlternatingSource``: the paper's loop: invert a batch, take ``kd_steps_per_round`` KD steps on
  everything inverted so far, repeat.
* ``OnlineSource``: a pool kept under inversion while the student learns (``OnlinePool``): each step
  advances one slot by ``inversion_steps`` and trains on it plus replayed samples.

Each gives ``next_batch(step, generator, competitor)`` (the normalized inputs with their patch masks, and the
samples this call finished, which a least-squares head absorbs) and ``state_dict`` / ``load_state_dict`` in
plain tensors, numbers and dicts, so a checkpoint needs no pickle. Every random draw comes from ``generator``
or from seeds derived from the source's ``seed``, so a run depends only on its seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..batch import InvertedBatch, balanced_labels
from ..inverter import SparseInverter, derive_seed
from ..online import OnlinePool
from .config import DistillConfig
from .kd import augment_batch, sample_batch


@dataclass
class SourceBatch:
    """One KD step's inputs: normalized ``pixel_values`` ``(B, C, H, W)``, their ``patch_mask`` ``(B, gh, gw)``,
    and ``finished``, the samples that became final during this call (None: none)."""

    pixel_values: torch.Tensor
    patch_mask: torch.Tensor
    finished: InvertedBatch | None = None


class Source(Protocol):
    """What ``KDTrainer`` needs of a data source."""

    def next_batch(self, step: int, generator: torch.Generator, competitor: nn.Module | None) -> SourceBatch:
        """The inputs of KD step ``step`` (0-based), drawn from ``generator``; ``competitor`` is the student
        for an inversion that competes with it (None: it does not yet)."""

    @property
    def images_seen(self) -> int:
        """Distinct inverted samples the student has trained on so far."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PoolSource:
    """A fixed pool: each step samples ``batch_size`` rows (with replacement, flips and mixes). The whole pool
    counts as finished at the first step."""

    def __init__(self, pool: InvertedBatch, config: DistillConfig) -> None:
        if len(pool) == 0:
            raise ValueError("the KD pool is empty: invert some images first")
        self.pool, self.config = pool, config
        self.pixels, self.masks = pool.normalized().cpu(), pool.patch_mask.cpu()

    @property
    def images_seen(self) -> int:
        return len(self.pool)

    def next_batch(self, step: int, generator: torch.Generator, competitor: nn.Module | None = None) -> SourceBatch:
        cfg = self.config
        x, m = sample_batch(self.pixels, self.masks, min(cfg.batch_size, len(self.pixels)), generator,
                            flip=cfg.flip, mixup=cfg.mixup)
        return SourceBatch(x, m, self.pool if step == 0 else None)

    def state_dict(self) -> dict[str, Any]:
        return {}  # the caller gives the pool again

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class AlternatingSource:
    """The paper's loop: every ``kd_steps_per_round`` steps a round inverts ``images_per_round`` more images
    (labels balanced, rotated by the round, seeded ``derive_seed(seed, round)``); steps sample the pool so far."""

    def __init__(self, inverter: SparseInverter, config: DistillConfig, seed: int) -> None:
        self.inverter, self.config, self.seed = inverter, config, seed
        self.pool: PoolSource | None = None
        self.rounds = 0  # rounds inverted so far

    @property
    def images_seen(self) -> int:
        return 0 if self.pool is None else self.pool.images_seen

    def next_batch(self, step: int, generator: torch.Generator, competitor: nn.Module | None = None) -> SourceBatch:
        cfg = self.config
        finished = None
        round_index, first_step = divmod(step, cfg.kd_steps_per_round)
        if first_step == 0 and round_index >= self.rounds:  # a resumed run has its rounds already
            labels = balanced_labels(cfg.images_per_round, self.inverter.num_classes)
            shift = round_index % len(labels)
            finished = self.inverter.invert(labels[shift:] + labels[:shift], seed=derive_seed(self.seed, round_index),
                                            competitor=competitor).to("cpu")
            pool = finished if self.pool is None else InvertedBatch.concatenate([self.pool.pool, finished])
            self.pool, self.rounds = PoolSource(pool, cfg), round_index + 1
        batch = self.pool.next_batch(step, generator)
        return SourceBatch(batch.pixel_values, batch.patch_mask, finished)

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "pool": None if self.pool is None else self.pool.pool.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = state["rounds"]
        if state["pool"] is not None:
            self.pool = PoolSource(InvertedBatch.from_state_dict(state["pool"]), self.config)


class OnlineSource:
    """A pool under continual inversion (``OnlinePool``, seeded from ``seed``): step ``k`` advances slot
    ``k mod slots`` by ``inversion_steps`` and trains on its images plus ``batch_size`` replayed samples
    (none when 0), flipped and mixed."""

    def __init__(self, inverter: SparseInverter, config: DistillConfig, seed: int) -> None:
        self.config = config
        self.pool = OnlinePool(inverter, config.pool_size, seed, renew=config.renew, warm_start=config.warm_start)

    @property
    def images_seen(self) -> int:
        return len(self.pool)

    def next_batch(self, step: int, generator: torch.Generator, competitor: nn.Module | None = None) -> SourceBatch:
        cfg, pool = self.config, self.pool
        before = pool.finished
        fresh = pool.advance(step % pool.num_slots, cfg.inversion_steps, competitor)
        finished = None
        if pool.finished > before:  # they are the memory's last rows
            finished = pool.memory.select(range(len(pool.memory) - (pool.finished - before), len(pool.memory)))
        # The fresh batch is always seen; the replayed rows are drawn from the memory and every visited slot.
        parts = [fresh] + ([pool.sample(cfg.batch_size, generator)] if cfg.batch_size else [])
        x = torch.cat([part.normalized() for part in parts])
        m = torch.cat([part.patch_mask for part in parts])
        x, m = augment_batch(x, m, generator, flip=cfg.flip, mixup=cfg.mixup)
        return SourceBatch(x, m, finished)

    def state_dict(self) -> dict[str, Any]:
        return self.pool.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool.load_state_dict(state)


def as_pool(source: Any) -> InvertedBatch:
    """One ``InvertedBatch`` from an ``InvertedBatch``, a list of them, a calibration dataset or an export."""
    from ..calibration import SparseInvertedCalibrationDataset
    from ..export import load_inverted

    if isinstance(source, InvertedBatch):
        return source
    if isinstance(source, (list, tuple)) and source and all(isinstance(b, InvertedBatch) for b in source):
        return InvertedBatch.concatenate([b.to("cpu") for b in source])
    if isinstance(source, SparseInvertedCalibrationDataset):
        return source.batch
    if source is None or (isinstance(source, (list, tuple)) and not source):
        raise ValueError("the KD pool is empty: invert some images first")
    return load_inverted(source).to_batch()


def check_inverter(config: DistillConfig, inverter: SparseInverter | None) -> None:
    """A source that inverts as the student learns needs the teacher's inverter (checked before any work)."""
    if config.source != "pool" and inverter is None:
        raise ValueError(f"source={config.source!r} inverts as it trains: pass "
                         "inverter=SparseInverter(teacher, ...)")


def build_source(config: DistillConfig, inverter: SparseInverter | None, pool: Any, seed: int) -> Source:
    """The source ``config.source`` names: over ``pool`` (source ``pool``), or inverting with ``inverter``."""
    if config.source == "pool":
        return PoolSource(as_pool(pool), config)
    check_inverter(config, inverter)
    if config.source == "alternating":
        return AlternatingSource(inverter, config, seed)
    return OnlineSource(inverter, config, seed)
