"""Shared fixtures: tiny random-weight ViTs of each supported family, built with timm itself."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
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


# What a ``slow`` test without ``seconds=`` counts for when ordering files.
SLOW_TEST_SECONDS = 10


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files in decreasing order of their slow tests' ``slow(seconds=N)`` (their time in the suite on a
    2-core CPU), so that pytest-xdist's ``--dist loadfile --no-loadscope-reorder`` hands the longest files
    out first and the two workers end together (by default xdist orders files by their number of tests,
    which started the two longest, a test each, last)."""
    seconds: dict[Path, float] = {}
    for item in items:
        marker = item.get_closest_marker("slow")
        if marker is not None:
            seconds[item.path] = seconds.get(item.path, 0) + marker.kwargs.get("seconds", SLOW_TEST_SECONDS)
    items.sort(key=lambda item: -seconds.get(item.path, 0))  # stable: a file's tests keep their order


# The files whose code blocks a reader runs: the README, then the guides in the order their Python blocks build on
# each other (the inversion guide's ``teacher``, ``config`` and ``batch`` are used by the guides after it).
DOC_FILES = ("README.md", "docs/guides/inversion.md", "docs/guides/selection-policies.md",
             "docs/guides/quantization.md", "docs/guides/distillation.md", "docs/guides/distributed-and-export.md",
             "docs/guides/own-model-and-data.md", "docs/guides/other-machines.md")
# A block preceded by this HTML comment (with a reason after the colon) is shown, not run.
NOT_RUN = "<!-- not run:"


def fenced_blocks(text: str, language: str) -> list[tuple[str, str | None]]:
    """``text``'s fenced code blocks in ``language``, each with the reason it is not run (``None``: it runs)."""
    pattern = rf"(?:<!-- not run:(?P<reason>[^>]*)-->\s*)?```{language}\n(?P<code>.*?)```"
    return [(match["code"], None if match["reason"] is None else match["reason"].strip())
            for match in re.finditer(pattern, text, flags=re.S)]


def readme_blocks(language: str) -> list[str]:
    """The fenced code blocks in ``language`` of the README and the guides (``DOC_FILES``) that run, in order."""
    return [code for path in DOC_FILES for code, reason in fenced_blocks((ROOT / path).read_text(), language)
            if reason is None]


def readme_commands() -> list[str]:
    """Every shell command of the README and the guides that runs something of the checkout (``.venv/bin/...``)."""
    return [line for block in readme_blocks("bash") for line in block.replace("\\\n", " ").splitlines()
            if line.startswith(".venv/bin/")]


# The commands of the README and the guides in independent groups, each tested in its own file so the suite runs
# them side by side: the speed benchmark, the bring-your-own-model chain, and the rest (the Python blocks follow it).
README_GROUPS = {"benchmark": lambda command: " bench " in command,
                 "own model": lambda command: "outputs/readme/own" in command}


def readme_group(name: str) -> list[str]:
    """The README commands of group ``name`` (a key of ``README_GROUPS``, or ``"rest"``), in README order."""
    if name in README_GROUPS:
        return [command for command in readme_commands() if README_GROUPS[name](command)]
    return [command for command in readme_commands() if not any(test(command) for test in README_GROUPS.values())]


README_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_readme_commands(commands: list[str], cwd: Path) -> None:
    """Run ``commands`` as a reader would, in ``cwd``: repository scripts by their path in the checkout."""
    bin_dir = Path(sys.executable).parent
    for command in commands:
        command = command.replace(".venv/bin/", f"{bin_dir}/")
        command = re.sub(r" (examples|benchmarks)/", rf" {ROOT}/\1/", command)
        result = subprocess.run(command, shell=True, cwd=cwd, env=README_ENV, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"


# (timm name, constructor overrides): one entry per supported family, kept tiny for speed.
FAMILIES = {
    "deit": ("deit_tiny_patch16_224", dict(depth=2, img_size=64)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(depth=2, img_size=64)),
    "registers": ("vit_tiny_patch16_224", dict(depth=2, img_size=64, reg_tokens=4)),
    "deit3_layerscale": ("deit3_small_patch16_224", dict(depth=2, img_size=64, embed_dim=96, num_heads=3)),
    "patch8": ("vit_tiny_patch16_224", dict(depth=2, img_size=64, patch_size=8)),
    "patch32": ("vit_base_patch32_224", dict(depth=1, img_size=128, embed_dim=96, num_heads=3)),
    "avg_pool": ("vit_tiny_patch16_224", dict(depth=2, img_size=64, global_pool="avg")),
    "qk_norm": ("vit_tiny_patch16_224", dict(depth=2, img_size=64, qk_norm=True)),
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


def real_digits(teacher: torch.nn.Module, count: int = 64) -> torch.Tensor:
    """The first ``count`` real held-out digits, normalized as ``teacher`` expects."""
    from smi_plugin.data import load_split
    from smi_plugin.images import model_normalization, normalize

    return normalize(load_split("digits", "test").images(slice(0, count)), *model_normalization(teacher))


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
