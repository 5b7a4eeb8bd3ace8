"""Hugging Face transformers ViT, DeiT (distilled) and CLIP classifiers as teachers: ``load_teacher(DIR)``
on a ``save_pretrained`` folder computes transformers' own logits, and the verbs run on one."""

import json
import os

import pytest
import torch

from smi_plugin import load_teacher
from smi_plugin.tokens import check_vit
from smi_plugin.zoo import TeacherError

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

SHAPE = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
             intermediate_size=96)
MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def _save(model, processor, directory):
    torch.manual_seed(1)
    with torch.no_grad():  # off their init (unit LayerNorms, zero biases), so every misplaced tensor shows
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model.eval()


def _vit(directory):
    config = transformers.ViTConfig(**SHAPE, num_labels=10, hidden_act="gelu")
    processor = transformers.ViTImageProcessor(image_mean=MEAN, image_std=STD, size={"height": 32, "width": 32})
    return _save(transformers.ViTForImageClassification(config), processor, directory)


def _deit_distilled(directory):
    config = transformers.DeiTConfig(**SHAPE, num_labels=10)
    processor = transformers.ViTImageProcessor(image_mean=MEAN, image_std=STD, size={"height": 32, "width": 32})
    return _save(transformers.DeiTForImageClassificationWithTeacher(config), processor, directory)


def _deit(directory):
    config = transformers.DeiTConfig(**SHAPE, num_labels=10, qkv_bias=False)
    processor = transformers.ViTImageProcessor(image_mean=MEAN, image_std=STD, size={"height": 32, "width": 32})
    return _save(transformers.DeiTForImageClassification(config), processor, directory)


def _clip(directory):
    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                projection_dim=16)
    config = transformers.CLIPConfig(text_config=text, vision_config=dict(**SHAPE, hidden_act="quick_gelu",
                                                                          projection_dim=16), num_labels=10)
    processor = transformers.CLIPImageProcessor(image_mean=MEAN, image_std=STD, size={"shortest_edge": 32},
                                                crop_size={"height": 32, "width": 32})
    return _save(transformers.CLIPForImageClassification(config), processor, directory)


BUILDERS = {"vit": _vit, "deit": _deit, "deit-distilled": _deit_distilled, "clip": _clip}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformers")
    return {name: (root / name, build(root / name)) for name, build in BUILDERS.items()}


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_a_transformers_folder_loads_as_the_timm_vit_with_the_same_logits(folders, family):
    directory, reference = folders[family]
    teacher = load_teacher(str(directory))
    check_vit(teacher)
    assert teacher.pretrained_cfg["mean"] == tuple(MEAN) and teacher.pretrained_cfg["std"] == tuple(STD)
    assert tuple(teacher.pretrained_cfg["input_size"]) == (3, 32, 32) and teacher.num_classes == 10
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), reference(pixel_values=x).logits, atol=1e-4)


def test_an_unsupported_or_incomplete_transformers_folder_is_one_line(tmp_path, folders):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "swin",
                                                      "architectures": ["SwinForImageClassification"]}))
    with pytest.raises(TeacherError, match="SwinForImageClassification.*supported are") as info:
        load_teacher(str(tmp_path))
    assert "\n" not in str(info.value)
    with pytest.raises(TeacherError, match="carries its own weights"):
        load_teacher(str(tmp_path), pretrained=True)
    config = json.loads((folders["vit"][0] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TeacherError, match="no weights"):
        load_teacher(str(tmp_path))
    del config["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TeacherError, match="has no 'hidden_size'"):
        load_teacher(str(tmp_path))


def test_smi_invert_and_quantize_take_a_transformers_folder(folders, tmp_path):
    from smi_plugin.cli import main

    directory = str(folders["vit"][0])
    main(["invert", "--teacher", directory, "--num-images", "2", "--iterations", "2", "--out",
          str(tmp_path / "inv"), "--quiet"])
    manifest = json.loads((tmp_path / "inv" / "manifest.json").read_text())
    assert manifest["mean"] == MEAN and manifest["num_images"] == 2
    # --compare quantizes in eager mode (the saved, compiled model is smi quantize's own business)
    main(["quantize", "--teacher", directory, "--compare", "--schemes", "w8a8", "--iterations", "2",
          "--num-calibration", "4", "--dataset", "digits", "--eval-images", "16", "--json",
          str(tmp_path / "ptq.json")])
    assert json.loads((tmp_path / "ptq.json").read_text())
