"""A pool of images that keep being inverted while a student learns from them (online KD).

The pool is ``ceil(size / B)`` slots of ``B = min(config.batch_size, size)`` images, each an inverter state
(noise at first). ``advance(slot, k)`` takes ``k`` more iterations of the inverter's own loop
(``SparseInverter.advance``) on one slot, stopping patches on the config's schedule by the slot's own
iteration count (its "age"). With ``renew``, a slot that has run the config's ``iterations`` is finished: its
images join a replay memory of the last ``size`` finished samples and the slot starts again from fresh noise
(or, with ``warm_start``, from mixes of two remembered samples), so the student keeps seeing new samples
(fresh samples beat polishing a fixed few, Fast-DFKD). ``batch()`` is the memory plus the current slots as an
``InvertedBatch``, the library's one data type, so sampling and the trainer treat it like any fixed pool.
``state_dict()`` is plain tensors and numbers (no pickled objects): a checkpointed pool resumes exactly.

Inverter API used (all public): ``start``, ``advance``, ``session``, ``load_state``, ``pixels``, ``grid``,
``num_classes``, ``mean``/``std``, ``device``, ``config``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .batch import InvertedBatch, balanced_labels, kept_indices_for
from .inverter import InversionState, SparseInverter, derive_seed
from .tokens import indices_to_mask

POOL_SEED_INDEX = 1 << 40  # derive_seed(seed, POOL_SEED_INDEX) seeds the pool's noise, apart from KD steps


@dataclass
class _Slot:
    state: InversionState
    age: int = 0
    images: torch.Tensor | None = None  # (B, C, H, W) in [0, 1], refreshed after each advance
    mask: torch.Tensor | None = None


@dataclass
class OnlinePool:
    """Images under continual inversion: ``size`` images in slots of the inverter's batch size.

    Args:
        inverter: the teacher's ``SparseInverter``; its config gives the batch size, lr, schedule.
        size: images in the pool (rounded up to whole slots).
        seed: slot ``j``'s ``g``-th start is seeded with ``derive_seed(pool_seed, j + g * num_slots)``
            (``pool_seed = derive_seed(seed, POOL_SEED_INDEX)``), labels balanced over classes.
        renew: restart finished slots (age ``config.iterations``), keeping their images
            in the replay memory; otherwise slots keep being inverted for the whole run.
        warm_start: a renewed slot starts from mixes of two remembered samples instead of noise
            (``warm_images``), so its first steps cross from another class toward its own.
    """

    inverter: SparseInverter
    size: int
    seed: int = 0
    renew: bool = True
    warm_start: bool = False
    slots: dict[int, _Slot] = field(default_factory=dict)
    memory: InvertedBatch | None = None  # the last ``size`` finished samples
    finished: int = 0  # samples finished so far (more than the memory holds in a long run)
    renewals: dict[int, int] = field(default_factory=dict)

    @property
    def slot_size(self) -> int:
        return min(self.inverter.config.batch_size, self.size)

    @property
    def num_slots(self) -> int:
        return max(1, math.ceil(self.size / self.slot_size))

    def __len__(self) -> int:
        """Distinct samples inverted at least once (finished ones and those under inversion)."""
        return self.finished + sum(len(s.state.labels) for s in self.slots.values() if s.age > 0)

    def _start(self, index: int) -> _Slot:
        classes, b = self.inverter.num_classes, self.slot_size
        labels = balanced_labels(b * (index + 1), classes)[b * index:]
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.inverter.device)
        renewal = self.renewals.get(index, 0)
        # Seeds of their own: the trainer seeds KD step k's generator with derive_seed(seed, k).
        pool_seed = derive_seed(self.seed, POOL_SEED_INDEX)
        seed = derive_seed(pool_seed, index + renewal * self.num_slots)
        warm = self.warm_start and self.memory is not None
        images = self.warm_images(labels, derive_seed(seed, 1)) if warm else None
        return _Slot(self.inverter.start(labels, seed, images))

    def warm_images(self, labels: torch.Tensor, seed: int) -> torch.Tensor:
        """Starting pixels for ``labels``: ``w * own + (1 - w) * other`` per row, ``w ~ U(0, 1)``, ``own``
        a remembered sample of the row's class and ``other`` one of another class (each drawn at random;
        any remembered sample where the memory holds none of the kind), all drawn from ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        remembered = self.memory.labels.cpu()
        same = remembered.unsqueeze(0) == labels.cpu().unsqueeze(1)  # (B, M)

        def draw(wanted: torch.Tensor) -> torch.Tensor:
            # uniform among the wanted rows (their scores are >= 1), among all where a row wants none
            return (torch.rand(wanted.shape, generator=generator) + wanted.float()).argmax(1)

        own, other = draw(same), draw(~same)
        weight = torch.rand(len(labels), 1, 1, 1, generator=generator)
        images = self.memory.images.cpu()
        return weight * images[own] + (1 - weight) * images[other]

    def _remember(self, done: InvertedBatch) -> None:
        """Append finished samples to the replay memory, which keeps the last ``size``."""
        memory = done if self.memory is None else InvertedBatch.concatenate([self.memory, done])
        memory = memory.select(range(max(0, len(memory) - self.size), len(memory)))
        self.finished += len(done)
        # concatenate() nests the parts' provenance: kept flat, or it would deepen with every renewal
        memory.provenance = {"source": "online", "finished": self.finished}
        self.memory = memory

    def _retire(self, index: int) -> None:
        """Move slot ``index``'s finished images to the memory; ``advance`` starts the slot again."""
        self._remember(self._batch([self.slots.pop(index)]))
        self.renewals[index] = self.renewals.get(index, 0) + 1

    def _release_emitted(self, slot: _Slot) -> None:
        """Patch Rebirth's detached samples are finished when emitted: they go to the memory at once."""
        for _, canvas, positions in slot.state.emitted:
            mask = indices_to_mask(positions, self.inverter.grid)
            self._remember(self._rows(self.inverter.pixels(canvas).detach(), mask, slot.state.labels,
                                      {"source": "online"}))
        slot.state.emitted.clear()

    def advance(self, index: int, steps: int, competitor: nn.Module | None = None) -> InvertedBatch:
        """``steps`` more inversion iterations on slot ``index`` (competing with ``competitor`` when the
        config has a competition weight); returns its images now."""
        inverter = self.inverter
        if self.renew and index in self.slots and self.slots[index].age >= inverter.config.iterations:
            self._retire(index)
        slot = self.slots.get(index) or self._start(index)
        self.slots[index] = slot
        if self.renew:  # a slot runs exactly the config's iterations before it is renewed
            steps = min(steps, inverter.config.iterations - slot.age)
        with inverter.session(competitor):
            inverter.advance(slot.state, slot.age, steps)
        slot.age += steps
        self._release_emitted(slot)
        self._refresh(slot)
        return self._batch([slot])

    def _refresh(self, slot: _Slot) -> None:
        slot.images = self.inverter.pixels(slot.state.current_patches()).detach()
        slot.mask = indices_to_mask(slot.state.kept, self.inverter.grid)

    def sample(self, count: int, generator: torch.Generator) -> InvertedBatch:
        """``count`` rows drawn uniformly (with replacement) from ``batch()``, gathering only those rows."""
        parts = ([self.memory] if self.memory is not None else []) + \
            [self._batch([s]) for _, s in sorted(self.slots.items()) if s.age > 0]
        sizes = torch.tensor([len(p) for p in parts])
        rows = torch.randint(int(sizes.sum()), (count,), generator=generator)
        part = torch.bucketize(rows, sizes.cumsum(0), right=True)
        offset = sizes.cumsum(0) - sizes
        return InvertedBatch.concatenate([parts[i].select(rows[part == i] - offset[i])
                                          for i in part.unique().tolist()])

    def batch(self) -> InvertedBatch:
        """The memory of finished samples and every slot inverted at least once (current values)."""
        current = self._batch([s for _, s in sorted(self.slots.items()) if s.age > 0])
        return current if self.memory is None else InvertedBatch.concatenate([self.memory, current])

    def _batch(self, slots: list[_Slot]) -> InvertedBatch:
        return self._rows(torch.cat([s.images for s in slots]), torch.cat([s.mask for s in slots]),
                          torch.cat([s.state.labels for s in slots]),
                          {"source": "online", "ages": [s.age for s in slots]})

    def _rows(self, images: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
              provenance: dict) -> InvertedBatch:
        return InvertedBatch(images=images, patch_mask=mask, labels=labels, kept_indices=kept_indices_for(mask),
                             mean=tuple(self.inverter.mean), std=tuple(self.inverter.std), provenance=provenance)

    def state_dict(self) -> dict:
        """The pool as plain tensors, numbers and dicts (each slot's inversion state with its Adam moments
        and generator state), for ``torch.save`` and ``torch.load(weights_only=True)``."""
        return {"size": self.size, "seed": self.seed, "renew": self.renew, "warm_start": self.warm_start,
                "slots": {str(index): {"state": slot.state.state_dict(), "age": slot.age}
                          for index, slot in self.slots.items()},
                "memory": None if self.memory is None else self.memory.state_dict(), "finished": self.finished,
                "renewals": {str(index): count for index, count in self.renewals.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = (state["size"], state["seed"], state["renew"], state["warm_start"])
        if saved != (self.size, self.seed, self.renew, self.warm_start):
            raise ValueError("the checkpointed online pool has another size, seed, renewal or warm-start setting")
        self.slots = {}
        for index, saved_slot in state["slots"].items():
            slot = _Slot(self.inverter.load_state(saved_slot["state"]), age=saved_slot["age"])
            self._refresh(slot)
            self.slots[int(index)] = slot
        self.memory = None if state["memory"] is None else InvertedBatch.from_state_dict(state["memory"])
        self.finished = state["finished"]
        self.renewals = {int(index): count for index, count in state["renewals"].items()}
