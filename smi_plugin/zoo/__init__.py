"""A small zoo of real teachers: timm ViTs trained here on real data that ships in packages.

Each teacher is a safetensors file plus a JSON card (architecture, recipe, seed, normalization,
measured held-out top-1) beside this module. Loading goes through timm's own machinery
(``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))``), the same path
a user takes with hub weights or their own checkpoint, so nothing here is special-cased.

Example:
    >>> teacher = load_teacher("digits-vit")                         # a zoo name
    >>> teacher = load_teacher("deit_tiny_patch16_224", pretrained=True)   # timm hub weights
    >>> teacher = load_teacher("deit_tiny_patch16_224", checkpoint_path="ft.safetensors", num_classes=10)
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigBase, check_choice, check_positive_ints
from ..data import DATASETS, load_split
from ..evaluation import evaluate_accuracy
from ..images import normalize

ZOO_DIR = Path(__file__).resolve().parent
BASE_ARCHITECTURE = "vit_tiny_patch16_224"


@dataclass(frozen=True)
class TeacherRecipe(ConfigBase):
    """How a zoo teacher is built and trained (all on the CPU, reproducibly).

    Args:
        dataset: real dataset the teacher is trained on (one of ``smi_plugin.data.DATASETS``).
        embed_dim, depth, num_heads, patch_size: ViT shape at 32x32 input.
        epochs, batch_size, lr, weight_decay, warmup_epochs, label_smoothing: AdamW + cosine recipe.
        max_rotation_deg, max_translate, scale_range, hflip: light per-sample affine augmentation.
        seed: seed of weights init, shuffling and augmentation.
        classes: train on these classes only (None: all); the head still has one output per class.
        init_from: start from this zoo teacher's weights (its head is kept: same classes).
        restart_epochs, restart_lr: a second cosine phase (warm restart) at a lower learning rate
            without rotation/scale augmentation, with its own generator (seed + 1).
    """

    dataset: str
    epochs: int
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    patch_size: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    max_rotation_deg: float = 10.0
    max_translate: float = 0.08
    scale_range: tuple[float, float] = (0.9, 1.1)
    hflip: bool = False
    seed: int = 0
    classes: tuple[int, ...] | None = None
    init_from: str | None = None
    restart_epochs: int = 0
    restart_lr: float = 5e-4

    def __post_init__(self) -> None:
        check_choice(self, "dataset", DATASETS)
        check_positive_ints(self, "epochs", "embed_dim", "depth", "num_heads", "patch_size", "batch_size")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"TeacherRecipe.embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    def model_kwargs(self, num_classes: int) -> dict[str, Any]:
        return dict(img_size=32, patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth,
                    num_heads=self.num_heads, num_classes=num_classes)


RECIPES: dict[str, TeacherRecipe] = {
    "fashion-mnist-vit": TeacherRecipe(dataset="fashion-mnist", epochs=12, hflip=True, max_rotation_deg=5.0,
                                       restart_epochs=10),
    "digits-vit": TeacherRecipe(dataset="digits", epochs=60, batch_size=64, lr=1e-3),
    # Small items anywhere on a dark canvas: the teacher must locate the object, so its last-block
    # CLS attention marks the foreground (benchmarks/attention_foreground.py), as SMI assumes.
    "fashion-mnist-scattered-vit": TeacherRecipe(dataset="fashion-mnist-scattered", epochs=6, hflip=True,
                                                 max_rotation_deg=5.0),
    # The paper's knowledge-transfer setting, scaled down: a backbone pretrained on real images of
    # half the classes (as ImageNet pretraining), a teacher fine-tuned from it on all classes; a
    # student = backbone + new head then learns the other classes from inverted images only.
    "fashion-mnist-backbone": TeacherRecipe(dataset="fashion-mnist", epochs=6, hflip=True, max_rotation_deg=5.0,
                                            classes=(0, 1, 2, 3, 4)),
    "fashion-mnist-vit-ft": TeacherRecipe(dataset="fashion-mnist", epochs=3, hflip=True, max_rotation_deg=5.0,
                                          lr=5e-4, warmup_epochs=0, init_from="fashion-mnist-backbone"),
}


class TeacherError(ValueError):
    """A teacher name, checkpoint or card that cannot be used, with what to do instead."""


def zoo_names() -> list[str]:
    return sorted(RECIPES)


def card_path(name: str) -> Path:
    return ZOO_DIR / f"{name}.json"


def weights_path(name: str) -> Path:
    return ZOO_DIR / f"{name}.safetensors"


def load_card(name: str) -> dict[str, Any]:
    """The JSON card of a shipped zoo teacher."""
    if name not in RECIPES:
        raise TeacherError(f"unknown zoo teacher {name!r}; zoo teachers are {zoo_names()}")
    path = card_path(name)
    if not path.is_file() or not weights_path(name).is_file():
        raise TeacherError(f"zoo teacher {name!r} has no trained weights at {weights_path(name)}; "
                           f"train it with `smi train-teacher {name}`")
    return json.loads(path.read_text())


def load_teacher(name: str, *, pretrained: bool = False, checkpoint_path: str | None = None,
                 num_classes: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, **model_kwargs: Any) -> nn.Module:
    """Create a teacher by zoo name or any timm model name, in eval mode.

    Args:
        name: a zoo name (``fashion-mnist-vit``, ``digits-vit``), a timm model name, or a directory a
            distilled student was saved to (``smi distill --out DIR``).
        pretrained: for timm names, load timm's pretrained weights (downloads from the hub).
        checkpoint_path: for timm names, a local checkpoint (``.safetensors``, or a ``.pth``/``.pt``
            state dict, optionally under a ``state_dict``/``model``/``state_dict_ema`` key) to load.
        num_classes: classifier size for timm names (defaults to the checkpoint's, else the model's).
        mean, std: the normalization the weights were trained with, per channel in ``[0, 1]`` pixel
            units; stored in ``model.pretrained_cfg`` so inversion, calibration and evaluation all use it.
        **model_kwargs: forwarded to ``timm.create_model`` (``img_size``, ``patch_size``, ``embed_dim``...).

    Raises:
        TeacherError: unknown name, missing/corrupt/mismatched checkpoint, bad normalization; the
            message says what to change.
    """
    import timm

    saved = (Path(name) / SAVED_CARD).is_file()
    if saved or name in RECIPES:
        what = "a saved model" if saved else "a zoo teacher"
        if pretrained or checkpoint_path:
            raise TeacherError(f"{name!r} is {what} and carries its own weights; drop --pretrained/--checkpoint")
        if num_classes is not None or model_kwargs:
            raise TeacherError(f"{name!r} is {what} with a fixed architecture; drop --num-classes/"
                               "--model-kwargs, or pass its timm architecture name with --checkpoint")
    if saved:
        return _set_normalization(load_saved(Path(name)), mean, std)
    if name in RECIPES:
        card = load_card(name)
        overlay = dict(file=str(weights_path(name)), num_classes=card["num_classes"],
                       mean=tuple(card["mean"]), std=tuple(card["std"]), input_size=(3, 32, 32),
                       label_names=tuple(card["class_names"]))
        model = timm.create_model(card["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                                  **card["model_kwargs"])
        model.pretrained_cfg["zoo_name"] = name
        return _set_normalization(model, mean, std).eval()

    if not timm.is_model(name):
        raise TeacherError(f"unknown teacher {name!r}: not a zoo teacher ({zoo_names()}) and not a timm "
                           "model name (see `timm.list_models()`)")
    if num_classes is not None:
        model_kwargs["num_classes"] = num_classes
    state_dict = _read_checkpoint(checkpoint_path) if checkpoint_path else None  # before any model is built
    try:
        model = timm.create_model(name, pretrained=pretrained, **model_kwargs)
    except TypeError as err:  # an unknown keyword reaches a model constructor
        raise TeacherError(f"{name} does not accept --model-kwargs {model_kwargs}: {err}") from err
    if state_dict is not None:
        if num_classes is None:
            _match_classifier(model, state_dict)
        _load_matching(model, state_dict, name, checkpoint_path)
    return _set_normalization(model, mean, std).eval()


def _match_classifier(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Resize ``model``'s classifier to the checkpoint's (a fine-tuned checkpoint of an ImageNet-sized
    timm architecture), found as the tensor named like the model's own classifier weight."""
    weight = getattr(model.get_classifier(), "weight", None)
    key = next((name for name, parameter in model.named_parameters() if parameter is weight), None)
    stored = state_dict.get(key) if key else None
    if stored is not None and stored.ndim == 2 and stored.shape[0] != model.num_classes:
        model.reset_classifier(int(stored.shape[0]))


