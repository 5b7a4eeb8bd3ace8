"""A user's own ViT checkpoint and image folder (not a zoo teacher) through every verb, end to end."""

import json
import os
import subprocess
import sys

import pytest
from conftest import readme_group, run_readme_commands
import timm
import torch
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
def test_invert_quantize_distill_with_own_model_and_images(own, tmp_path):
    _smi(own, "invert", "--num-images", "4", "--iterations", "8", "--out", str(tmp_path / "inverted"))
    import datasets

    assert len(datasets.load_from_disk(str(tmp_path / "inverted"))) == 4

    _smi(own, "quantize", "--iterations", "8", "--num-calibration", "8", "--eval-data", str(own / "images"),
         "--out", str(tmp_path / "int8"))
    card = json.loads((tmp_path / "int8" / "card.json").read_text())
    assert (tmp_path / "int8" / "model.pt2").is_file()
    # 30 real images from the folder were evaluated: accuracies are fractions of 30
    assert card["fp32_accuracy"] is not None and round(card["fp32_accuracy"] * 30, 6) % 1 == 0
    assert card["quantized_accuracy"] is not None

    result = _smi(own, "distill", "--mode", "full", "--num-images", "16", "--iterations", "8", "--steps", "4",
                  "--eval-every", "4", "--eval-data", str(own / "images"), "--out", str(tmp_path / "student"),
                  "--json", str(tmp_path / "kd.json"))
    report = json.loads((tmp_path / "kd.json").read_text())
    assert report["student_accuracy"] is not None and report["mode"] == "full"
    from smi_plugin import load_teacher

    student = load_teacher(str(tmp_path / "student"))
    assert student(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert "FAILED" in result.stderr or not report["failed"]  # a random teacher's student may well fail: say so


@pytest.mark.slow
def test_without_evaluation_data_the_model_is_still_made(own, tmp_path):
    result = _smi(own, "distill", "--mode", "full", "--num-images", "8", "--iterations", "4", "--steps", "2",
                  "--out", str(tmp_path / "student"), "--json", str(tmp_path / "kd.json"))
    report = json.loads((tmp_path / "kd.json").read_text())
    assert report["student_accuracy"] is None and report["teacher_accuracy"] is None
    assert (tmp_path / "student" / "student.safetensors").is_file()
    assert "nothing is evaluated" in result.stderr


@pytest.mark.slow
def test_readme_own_model_commands_run(tmp_path):
    run_readme_commands(readme_group("own model"), tmp_path)
    for name in ("own-int8/card.json", "own-student/student.json"):
        assert (tmp_path / "outputs/readme" / name).is_file(), name
