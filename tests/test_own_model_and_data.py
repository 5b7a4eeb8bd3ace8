"""A user's own ViT checkpoint and image folder (not a zoo teacher) through the verbs, end to end (``smi invert``
with a user's checkpoint is tested in process in test_cli.py)."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from conftest import readme_group, run_readme_commands
from PIL import Image
from safetensors.torch import save_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
KWARGS = ["img_size=32", "patch_size=4", "embed_dim=96", "depth=4", "num_heads=3"]
NORMALIZATION = ["--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, embed_dim=96,
                              depth=4, num_heads=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "vit.safetensors"))
    generator = torch.Generator().manual_seed(1)
    for label in range(10):
        folder = root / "images" / f"class_{label}"
        folder.mkdir(parents=True)
        for index in range(3):
            pixels = (torch.rand(40, 40, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{index}.png")  # 40x40 RGB: resized to the teacher's 32
    return root


def _smi(own, command, *extra):
    args = [sys.executable, "-m", "smi_plugin.cli", command, "--teacher", "vit_tiny_patch16_224",
            "--checkpoint", str(own / "vit.safetensors"), "--num-classes", "10", "--model-kwargs", *KWARGS,
            *NORMALIZATION, *extra]
    result = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_without_evaluation_data_the_model_is_still_made(own, tmp_path):
    result = _smi(own, "distill", "--mode", "full", "--num-images", "8", "--iterations", "4", "--steps", "2",
                  "--out", str(tmp_path / "student"), "--json", str(tmp_path / "kd.json"))
    report = json.loads((tmp_path / "kd.json").read_text())
    assert report["student_accuracy"] is None and report["teacher_accuracy"] is None
    assert (tmp_path / "student" / "model.safetensors").is_file()
    assert "nothing is evaluated" in result.stderr


@pytest.mark.slow(seconds=100)
def test_readme_own_model_commands_quantize_and_distill_the_users_model(tmp_path):
    """The README's chain: a user's ViT trained on the user's image folder (examples/own_model_and_data.py),
    then ``smi quantize`` and ``smi distill`` with ``--checkpoint``, ``--model-kwargs`` and ``--eval-data``."""
    run_readme_commands(readme_group("own model"), tmp_path)
    root = tmp_path / "outputs/readme"
    images = len(list((root / "own/images").rglob("*.png")))
    card = json.loads((root / "own-int8/card.json").read_text())
    assert (root / "own-int8/model.pt2").is_file() and card["evaluation"]["images"] == min(images, 200)
    # accuracies on the folder's real images: fractions of the images evaluated, and the teacher learnt them
    assert round(card["fp32_accuracy"] * card["evaluation"]["images"], 4) % 1 == 0 and card["fp32_accuracy"] > 0.5
    assert card["quantized_accuracy"] is not None
    from smi_plugin import load_teacher
    from smi_plugin.zoo.saved import read_card

    student_card = read_card(root / "own-student")  # the card in the student's timm config.json
    assert student_card["mode"] == "full" and student_card["dataset"] == "outputs/readme/own/images"
    from smi_plugin.distill import failed

    # a short run may well fail: then the card says so (the check the replaced own-model test made)
    assert student_card["failed"] == failed(student_card["accuracy"], 10)
    assert load_teacher(str(root / "own-student"))(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