# A model saved for timm users (a distilled student): weights + a card naming its timm architecture.
SAVED_FORMAT, SAVED_WEIGHTS, SAVED_CARD = "smi-student/1", "student.safetensors", "student.json"


def load_saved(directory: Path) -> nn.Module:
    """The model ``smi_plugin.distill.save_student`` wrote, in eval mode, normalization in ``pretrained_cfg``."""
    import timm
    from safetensors.torch import load_file

    card = json.loads((directory / SAVED_CARD).read_text())
    if card.get("format") != SAVED_FORMAT:
        raise TeacherError(f"{directory / SAVED_CARD} is not a card this version writes (format "
                           f"{card.get('format')!r}, expected {SAVED_FORMAT!r}); save the model again")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in card["model_kwargs"].items()}
    kwargs["num_classes"] = card["num_classes"]
    model = timm.create_model(card["architecture"], pretrained=False, **kwargs)
    model.load_state_dict(load_file(str(directory / card.get("weights", SAVED_WEIGHTS))))
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(card["mean"]), "std": tuple(card["std"]),
                            "saved_dir": str(directory), "model_kwargs": card["model_kwargs"]}
    return model.eval()


def _set_normalization(model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None) -> nn.Module:
    """Record ``mean``/``std`` in ``pretrained_cfg``: every later step reads normalization from there."""
    if mean is None and std is None:
        return model
    if mean is None or std is None:
        raise TeacherError("give both --mean and --std (the normalization the weights were trained with)")
    channels = int(getattr(getattr(model, "patch_embed", None), "proj", nn.Conv2d(3, 1, 1)).in_channels)
    for label, values in (("mean", mean), ("std", std)):
        if len(values) != channels:
            raise TeacherError(f"--{label} needs one value per input channel ({channels}), got {list(values)}")
    if any(float(s) <= 0 for s in std):
        raise TeacherError(f"--std values must be positive, got {list(std)}")
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
    model.pretrained_cfg = cfg
    return model


