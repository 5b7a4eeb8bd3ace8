"""When to stop inverting patches, and how many: the progressive stopping schedule."""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Mapping

PAPER_STAGES = {50: 0.3, 100: 0.3, 200: 0.3, 300: 0.3}
PAPER_ITERATIONS = 4000


class StoppingSchedule:
    """Maps an iteration to the fraction of the *currently retained* patches stopped there.

    At iteration ``t`` of a stage, the ``floor(n * (1 - ratio))`` patches with the highest
    final-layer CLS attention of iteration ``t - 1`` are kept; the rest are stopped for good.
    An empty schedule is dense inversion.

    Args:
        stages: ``{iteration: ratio}`` or ``[(iteration, ratio), ...]``; iterations >= 1 and distinct,
            ratios in ``[0, 1)``.

    Example:
        >>> schedule = StoppingSchedule({50: 0.3, 100: 0.3, 200: 0.3, 300: 0.3})
        >>> schedule.kept_counts(196)
        [196, 137, 95, 66, 46]
        >>> StoppingSchedule.parse("50:0.3,100:0.3") == StoppingSchedule({50: 0.3, 100: 0.3})
        True
    """

    def __init__(self, stages: Mapping[int, float] | Iterable[tuple[int, float]] = ()) -> None:
        pairs = list(stages.items()) if isinstance(stages, Mapping) else [tuple(s) for s in stages]
        seen: set[int] = set()
        for entry in pairs:
            if len(entry) != 2:
                raise ValueError(f"schedule entry {entry!r} is not an (iteration, ratio) pair")
            iteration, ratio = entry
            if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 1:
                raise ValueError(
                    f"schedule entry {iteration}:{ratio}: the iteration must be an integer >= 1 (stopping "
                    "ranks patches by the previous iteration's attention, so iteration 0 has none)")
            if iteration in seen:
                raise ValueError(f"schedule entry {iteration}:{ratio}: iteration {iteration} appears twice; "
                                 "merge the two stages into one ratio")
            if not (isinstance(ratio, (int, float)) and 0.0 <= float(ratio) < 1.0):
                raise ValueError(f"schedule entry {iteration}:{ratio}: the ratio must be in [0, 1) "
                                 "(a fraction of the retained patches to stop)")
            seen.add(iteration)
        self._stages: tuple[tuple[int, float], ...] = tuple(sorted((i, float(r)) for i, r in pairs))

    @classmethod
    def paper(cls) -> "StoppingSchedule":
        """The paper's schedule: stop 30% of the retained patches at iterations 50, 100, 200, 300."""
        return cls(PAPER_STAGES)

    @classmethod
    def dense(cls) -> "StoppingSchedule":
        """No stopping at all: dense inversion (DeepInversion / PSAQ-ViT as published)."""
        return cls()

    @classmethod
    def paper_scaled(cls, iterations: int, stages: int | None = None) -> "StoppingSchedule":
        """The paper's ratios at iterations scaled from its 4000-iteration run to ``iterations``.

        ``stages`` keeps only the first that many of the paper's four stages, for runs whose samples
        should show more of the image (two keep 0.7^2 = 49% of the patches, the paper's four 24%, before rounding).
        Runs shorter than five iterations cannot hold all four stages; the ones that would come at or
        after the last iteration are left out.
        """
        if stages is not None and not 1 <= stages <= len(PAPER_STAGES):
            raise ValueError(f"the paper has {len(PAPER_STAGES)} stopping stages; keep 1 to "
                             f"{len(PAPER_STAGES)} of them, not {stages}")
        scale, scaled, previous = iterations / PAPER_ITERATIONS, {}, 0
        for iteration, ratio in list(PAPER_STAGES.items())[:stages]:
            # Short runs would round stages together; keep them distinct and in order.
            previous = max(round(iteration * scale), previous + 1)
            if previous < iterations:
                scaled[previous] = ratio
        return cls(scaled)

    @classmethod
    def parse(cls, text: str | "StoppingSchedule" | Mapping[int, float] | None) -> "StoppingSchedule":
        """Parse ``"paper"``, ``"dense"`` (or empty) or ``"50:0.3,100:0.3"``; pass schedules through."""
        if isinstance(text, StoppingSchedule):
            return text
        if isinstance(text, Mapping):
            return cls(text)
        if text is None or text.strip().lower() in ("", "dense", "none"):
            return cls.dense()
        if text.strip().lower() == "paper":
            return cls.paper()
        pairs = []
        for item in text.split(","):
            iteration, sep, ratio = item.partition(":")
            try:
                if not sep:
                    raise ValueError
                pairs.append((int(iteration), float(ratio)))
            except ValueError:
                raise ValueError(f"cannot parse schedule entry {item.strip()!r} in {text!r}; write "
                                 "ITERATION:RATIO pairs separated by commas, e.g. '50:0.3,100:0.3', "
                                 "or 'paper' / 'dense' (InversionConfig and the CLI also take 'paper-scaled' "
                                 "and 'paper-scaled:N', scaled to their iterations)") from None
        return cls(pairs)

    @property
    def stages(self) -> tuple[tuple[int, float], ...]:
        return self._stages

    @property
    def is_dense(self) -> bool:
        return all(ratio == 0.0 for _, ratio in self._stages)

    def ratio_at(self, iteration: int) -> float | None:
        """The stopping ratio applied at ``iteration``, or ``None`` when nothing is stopped there."""
        return dict(self._stages).get(iteration)

    @staticmethod
    def keep_count(num_retained: int, ratio: float) -> int:
        """Patches kept when stopping ``ratio`` of ``num_retained``: ``floor(n * (1 - ratio))``."""
        # The epsilon keeps products such as 10 * 0.7 = 6.999... from losing a patch to float error.
        return math.floor(num_retained * (1.0 - ratio) + 1e-9)

    def kept_counts(self, num_patches: int) -> list[int]:
        """Retained patch counts: before the first stage, then after each stage.

        Raises:
            ValueError: if a stage would keep no patch at all.
        """
        counts = [num_patches]
        for iteration, ratio in self._stages:
            kept = self.keep_count(counts[-1], ratio)
            if kept < 1:
                raise ValueError(f"schedule entry {iteration}:{ratio} would keep 0 of {counts[-1]} patches; "
                                 "lower the ratio or remove the stage")
            counts.append(kept)
        return counts

    def check_run(self, iterations: int, num_patches: int) -> list[int]:
        """Validate against a run; warns about stages the run never reaches. Returns kept counts."""
        counts = self.kept_counts(num_patches)
        late = [i for i, _ in self._stages if i >= iterations]
        if late:
            warnings.warn(f"stopping stages at iterations {late} are at or past the run's last iteration "
                          f"({iterations - 1}) and will never apply", stacklevel=2)
        return counts

    def __str__(self) -> str:
        if not self._stages:
            return "dense"
        return ",".join(f"{i}:{r:g}" for i, r in self._stages)

    def __repr__(self) -> str:
        return f"StoppingSchedule({dict(self._stages)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoppingSchedule) and self._stages == other._stages

    def __hash__(self) -> int:
        return hash(self._stages)
