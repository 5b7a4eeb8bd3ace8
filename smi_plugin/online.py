"""A pool of images that keep being inverted while a student learns from them (online KD).

The pool is ``ceil(size / B)`` slots of ``B = config.batch_size`` images, each an inverter state
(noise at first). ``advance(slot, k)`` takes ``k`` more inversion steps on one slot, stopping
patches on the config's schedule by the slot's own iteration count (its "age"); ``batch()`` is the
current pool as an ``InvertedBatch`` (only slots inverted at least once), the library's one data
type, so sampling and the trainer treat it like any fixed pool. The pool is plain state: pickled
with the student's checkpoint, it resumes exactly.

Inverter API used: ``start(labels, seed)``, ``step(state, iteration, scoring=)``,
``stop(state, stage, scores)``, ``stages``, ``policy.needs_scores``, ``session()`` (teacher
frozen, hooks on, attention recorded), ``channels.to_pixels``, ``num_classes``, ``grid``,
``mean``/``std``, ``device``, ``competitor``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .batch import InvertedBatch, balanced_labels, kept_indices_for
from .inverter import InversionState, SparseInverter, derive_seed
from .tokens import indices_to_mask


@dataclass
class _Slot:
    state: InversionState
    age: int = 0
    scores: torch.Tensor | None = None  # CLS attention recorded right before the next stage
    images: torch.Tensor | None = None  # (B, C, H, W) in [0, 1], refreshed after each advance
    mask: torch.Tensor | None = None


@dataclass
class OnlinePool:
    """Images under continual inversion: ``size`` images in slots of the inverter's batch size.

    Args:
        inverter: the teacher's ``SparseInverter``; its config gives the batch size, lr, schedule.
        size: images in the pool (rounded up to whole slots).
        seed: slot ``j`` starts from the noise of ``derive_seed(seed, j)``, labels balanced over classes.
    """

    inverter: SparseInverter
    size: int
    seed: int = 0
    slots: dict[int, _Slot] = field(default_factory=dict)

    @property
    def slot_size(self) -> int:
        return self.inverter.config.batch_size

    @property
    def num_slots(self) -> int:
        return max(1, math.ceil(self.size / self.slot_size))

    def __len__(self) -> int:
        """Images inverted at least once (the distinct samples a student can have seen)."""
        return sum(len(s.state.labels) for s in self.slots.values() if s.age > 0)

    def _start(self, index: int) -> _Slot:
        classes, b = self.inverter.num_classes, self.slot_size
        labels = balanced_labels(b * (index + 1), classes)[b * index:]
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.inverter.device)
        return _Slot(self.inverter.start(labels, derive_seed(self.seed, index)))

    def advance(self, index: int, steps: int) -> InvertedBatch:
        """``steps`` more inversion iterations on slot ``index``; returns its images now."""
        inverter = self.inverter
        slot = self.slots.get(index) or self._start(index)
        self.slots[index] = slot
        stages = {stage.iteration: stage for stage in inverter.stages}
        last = inverter.config.iterations - 1
        with inverter.session() as attention:
            for age in range(slot.age, slot.age + steps):
                stage = stages.get(age)
                if stage is not None:
                    inverter.stop(slot.state, stage, slot.scores)
                    slot.scores = None
                scoring = (age + 1) in stages and inverter.policy.needs_scores
                attention["active"] = scoring
                inverter.step(slot.state, min(age, last), scoring=scoring)
                if scoring:
                    slot.scores = attention.get("scores")
        slot.age += steps
        slot.images = inverter.channels.to_pixels(slot.state.current_patches(), inverter.grid).detach()
        slot.mask = indices_to_mask(slot.state.kept, inverter.grid)
        return self._batch([slot])

    def batch(self) -> InvertedBatch:
        """Every slot inverted at least once, as one batch (current values)."""
        return self._batch([s for _, s in sorted(self.slots.items()) if s.age > 0])

    def _batch(self, slots: list[_Slot]) -> InvertedBatch:
        inverter = self.inverter
        images = torch.cat([s.images for s in slots])
        mask = torch.cat([s.mask for s in slots])
        return InvertedBatch(images=images, patch_mask=mask, labels=torch.cat([s.state.labels for s in slots]),
                             kept_indices=kept_indices_for(mask),
                             mean=tuple(inverter.mean), std=tuple(inverter.std),
                             provenance={"source": "online", "ages": [s.age for s in slots]})

    def state_dict(self) -> dict:
        """Picklable state (inverter states with their Adam moments and generators)."""
        return {"size": self.size, "seed": self.seed, "slots": self.slots}

    def load_state_dict(self, state: dict) -> None:
        if (state["size"], state["seed"]) != (self.size, self.seed):
            raise ValueError("the checkpointed online pool has another size or seed")
        self.slots = state["slots"]
