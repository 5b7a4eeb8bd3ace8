"""Typed, validated configurations: every run's settings, stored with its results.

Every config is a dataclass built with ``option(...)`` fields: the default, a one-line help and,
where the values are a closed set, their choices. ``ConfigBase`` gives each of them the same
round trip (``to_dict``/``from_dict``/``to_json``/``from_json``/``replace``), and the command line
generates its flags and help from the same fields (``smi_plugin.cli.options``), so a new field can
never be missing from the CLI and the CLI and Python share one set of defaults.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, TypeVar

from .losses import BASE_METHODS
from .optim import LR_SCHEDULES
from .schedule import PAPER_STAGES, StoppingSchedule
from .selection import SELECTION_POLICIES
from .tokens import PRECISIONS

AUGMENTATIONS = ("patch", "pixel")
INITIAL_NOISE = ("pixel", "patch")
C = TypeVar("C", bound="ConfigBase")


def option(default: Any = dataclasses.MISSING, help: str = "", *,
           choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
           default_factory: Any = dataclasses.MISSING, cli: bool = True, metavar: str | None = None) -> Any:
    """A dataclass field with the metadata the CLI is generated from (``help``, ``choices``).

    ``choices`` may be a callable, for registries that grow after import (base methods, policies).
    ``cli=False`` keeps a field out of the command line (tensors, callables, internal knobs).
    """
    metadata = {"help": help, "choices": choices, "cli": cli, "metavar": metavar}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _plain(value: Any) -> Any:
    """JSON form of a field value: tuples as lists, schedules as their text, nested configs as dicts."""
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if isinstance(value, StoppingSchedule):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


class ConfigBase:
    """The round trip every config shares; subclasses are dataclasses that validate in ``__post_init__``."""

    def replace(self: C, **changes: Any) -> C:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``from_dict`` restores an equal config."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))


def check_positive_ints(config: Any, *names: str) -> None:
    """Raise ``ValueError`` naming the field unless each of ``names`` is an integer >= 1."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}")


