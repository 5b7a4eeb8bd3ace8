"""Reading a user's checkpoint and saying, in one line, how it differs from the model it should fill."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from .errors import TeacherError


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
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


def suggest_architecture(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> str:
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


def load_matching(model: nn.Module, state_dict: dict[str, torch.Tensor], name: str, path: str | Path) -> None:
    problems = checkpoint_mismatch(model, state_dict)
    if problems:
        raise TeacherError(f"checkpoint {path} does not match {name} as created: {'; '.join(problems[:4])}"
                           f"{f' (and {len(problems) - 4} more)' if len(problems) > 4 else ''}. Create the model the checkpoint was trained "
                           f"as, e.g. {suggest_architecture(model, state_dict)}")
    model.load_state_dict(state_dict)




def match_classifier(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Resize ``model``'s classifier to the checkpoint's (a fine-tuned checkpoint of an ImageNet-sized
    timm architecture), found as the tensor named like the model's own classifier weight."""
    weight = getattr(model.get_classifier(), "weight", None)
    key = next((name for name, parameter in model.named_parameters() if parameter is weight), None)
    stored = state_dict.get(key) if key else None
    if stored is not None and stored.ndim == 2 and stored.shape[0] != model.num_classes:
        model.reset_classifier(int(stored.shape[0]))
