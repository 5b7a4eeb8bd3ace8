"""Hugging Face transformers ViT classifiers as the timm ViTs they are, by an exact remap of their weights.

A ``save_pretrained`` folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, and
the image processor's ``preprocessor_config.json``) of one of these architectures becomes the timm
model that computes the same logits:

* ``ViTForImageClassification``: ``VisionTransformer``, class-token pooled, LayerNorm eps from the config
  (transformers' 1e-12, not timm's 1e-6);
* ``DeiTForImageClassification``: the same, its distillation token kept as timm's one register token
  (transformers' DeiT always embeds it; this head reads the class token only);
* ``DeiTForImageClassificationWithTeacher``: ``VisionTransformerDistilled`` (``dist_token``,
  ``head_dist``), which in eval mode averages its two heads as transformers does;
* ``CLIPForImageClassification``: ``VisionTransformer`` with the pre-LayerNorm (``pre_norm=True``), no
  patch bias, quick-GELU, and the mean of the un-normed patch tokens (``global_pool="avg"``,
  ``final_norm=False``) fed to the classifier, as transformers' forward does.

Only ``json`` and ``safetensors``/``torch.load(weights_only=True)`` are needed: transformers itself is
never imported. Normalization and input size come from ``preprocessor_config.json``.
"""

from __future__ import annotations

import json
import logging
import re
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import TeacherError

logger = logging.getLogger(__name__)

# transformers architecture -> (family, timm architecture whose defaults the keywords override)
ARCHITECTURES = {
    "ViTForImageClassification": ("vit", "vit_base_patch16_224"),
    "DeiTForImageClassification": ("deit", "deit_base_patch16_224"),
    "DeiTForImageClassificationWithTeacher": ("deit-distilled", "deit_base_distilled_patch16_224"),
    "CLIPForImageClassification": ("clip", "vit_base_patch16_clip_224"),
}
ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def load_transformers_vit(directory: str | Path) -> nn.Module:
    """The timm equivalent of the transformers image classifier saved in ``directory``, in eval mode,
    with the processor's ``mean``/``std``/``input_size`` in ``model.pretrained_cfg``.

    Raises:
        TeacherError: an architecture other than those listed in this module, missing weights or
            processor config, or weights that do not fill the model.
    """
    import timm

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    names = config.get("architectures") or []
    known = [name for name in names if name in ARCHITECTURES]
    if not known:
        raise TeacherError(f"{directory} is a transformers {names or config.get('model_type')} model; supported "
                           f"are {sorted(ARCHITECTURES)}: save one of those, or a timm ViT checkpoint")
    family, timm_name = ARCHITECTURES[known[0]]
    vision = config.get("vision_config", config) if family == "clip" else config
    try:
        kwargs = _timm_kwargs(vision, family, config)
    except KeyError as err:
        raise TeacherError(f"{directory / 'config.json'} has no {err} for its {known[0]}; save the model again "
                           "with save_pretrained") from err
    model = timm.create_model(timm_name, pretrained=False, **kwargs)
    try:
        state_dict = _remap(read_transformers_weights(directory), family, int(vision["num_hidden_layers"]))
    except KeyError as err:
        raise TeacherError(f"{directory}'s weights have no {err}, which a {known[0]} has; save the model again "
                           "with save_pretrained") from err
    own = model.state_dict()
    problems = sorted(set(own) ^ set(state_dict)) + [k for k in own if k in state_dict
                                                       and own[k].shape != state_dict[k].shape]
    if problems:
        raise TeacherError(f"{directory}'s weights do not fill the timm model converted from its config.json "
                           f"(first: {problems[:3]}); save it again with save_pretrained")
    model.load_state_dict(state_dict)
    mean, std, size = _preprocessing(directory, int(kwargs["in_chans"]), kwargs["img_size"])
    cfg = dict(model.pretrained_cfg)
    cfg.update(mean=mean, std=std, input_size=size, num_classes=int(kwargs["num_classes"]),
               transformers_dir=str(directory), transformers_architecture=known[0])
    labels = config.get("id2label")
    if labels and len(labels) == kwargs["num_classes"]:
        cfg["label_names"] = tuple(labels[str(i)] for i in range(len(labels)))
    model.pretrained_cfg = cfg
    return model.eval()


def _timm_kwargs(vision: dict[str, Any], family: str, config: dict[str, Any]) -> dict[str, Any]:
    hidden, heads = int(vision["hidden_size"]), int(vision["num_attention_heads"])
    activation = vision.get("hidden_act", "quick_gelu" if family == "clip" else "gelu")
    if activation not in ACTIVATIONS:
        raise TeacherError(f"activation {activation!r} of this transformers model has no timm equivalent here "
                           f"(supported: {sorted(ACTIVATIONS)})")
    eps = float(vision.get("layer_norm_eps", 1e-5 if family == "clip" else 1e-12))
    num_classes = len(config["id2label"]) if config.get("id2label") else int(config.get("num_labels", 2))
    kwargs: dict[str, Any] = dict(
        img_size=int(vision["image_size"]), patch_size=int(vision["patch_size"]),
        in_chans=int(vision.get("num_channels", 3)), num_classes=num_classes, embed_dim=hidden,
        depth=int(vision["num_hidden_layers"]), num_heads=heads,
        mlp_ratio=int(vision["intermediate_size"]) / hidden, act_layer=ACTIVATIONS[activation],
        norm_layer=partial(nn.LayerNorm, eps=eps),
    )
    if family == "clip":
        kwargs.update(pre_norm=True, global_pool="avg", final_norm=False, fc_norm=False)
    else:
        kwargs.update(qkv_bias=bool(vision.get("qkv_bias", True)), global_pool="token")
    if family == "deit":
        kwargs["reg_tokens"] = 1
    return kwargs


