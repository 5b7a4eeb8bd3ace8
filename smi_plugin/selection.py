"""Patch-selection policies: which retained patches survive a stage, as plug-ins.

One exact-stopping machinery (``smi_plugin.inverter``) serves every policy: at each planned stage
it asks the policy which of the currently retained positions survive; the others are frozen into
the canvas for good. A policy only decides *when* (``plan``) and *which* (``select``), and whether
the removed patches are emitted as a finished sample of their own (``Stage.emit``, Patch Rebirth).
Policies register themselves by name, like the base methods::

    @register_selection_policy("my-policy")
    class MyPolicy(SMISelection): ...

and ``InversionConfig.selection`` (``--selection``) picks one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .schedule import StoppingSchedule

SELECTION_POLICIES: dict[str, type["SelectionPolicy"]] = {}


def register_selection_policy(name: str) -> Callable[[type], type]:
    """Class decorator registering a selection policy under ``name`` (``InversionConfig.selection``)."""

    def decorate(cls: type) -> type:
        SELECTION_POLICIES[name] = cls
        return cls

    return decorate


class SelectionSettings(Protocol):
    """The run settings a policy reads (``InversionConfig`` has them all)."""

    schedule: StoppingSchedule
    iterations: int
    rebirth_divisions: int


@dataclass(frozen=True)
class Stage:
    """One planned stage: at ``iteration``, ``keep`` patches stay retained; ``emit`` marks the removed
    ones as a finished sample (Patch Rebirth) rather than plain stopped background."""

    iteration: int
    keep: int
    emit: bool = False


class SelectionPolicy:
    """Base policy: the schedule's stages, survivors chosen by ``select``.

    Subclasses override ``select`` (and ``plan`` to change when stages happen). ``needs_scores``
    says whether ``select`` reads the CLS attention; when False the inverter never scores.
    """

    needs_scores = True

    def __init__(self, config: SelectionSettings) -> None:
        self.config = config

    def plan(self, num_patches: int) -> tuple[Stage, ...]:
        """The stages of a run on ``num_patches`` patches, in iteration order (the run's reachable ones)."""
        schedule, iterations = self.config.schedule, self.config.iterations
        counts = schedule.kept_counts(num_patches)
        return tuple(Stage(iteration, keep) for (iteration, _), keep in zip(schedule.stages, counts[1:])
                     if iteration < iterations)

    def select(self, scores: torch.Tensor | None, kept: torch.Tensor, keep: int,
               generator: torch.Generator) -> torch.Tensor:
        """Survivors ``(B, keep)``: ascending slots (columns of ``kept``) of the retained patches kept.

        Args:
            scores: ``(B, K)`` CLS attention of the retained patches (None when ``needs_scores`` is False).
            kept: ``(B, K)`` grid positions of the retained patches.
            keep: how many survive.
            generator: the run's CPU generator (for random choices, so runs stay reproducible).
        """
        raise NotImplementedError


def most_attended(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Ascending slots of the ``keep`` highest scores per row of ``scores`` ``(B, K)``."""
    return scores.topk(keep, dim=1).indices.sort(dim=1).values


def least_attended(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Ascending slots of the ``keep`` lowest scores per row of ``scores`` ``(B, K)``."""
    return scores.topk(keep, dim=1, largest=False).indices.sort(dim=1).values


@register_selection_policy("smi")
class SMISelection(SelectionPolicy):
    """Sparse Model Inversion (the default): keep the most-attended patches, stop the rest."""

    def select(self, scores, kept, keep, generator):
        return most_attended(scores, keep)


@register_selection_policy("random")
class RandomSelection(SelectionPolicy):
    """The ablation: stop uniformly random patches on the same schedule.

    Draws from the run's generator, so the same seed stops the same patches.
    """

    needs_scores = False

    def select(self, scores, kept, keep, generator):
        draws = torch.rand(kept.shape, generator=generator).to(kept.device)
        return most_attended(draws, keep)


@register_selection_policy("dense")
class DenseSelection(SelectionPolicy):
    """Dense inversion (DeepInversion, PSAQ-ViT as published): never stop, whatever the schedule."""

    needs_scores = False

    def plan(self, num_patches):
        return ()

    def select(self, scores, kept, keep, generator):
        raise RuntimeError("dense selection has no stages")


@register_selection_policy("rebirth")
class RebirthSelection(SelectionPolicy):
    """Patch Rebirth (Heo & Choi, 2025): detach the *most*-attended patches as finished samples.

    At ``v - 1`` evenly spaced points of the run (``v = rebirth_divisions``), ``num_patches // v`` of
    the most-attended retained patches are detached: frozen like stopped patches and emitted as one
    sparse sample with its own mask; the rest keep being inverted (reborn), and at the end they form
    the last sample. One trajectory thus yields ``v`` samples whose masks are disjoint and cover the
    grid. The stopping schedule is SMI's and does not apply: its early stages would emit samples
    after a handful of iterations, before anything has formed.
    """

    def plan(self, num_patches):
        iterations, divisions = self.config.iterations, self.config.rebirth_divisions
        points = sorted({max(1, round(j * iterations / divisions)) for j in range(1, divisions)})
        points = [i for i in points if i < iterations]
        divisions = len(points) + 1
        share = num_patches // divisions
        if share < 1:
            raise ValueError(f"rebirth splits {num_patches} patches into {divisions} samples: too many "
                             "stages for the patch grid")
        return tuple(Stage(i, num_patches - (j + 1) * share, emit=True) for j, i in enumerate(points))

    def select(self, scores, kept, keep, generator):
        # The survivors are the least attended: the most attended leave as a finished sample.
        return least_attended(scores, keep)