def _read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch checkpoint, never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"checkpoint not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(16)
    # safetensors starts with an 8-byte little-endian header length then '{'; sniffing (rather than
    # trusting the suffix) lets a renamed file still load and gives the right message when corrupt.
    looks_safetensors = path.suffix == ".safetensors" or (len(head) > 8 and head[8:9] == b"{")
    if looks_safetensors:
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises SafetensorError, OSError or ValueError
            raise TeacherError(f"checkpoint {path} is not a valid safetensors file ({err}); re-save it with "
                               "safetensors.torch.save_file(model.state_dict(), PATH)") from err
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and unpickler errors all mean "not a plain state dict"
        raise TeacherError(f"checkpoint {path} is not a torch checkpoint holding a state dict of tensors "
                           f"({type(err).__name__}); save one with torch.save(model.state_dict(), PATH) or "
                           "safetensors.torch.save_file(model.state_dict(), PATH)") from err
    if isinstance(loaded, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):  # timm/train.py and common trainers
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not loaded or not all(torch.is_tensor(v) for v in loaded.values()):
        raise TeacherError(f"checkpoint {path} is a torch file but not a state dict of tensors (got "
                           f"{type(loaded).__name__}); save one with torch.save(model.state_dict(), PATH)")
    # DataParallel/DistributedDataParallel and torch.compile prefix every key.
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in loaded.items()}


def checkpoint_mismatch(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between a model's parameters and a state dict (empty: they match)."""
    own = model.state_dict()
    # The shapes that reveal the architecture (input size, patch size, width, classes) come first.
    telling = ("pos_embed", "head.weight", "patch_embed.proj.weight")
    order = sorted(own, key=lambda k: telling.index(k) if k in telling else len(telling))
    problems = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                for k in order if k in state_dict and state_dict[k].shape != own[k].shape]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing:
        problems.append(f"missing from checkpoint: {_few(missing)}")
    if unexpected:
        problems.append(f"not in model: {_few(unexpected)}")
    return problems