def read_transformers_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The state dict of a ``save_pretrained`` folder (one file or shards), never unpickling code."""
    from safetensors.torch import load_file

    def read(path: Path) -> dict[str, torch.Tensor]:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)

    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return read(directory / name)
    for name in SHARD_INDEXES:
        if (directory / name).is_file():
            shards = sorted(set(json.loads((directory / name).read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in read(directory / shard).items()}
    raise TeacherError(f"{directory} has a transformers config.json but no weights ({', '.join(WEIGHT_FILES)}); "
                       "save the model with save_pretrained(DIR)")


def _remap(hf: dict[str, torch.Tensor], family: str, depth: int) -> dict[str, torch.Tensor]:
    """transformers keys -> timm keys; q, k and v are fused into timm's ``qkv``."""
    # Strip the wrapper prefixes ("vit.", "deit.", "vision_model." once or twice) down to the trunk.
    trunk = {re.sub(r"^(vit|deit|vision_model)\.((vision_model)\.)?", "", k): v for k, v in hf.items()}
    out: dict[str, torch.Tensor] = {}
    if family == "clip":
        out["cls_token"] = trunk["embeddings.class_embedding"].reshape(1, 1, -1)
        out["pos_embed"] = trunk["embeddings.position_embedding.weight"].unsqueeze(0)
        out["patch_embed.proj.weight"] = trunk["embeddings.patch_embedding.weight"]
        out["norm_pre.weight"], out["norm_pre.bias"] = trunk["pre_layrnorm.weight"], trunk["pre_layrnorm.bias"]
        layer, names = "encoder.layers.{}.", dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                                                  proj="self_attn.out_proj", norm1="layer_norm1",
                                                  norm2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2")
        out["head.weight"], out["head.bias"] = hf["classifier.weight"], hf["classifier.bias"]
    else:
        out["cls_token"] = trunk["embeddings.cls_token"]
        out["pos_embed"] = trunk["embeddings.position_embeddings"]
        out["patch_embed.proj.weight"] = trunk["embeddings.patch_embeddings.projection.weight"]
        out["patch_embed.proj.bias"] = trunk["embeddings.patch_embeddings.projection.bias"]
        out["norm.weight"], out["norm.bias"] = trunk["layernorm.weight"], trunk["layernorm.bias"]
        layer, names = "encoder.layer.{}.", dict(q="attention.attention.query", k="attention.attention.key",
                                                 v="attention.attention.value", proj="attention.output.dense",
                                                 norm1="layernorm_before", norm2="layernorm_after",
                                                 fc1="intermediate.dense", fc2="output.dense")
        if family == "deit":
            out["reg_token"] = trunk["embeddings.distillation_token"]
        if family == "deit-distilled":
            out["dist_token"] = trunk["embeddings.distillation_token"]
            _copy(out, "head", hf, "cls_classifier")
            _copy(out, "head_dist", hf, "distillation_classifier")
        else:
            _copy(out, "head", hf, "classifier")
    for i in range(depth):
        prefix = layer.format(i)
        for suffix in ("weight", "bias"):
            parts = [trunk.get(f"{prefix}{names[p]}.{suffix}") for p in "qkv"]
            if all(p is not None for p in parts):  # no biases when the config says qkv_bias=False
                out[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat(parts, 0)
            for timm_key, hf_key in (("attn.proj", "proj"), ("norm1", "norm1"), ("norm2", "norm2"),
                                     ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
                out[f"blocks.{i}.{timm_key}.{suffix}"] = trunk[f"{prefix}{names[hf_key]}.{suffix}"]
    return out


def _copy(out: dict[str, torch.Tensor], timm_prefix: str, hf: dict[str, torch.Tensor], hf_prefix: str) -> None:
    for suffix in ("weight", "bias"):
        out[f"{timm_prefix}.{suffix}"] = hf[f"{hf_prefix}.{suffix}"]


def _preprocessing(directory: Path, channels: int, image_size: int) -> tuple[tuple[float, ...], tuple[float, ...],
                                                                             tuple[int, int, int]]:
    """``mean``, ``std`` and ``input_size`` from the image processor's ``preprocessor_config.json``."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        raise TeacherError(f"{directory} has no preprocessor_config.json to read the normalization from; save the "
                           "image processor beside the model (processor.save_pretrained(DIR))")
    processor = json.loads(path.read_text())
    mean, std = processor.get("image_mean"), processor.get("image_std")
    if mean is None or std is None:
        raise TeacherError(f"{path} has no image_mean/image_std; save the model's image processor there")
    if isinstance(mean, (int, float)):
        mean, std = [mean] * channels, [std] * channels
    # The model's grid fixes its input size; the processor's crop (or size) should agree with it.
    size = processor.get("crop_size") if processor.get("do_center_crop") else processor.get("size")
    side = (size.get("height"), size.get("width")) if isinstance(size, dict) else (size, size)
    if None not in side and tuple(side) != (image_size, image_size):
        logger.warning("%s resizes to %s but the model's positional grid is %dx%d; using the model's size", path,
                       side, image_size, image_size)
    return (tuple(float(v) for v in mean), tuple(float(v) for v in std), (channels, image_size, image_size))
