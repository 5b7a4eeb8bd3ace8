"""The models this project writes (distilled students), in timm's own Hub folder format.

A saved folder holds what ``timm.save_for_hf``/``push_to_hf_hub`` write, so timm loads it with no
import of this package (``timm.create_model("local-dir:DIR", pretrained=True)``, or
``"hf-hub:USER/REPO"`` once pushed):

* ``config.json``: ``architecture``, ``num_classes``, ``model_args`` (``timm.create_model`` keywords)
  and ``pretrained_cfg`` (``mean``, ``std``, ``input_size``...); the project's own card fields
  (accuracy, teacher, dataset, mode) sit under the ``smi_plugin`` key, which timm ignores;
* ``model.safetensors``: the state dict;
* ``README.md``: a model card saying what the model is and how to load it.

Folders of the previous form (``student.safetensors`` + ``student.json``) still load, with a note.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..io import atomic_path, atomic_write_text
from .errors import TeacherError

logger = logging.getLogger(__name__)

CONFIG, WEIGHTS, MODEL_CARD = "config.json", "model.safetensors", "README.md"
FORMAT, CARD_KEY = "smi-student/2", "smi_plugin"
# The previous form: weights + a card naming the timm architecture (read, no longer written).
SAVED_FORMAT, SAVED_WEIGHTS, SAVED_CARD = "smi-student/1", "student.safetensors", "student.json"
REQUIRED = ("architecture", "model_kwargs", "num_classes", "mean", "std")


def save_student(student: nn.Module, directory: str | os.PathLike, card: Mapping[str, Any]) -> Path:
    """Write ``student`` to ``directory`` as a timm Hub folder (``config.json``, ``model.safetensors``,
    ``README.md``); returns the directory. The zoo's own teachers are shipped in this form too.

    ``card`` must hold ``architecture`` (a timm name), ``model_kwargs`` (``timm.create_model``
    keywords, JSON values), ``num_classes``, ``mean`` and ``std``; ``input_size`` (C, H, W: the size
    it was trained at) is read from a ViT's patch grid unless given, and ``class_names`` becomes timm's
    ``label_names``; anything else (``accuracy``,
    ``teacher``, ``dataset``, ``mode``...) is kept under ``config.json``'s ``smi_plugin`` key and
    summarized in the model card. ``timm.create_model("local-dir:DIR", pretrained=True)`` and
    ``smi_plugin.load_teacher(DIR)`` both read it back.
    """
    from safetensors.torch import save_file

    missing = [k for k in REQUIRED if k not in card]
    if missing:
        raise ValueError(f"the student card lacks {missing}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = timm_config(student, card)
    weights = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    # config.json goes last: a folder with it is complete (each file is also written atomically).
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    atomic_write_text(out / MODEL_CARD, model_card(config, sum(v.numel() for v in weights.values())))
    atomic_write_text(out / CONFIG, json.dumps(config, indent=2, default=list) + "\n")
    for stale in (SAVED_CARD, SAVED_WEIGHTS):  # a save of the old form here: one model per folder
        (out / stale).unlink(missing_ok=True)
    return out


def timm_config(student: nn.Module, card: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config.json`` timm's ``save_config_for_hf`` would write for ``student``, plus ``card``'s extras."""
    num_classes = int(card["num_classes"])
    model_args = {**card["model_kwargs"], "num_classes": num_classes}
    own = getattr(student, "pretrained_cfg", None) or {}
    embed = getattr(student, "patch_embed", None)
    if "input_size" in card:  # the images it learnt from (the teacher's), whatever the architecture
        input_size = [int(v) for v in card["input_size"]]
    elif embed is not None and getattr(embed, "img_size", None) is not None:  # a ViT's fixed patch grid
        input_size = [int(embed.proj.in_channels), *(int(s) for s in embed.img_size)]
    elif "input_size" in own:
        input_size = [int(v) for v in own["input_size"]]
        logger.warning("saving %s with its architecture's default input size %s: put the size it was trained at "
                       "in the card's input_size", card["architecture"], tuple(input_size))
    else:
        raise ValueError("the student has no fixed patch grid; give its input_size (C, H, W) in the card")
    pretrained_cfg = {
        "custom_load": False, "input_size": input_size, "fixed_input_size": bool(own.get("fixed_input_size", True)),
        # The project evaluates by resizing the whole image (no crop), bilinear with antialiasing.
        "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
        "mean": [float(v) for v in card["mean"]], "std": [float(v) for v in card["std"]],
        "num_classes": num_classes, "pool_size": None,
        "first_conv": own.get("first_conv", "patch_embed.proj"), "classifier": own.get("classifier", "head"),
    }
    config: dict[str, Any] = {"architecture": card["architecture"], "num_classes": num_classes}
    if getattr(student, "num_features", None) is not None:
        config["num_features"] = int(student.num_features)
    if isinstance(getattr(student, "global_pool", None), str) and student.global_pool:
        config["global_pool"] = student.global_pool
    if card.get("class_names"):
        config["label_names"] = list(card["class_names"])
    config["model_args"] = model_args
    config["pretrained_cfg"] = pretrained_cfg
    # label_names is timm's own place for the class names; the rest of the card is the project's.
    config[CARD_KEY] = {"format": FORMAT, **{k: v for k, v in card.items() if k not in (*REQUIRED, "class_names")}}
    return config