def check_choice(config: Any, name: str, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming the field and the valid values unless its value is one of ``choices``."""
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(f"{type(config).__name__}.{name} {value!r} is unknown; use one of {list(choices)}")


@dataclass
class InversionConfig(ConfigBase):
    """How to invert a batch of images from a ViT teacher.

    The method is the paper's (Adam, betas (0.5, 0.99), CE + TV, 30% of the retained patches stopped
    at four stages); the defaults are sized for a CPU: 300 iterations with the paper's stages scaled
    to them (``schedule="paper-scaled"``). ``InversionConfig.preset("paper")`` is the paper's 4000-
    iteration run, ``preset("data-like")`` the recipe that makes a small teacher's inversions look like
    its data (the demo's). Every field is a flag of ``smi invert``/``quantize``/``distill``.

    Which patches a stage removes is the ``selection`` policy (``smi_plugin.selection``): ``smi``
    (the paper: stop the least-attended), ``random`` (the ablation), ``dense`` (never stop) or
    ``rebirth`` (Patch Rebirth: detach the most-attended as finished samples; see ``rebirth_divisions``).
    """

    iterations: int = option(300, "optimisation steps per batch (the paper: 4000)")
    batch_size: int = option(32, "images inverted together; longer label lists are split")
    lr: float = option(0.25, "Adam learning rate, in normalized pixel units")
    betas: tuple[float, float] = option((0.5, 0.99), "Adam betas")
    lr_schedule: str = option("constant", "learning-rate schedule: constant (the paper) or cosine "
                              "(DeepInversion, with warm-up)", choices=LR_SCHEDULES)
    warmup_iterations: int = option(0, "linear warm-up length for the cosine schedule")
    schedule: StoppingSchedule = option("paper-scaled", "when to stop patches: 'paper-scaled' (the paper's "
                                        "stages scaled to --iterations; 'paper-scaled:N' its first N), 'paper' "
                                        "(50/100/200/300), 'dense', or 'IT:RATIO,...' such as '50:0.3,100:0.3'",
                                        metavar="SCHEDULE")
    base_method: str = option("deepinversion", "the dense method being sped up", choices=lambda: sorted(BASE_METHODS))
    selection: str = option("smi", "which patches a stage removes: smi (least attended are stopped), random, "
                            "dense (never stop), rebirth (most attended leave as finished samples)",
                            choices=lambda: sorted(SELECTION_POLICIES))
    rebirth_divisions: int = option(4, "samples per trajectory for --selection rebirth, emitted at evenly "
                                    "spaced iterations (the schedule does not apply)")
    ce_weight: float = option(1.0, "weight of the cross-entropy to the target labels")
    tv_l2_weight: float = option(1e-4, "weight of the l2 total variation (the paper: 1e-4)")
    tv_l1_weight: float = option(0.0, "weight of the l1 total variation")
    l2_weight: float = option(0.0, "weight of the per-image l2 norm of the normalized image")
    input_stats_weight: float = option(0.0, "weight of matching the batch's pixel mean/variance to the "
                                       "teacher's normalization (DeepInversion's statistics prior on the "
                                       "only statistics a ViT keeps)")
    patch_similarity_weight: float = option(1.0, "weight of PSAQ-ViT's patch-similarity entropy "
                                            "(--base-method psaq)")
    competition_weight: float = option(0.0, "DeepInversion's adaptive competition: weight of 1 - JS(student, "
                                       "teacher) on the images the student still classifies as the teacher does, "
                                       "pushing them to where it disagrees; 0 disables it")
    soft_targets: float = option(0.0, "ZSKD's Dirichlet soft targets: each image is inverted towards a class "
                                 "distribution drawn from Dir(SCALE * similarity of its class to every class, read "
                                 "from the teacher's head weights) instead of its one-hot label; 0 keeps one-hot "
                                 "labels", metavar="SCALE")
    augment: str = option("patch", "patch: whole-patch roll and flip (exact, free); pixel: random resized "
                          "crops and flips of the whole image", choices=AUGMENTATIONS)
    jitter: float = option(0.125, "largest roll, as a fraction of the image side (--augment patch)")
    flip: bool = option(True, "random horizontal flips")
    crop_scale: tuple[float, float] = option((0.25, 1.0), "area range of the random resized crops "
                                             "(--augment pixel)")
    tie_channels: bool = option(False, "optimise one gray channel replicated over RGB, a prior for grayscale "
                                "teachers (the CLI turns it on for the teachers of its packaged grayscale datasets)")
    initial_noise: str = option("pixel", "what an inversion starts from: pixel (Gaussian noise per pixel, the "
                                "paper) or patch (one Gaussian value per patch, bilinearly upsampled: smooth blobs "
                                "without pixel-level texture)", choices=INITIAL_NOISE)
    frequency_decay: float = option(0.0, "Adam in each patch's cosine (DCT) basis, the steps of frequency f "
                                    "scaled by (1 + f)^-DECAY: 0 steps every pixel alike (the paper); larger "
                                    "shapes smooth regions instead of pixel-level texture", metavar="DECAY")
    seed: int = option(0, "seed of the initial noise and the augmentation")
    mean: Optional[tuple[float, ...]] = option(None, "input normalization mean overriding the teacher's "
                                               "pretrained_cfg")
    std: Optional[tuple[float, ...]] = option(None, "input normalization std overriding the teacher's "
                                              "pretrained_cfg")
    image_size: Optional[tuple[int, int]] = option(None, "(H, W) to invert at; default: the teacher's input size")
    log_every: int = option(10, "iterations between loss records (history and callback)")
    compile_step: bool = option(False, "torch.compile the step's forward, loss and backward (CUDA graphs on "
                                "a GPU); the first steps of each kept count pay the compilation")
    precision: str = option("float32", "the teacher's matmuls: float32, or bfloat16 autocast (about 2x faster on "
                            "large ViTs where the hardware multiplies bfloat16: AMX CPUs, recent GPUs; slower "
                            "elsewhere and on small ViTs); pixels, Adam, priors and losses stay float32",
                            choices=PRECISIONS)

    def __post_init__(self) -> None:
        check_positive_ints(self, "iterations", "batch_size", "log_every", "rebirth_divisions")
        self.schedule = resolve_schedule(self.schedule, self.iterations)
        self.betas = tuple(float(b) for b in self.betas)
        self.crop_scale = tuple(float(c) for c in self.crop_scale)
        for name in ("mean", "std", "image_size"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (int, float)):
                    value = (value, value) if name == "image_size" else (value,) * 3
                setattr(self, name, tuple(value))
        if not self.lr > 0:
            raise ValueError(f"InversionConfig.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"InversionConfig.betas must be two numbers in [0, 1), got {self.betas}")
        check_choice(self, "lr_schedule", LR_SCHEDULES)
        if self.warmup_iterations < 0 or self.warmup_iterations >= self.iterations:
            raise ValueError("InversionConfig.warmup_iterations must be in [0, iterations)")
        check_choice(self, "base_method", sorted(BASE_METHODS))
        check_choice(self, "selection", sorted(SELECTION_POLICIES))
        for name in ("frequency_decay", "ce_weight", "tv_l2_weight", "tv_l1_weight", "l2_weight", "input_stats_weight",
                     "patch_similarity_weight", "competition_weight", "soft_targets"):
            if getattr(self, name) < 0:
                raise ValueError(f"InversionConfig.{name} must be >= 0, got {getattr(self, name)}")
        check_choice(self, "augment", AUGMENTATIONS)
        check_choice(self, "initial_noise", INITIAL_NOISE)
        check_choice(self, "precision", PRECISIONS)
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ValueError(f"InversionConfig.crop_scale must be (low, high) with 0 < low <= high <= 1, "
                             f"got {self.crop_scale}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"InversionConfig.jitter is a fraction of the image side in [0, 1), got {self.jitter}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("InversionConfig.mean and .std must be given together (or both left to the teacher)")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"InversionConfig.std must be positive, got {self.std}")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ValueError(f"InversionConfig.image_size must be (H, W), got {self.image_size}")

    def late_stages(self) -> list[int]:
        """Stopping stages at or past the last iteration: they never apply."""
        return [i for i, _ in self.schedule.stages if i >= self.iterations]

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "InversionConfig":
        """A named recipe (``PRESETS``) with some fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown inversion preset {name!r}; use one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def resolve_schedule(schedule: "StoppingSchedule | str | None", iterations: int) -> StoppingSchedule:
    """A schedule from its text form; ``"paper-scaled"`` scales the paper's stages to ``iterations``,
    ``"paper-scaled:N"`` its first ``N`` stages."""
    if isinstance(schedule, str):
        name, colon, stages = (part.strip() for part in schedule.lower().partition(":"))
        if name == "paper-scaled":
            try:
                return StoppingSchedule.paper_scaled(iterations, int(stages) if colon else None)
            except ValueError as err:
                raise ValueError(f"schedule {schedule!r}: write 'paper-scaled', or 'paper-scaled:N' to keep the "
                                 f"first N of the paper's {len(PAPER_STAGES)} stages") from err
    return StoppingSchedule.parse(schedule)


# Named recipes: the CLI's --preset and the demo use these objects, never ad-hoc strings.
PRESETS: dict[str, dict[str, Any]] = {
    # The library's defaults: the paper's method with its stages scaled to a CPU-sized run.
    "default": {},
    # The paper's run as published (4000 iterations, stops at 50/100/200/300).
    "paper": {"iterations": 4000, "schedule": "paper"},
    # What makes a small grayscale teacher's inversions look like its data
    # (benchmarks/inversion_realism.py): crops, stronger TV, lr 0.1, the input-statistics prior.
    "data-like": {"batch_size": 64, "tie_channels": True, "augment": "pixel", "tv_l2_weight": 3e-2, "lr": 0.1,
                  "input_stats_weight": 1.0},
}