def _few(keys: list[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _suggest_architecture(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> str:
    """The ``--model-kwargs``/``--num-classes`` a ViT checkpoint implies, read from its tensor shapes."""
    hints: list[str] = []
    proj = state_dict.get("patch_embed.proj.weight")
    pos = state_dict.get("pos_embed")
    if proj is not None and proj.ndim == 4:
        patch = int(proj.shape[-1])
        if pos is not None and pos.ndim == 3:
            prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
            side = math.isqrt(max(int(pos.shape[1]) - prefix, 0))
            if side * side == int(pos.shape[1]) - prefix and side:
                hints.append(f"img_size={side * patch}")
        hints += [f"patch_size={patch}", f"embed_dim={int(proj.shape[0])}"]
    depth = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    if depth:
        hints.append(f"depth={max(depth) + 1}")
    text = f"--model-kwargs {' '.join(hints)} (and num_heads=...)" if hints else \
        "--model-kwargs img_size=... patch_size=... embed_dim=... depth=... num_heads=..."
    head = state_dict.get("head.weight")
    if head is not None and head.ndim == 2:
        text += f" --num-classes {int(head.shape[0])}"
    else:
        text += " --num-classes N"
    return text


def _load_matching(model: nn.Module, state_dict: dict[str, torch.Tensor], name: str, path: str | Path) -> None:
    problems = checkpoint_mismatch(model, state_dict)
    if problems:
        raise TeacherError(f"checkpoint {path} does not match {name} as created: {'; '.join(problems[:4])}"
                           f"{f' (and {len(problems) - 4} more)' if len(problems) > 4 else ''}. Create the model the checkpoint was trained "
                           f"as, e.g. {_suggest_architecture(model, state_dict)}")
    model.load_state_dict(state_dict)


def _augment(images: torch.Tensor, recipe: TeacherRecipe, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random affine (rotation, scale, translation) and optional horizontal flip."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(recipe.max_rotation_deg)
    low, high = recipe.scale_range
    scale = low + torch.rand(n, generator=generator) * (high - low)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * recipe.max_translate * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    if recipe.hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        theta[flip, :, 0] *= -1
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _train_phase(model: nn.Module, train, recipe: TeacherRecipe, mean, std, epochs: int, lr: float,
                 warmup_epochs: int, generator: torch.Generator, desc: str, log_every: int) -> None:
    """AdamW with linear warm-up then cosine decay over ``epochs``."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    total, warmup = epochs * steps_per_epoch, max(1, warmup_epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / total))))
    bar = tqdm(total=total, desc=desc, unit="step")
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), recipe.batch_size):
            index = order[start:start + recipe.batch_size]
            images = _augment(train.images(index), recipe, generator)
            loss = F.cross_entropy(model(normalize(images, mean, std)), train.labels[index],
                                   label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            if bar.n % log_every == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()


def train_teacher(name: str, out_dir: str | Path = ZOO_DIR, epochs: int | None = None, log_every: int = 100,
                  phase1_checkpoint: str | Path | None = None) -> dict[str, Any]:
    """Train a zoo teacher from its recipe and write ``NAME.safetensors`` and ``NAME.json``.

    ``phase1_checkpoint`` skips the first phase by loading its result (written by this recipe);
    the warm-restart phase uses its own generator, so the outcome matches a full run.
    Returns the card (which records the measured held-out top-1).
    """
    import timm
    from safetensors.torch import load_file, save_file

    from ..io import atomic_write_text, atomic_path

    if name not in RECIPES:
        raise TeacherError(f"unknown zoo teacher {name!r}; zoo teachers are {zoo_names()}")
    recipe = RECIPES[name]
    if epochs is not None:
        recipe = recipe.replace(epochs=epochs)
    torch.manual_seed(recipe.seed)
    started = time.time()
    train, test = load_split(recipe.dataset, "train"), load_split(recipe.dataset, "test")
    mean, std = train.channel_stats()
    if recipe.init_from:
        mean, std = (tuple(v) for v in (load_card(recipe.init_from)["mean"], load_card(recipe.init_from)["std"]))
    if recipe.classes is not None:
        train = train.subset(torch.isin(train.labels, torch.tensor(recipe.classes)))
    model_kwargs = recipe.model_kwargs(train.num_classes)
    model = timm.create_model(BASE_ARCHITECTURE, pretrained=False, **model_kwargs)
    if recipe.init_from:
        model.load_state_dict(load_teacher(recipe.init_from).state_dict())
    if phase1_checkpoint is not None:
        model.load_state_dict(load_file(str(phase1_checkpoint)))
    else:
        _train_phase(model, train, recipe, mean, std, recipe.epochs, recipe.lr, recipe.warmup_epochs,
                     torch.Generator().manual_seed(recipe.seed), f"training {name}", log_every)
    if recipe.restart_epochs:
        gentle = recipe.replace(max_rotation_deg=0.0, scale_range=(1.0, 1.0))
        _train_phase(model, train, gentle, mean, std, recipe.restart_epochs, recipe.restart_lr, 0,
                     torch.Generator().manual_seed(recipe.seed + 1), f"training {name} (restart)", log_every)
    accuracy = evaluate_accuracy(model, test, mean, std)
    trained_classes = list(recipe.classes) if recipe.classes is not None else list(range(train.num_classes))
    accuracy_trained = evaluate_accuracy(model, test.subset(torch.isin(test.labels, torch.tensor(trained_classes))),
                                         mean, std)
    card = dict(name=name, architecture=BASE_ARCHITECTURE, model_kwargs=model_kwargs,
                num_classes=train.num_classes, class_names=list(train.class_names), dataset=recipe.dataset,
                mean=list(mean), std=list(std), recipe=recipe.to_dict(), heldout_top1=accuracy,
                trained_classes=trained_classes, heldout_top1_trained_classes=accuracy_trained,
                heldout_images=len(test), train_seconds=round(time.time() - started, 1),
                phase1_from_checkpoint=phase1_checkpoint is not None,
                parameters=sum(p.numel() for p in model.parameters()),
                torch_version=torch.__version__, timm_version=timm.__version__)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / f"{name}.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"card": json.dumps(card)})
    atomic_write_text(out / f"{name}.json", json.dumps(card, indent=2) + "\n")
    return card