def model_card(config: Mapping[str, Any], parameters: int) -> str:
    """A Hub model card (``README.md``) for a saved student: what it is, how well, how to load it."""
    extra, cfg = config[CARD_KEY], config["pretrained_cfg"]
    # A distilled student's card says "accuracy"; a zoo teacher's (trained on real data) "heldout_top1".
    accuracy = extra.get("accuracy", extra.get("heldout_top1"))
    channels, height, width = cfg["input_size"]
    if accuracy is None:
        measured = "It was not evaluated on real images."
    else:
        count = extra.get("eval_images", extra.get("heldout_images"))
        images = f"{count} " if count else ""
        measured = f"Top-1 on {images}held-out real images of `{extra.get('dataset', 'its data')}`: {accuracy:.2%}."
    if "recipe" in extra:
        how = (f"trained by smi-plugin on the real `{extra.get('dataset')}` training images, to serve as a "
               "teacher for Sparse Model Inversion")
    else:
        teacher = f" from the teacher `{extra['teacher']}`" if extra.get("teacher") else ""
        mode = f" ({extra['mode']})" if extra.get("mode") else ""
        how = (f"distilled{mode}{teacher} by smi-plugin on images inverted from the teacher alone (data-free "
               "knowledge distillation with Sparse Model Inversion)")
    tags = "".join(f"- {tag}\n" for tag in ("image-classification", "timm", "smi-plugin",
                                              *(() if "recipe" in extra else ("knowledge-distillation",))))
    mean, std = (", ".join(f"{v:.4g}" for v in cfg[key]) for key in ("mean", "std"))
    return f"""---
library_name: timm
pipeline_tag: image-classification
tags:
{tags}---

# {extra.get('name', config['architecture'])}

A timm `{config['architecture']}` ({parameters:,} parameters, {channels}x{height}x{width} input,
{config['num_classes']} classes), {how}. {measured}

Inputs are RGB in [0, 1], resized to {height}x{width} and normalized with mean ({mean}) and std ({std}),
as `config.json`'s `pretrained_cfg` says (where timm's data config reads them).

## Load with timm

```python
import timm

model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()  # or "hf-hub:USER/REPO"
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
```

## Load with smi-plugin

```python
from smi_plugin import load_teacher

model = load_teacher("PATH/TO/THIS/FOLDER")   # eval mode, normalization in model.pretrained_cfg
```
"""


def saved_form(directory: Path) -> str | None:
    """``"timm"`` for a timm Hub folder (``config.json`` with ``architecture`` and ``pretrained_cfg``),
    ``"transformers"`` for a ``save_pretrained`` folder, ``"legacy"`` for ``student.json``, else None."""
    config_path = directory / CONFIG
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise TeacherError(f"{config_path} is not readable JSON ({err}); save the model again") from err
        if isinstance(config, dict) and "architecture" in config:
            return "timm"
        if isinstance(config, dict) and ("model_type" in config or "architectures" in config):
            return "transformers"
    if (directory / SAVED_CARD).is_file():
        return "legacy"
    return None


