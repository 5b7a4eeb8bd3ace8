"""Shared fixtures: tiny random-weight ViTs of each supported family, built with timm itself."""

from __future__ import annotations

import importlib.util
import sys
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import timm
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """A script of benchmarks/ (applications beside the package) as a module."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# (timm name, constructor overrides): one entry per supported family, kept tiny for speed.
FAMILIES = {
    "deit": ("deit_tiny_patch16_224", dict(depth=2, img_size=64)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(depth=2, img_size=64)),
    "registers": ("vit_tiny_patch16_224", dict(depth=2, img_size=64, reg_tokens=4)),
    "deit3_layerscale": ("deit3_small_patch16_224", dict(depth=2, img_size=64, embed_dim=96, num_heads=3)),
    "patch8": ("vit_tiny_patch16_224", dict(depth=2, img_size=64, patch_size=8)),
    "patch32": ("vit_base_patch32_224", dict(depth=1, img_size=128, embed_dim=96, num_heads=3)),
    "avg_pool": ("vit_tiny_patch16_224", dict(depth=2, img_size=64, global_pool="avg")),
    "zoo_shape": ("vit_tiny_patch16_224", dict(depth=2, img_size=32, patch_size=4, embed_dim=48, num_heads=3)),
}


def make_vit(name: str, seed: int = 0, num_classes: int = 10, **overrides) -> torch.nn.Module:
    """A random ViT whose prefix tokens and LayerScale gains are non-trivial (timm inits them near 0)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=num_classes, **overrides).eval()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if any(key in pname for key in ("cls_token", "reg_token", "dist_token", "gamma")):
                param.normal_(0, 0.5)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    return model


@pytest.fixture(params=sorted(FAMILIES), ids=sorted(FAMILIES))
def family_vit(request) -> torch.nn.Module:
    name, overrides = FAMILIES[request.param]
    return make_vit(name, **overrides)


@pytest.fixture
def tiny_vit() -> torch.nn.Module:
    name, overrides = FAMILIES["zoo_shape"]
    return make_vit(name, **overrides)


@pytest.fixture(scope="session")
def digits_teacher() -> torch.nn.Module:
    from smi_plugin import load_teacher

    return load_teacher("digits-vit")


@pytest.fixture(scope="session")
def digits_calibration(digits_teacher):
    """16 sparse inversions of the digits teacher (60 iterations, paper stages scaled): calibration data."""
    from smi_plugin import InversionConfig, SparseInvertedCalibrationDataset

    config = InversionConfig(iterations=60, batch_size=16, tie_channels=True)
    return SparseInvertedCalibrationDataset.from_inverter(digits_teacher, 16, config, progress=False)