def load_saved(directory: str | os.PathLike) -> nn.Module:
    """A saved model (``save_student``'s folder, any timm Hub folder, or the previous ``student.json``
    form) in eval mode, normalization in ``pretrained_cfg``."""
    import timm

    directory = Path(directory)
    form = saved_form(directory)
    if form == "legacy":
        return _load_legacy(directory)
    if form != "timm":
        raise TeacherError(f"{directory} holds no timm config.json; save the model with save_student or "
                           "timm's save_for_hf")
    config = json.loads((directory / CONFIG).read_text())
    try:
        model = timm.create_model(f"local-dir:{directory}", pretrained=True)
    except (RuntimeError, OSError, ValueError, KeyError, TypeError) as err:  # missing/mismatched weights, bad args
        raise TeacherError(f"{directory} does not load as the timm model its config.json names "
                           f"({str(err).splitlines()[0]}); save the model again") from err
    cfg = dict(model.pretrained_cfg)
    cfg.update(mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), architecture=config["architecture"],
               saved_dir=str(directory), model_kwargs=config.get("model_args", {}))
    if cfg.get("label_names"):
        cfg["label_names"] = tuple(cfg["label_names"])
    model.pretrained_cfg = cfg
    return model.eval()


def read_card(directory: Path) -> dict[str, Any]:
    """The card ``save_student`` was given, read back from ``directory/config.json``."""
    config = json.loads((directory / CONFIG).read_text())
    cfg = config["pretrained_cfg"]
    card = {k: v for k, v in config.get(CARD_KEY, {}).items() if k != "format"}
    card.update(architecture=config["architecture"], model_kwargs=config["model_args"],
                num_classes=config["num_classes"], mean=cfg["mean"], std=cfg["std"])
    if config.get("label_names"):
        card["class_names"] = config["label_names"]
    return card


def _load_legacy(directory: Path) -> nn.Module:
    import timm
    from safetensors.torch import load_file

    card = json.loads((directory / SAVED_CARD).read_text())
    if card.get("format") != SAVED_FORMAT:
        raise TeacherError(f"{directory / SAVED_CARD} is not a card this version reads (format "
                           f"{card.get('format')!r}, expected {SAVED_FORMAT!r}); save the model again")
    logger.warning("%s is in the old student.json form; re-save it with smi_plugin.zoo.save_student to get a "
                   "folder timm loads directly (config.json + model.safetensors)", directory)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in card["model_kwargs"].items()}
    kwargs["num_classes"] = card["num_classes"]
    model = timm.create_model(card["architecture"], pretrained=False, **kwargs)
    model.load_state_dict(load_file(str(directory / card.get("weights", SAVED_WEIGHTS))))
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(card["mean"]), "std": tuple(card["std"]),
                            "saved_dir": str(directory), "model_kwargs": card["model_kwargs"]}
    return model.eval()


def push_student_to_hub(directory: str | os.PathLike, repo_id: str, private: bool = True,
                        token: str | None = None) -> str:
    """Upload a folder ``save_student`` wrote to the Hugging Face Hub as the model repo ``repo_id``
    (created if needed); returns the repo's URL. timm then loads it as ``hf-hub:REPO_ID``.

    Raises ``ConnectionError`` with what to do when the Hub cannot be reached.
    """
    directory = Path(directory)
    if saved_form(directory) != "timm":
        raise TeacherError(f"{directory} is not a saved model folder (config.json + model.safetensors); "
                           "write it with save_student first")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConnectionError(f"cannot push to {repo_id!r}: HF_HUB_OFFLINE=1 is set. Unset it on a machine with "
                              "network access, log in with `huggingface-cli login` (or pass a token), and push "
                              f"again; the model is saved locally in {directory}")
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=token, library_name="smi-plugin")
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        # Only the model's own files: a distillation --out folder also holds curves and checkpoints.
        api.upload_folder(repo_id=url.repo_id, folder_path=str(directory),
                          allow_patterns=[CONFIG, WEIGHTS, MODEL_CARD], commit_message="Add model")
    except Exception as err:  # the hub client raises many types (HTTP, connection, auth)
        raise ConnectionError(f"could not push {directory} to the Hugging Face Hub as {repo_id!r}: {err}. Check the "
                              "network and your token (`huggingface-cli login`); the model is saved locally") from err
    return str(url)
