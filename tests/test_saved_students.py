"""A student saved by ``smi_plugin.zoo.save_student`` is a timm Hub folder: timm loads it with no import of
this package and computes what ``load_teacher(DIR)`` computes; the previous two-file form still loads."""

import json
import subprocess
import sys

import pytest
import timm
import torch

from smi_plugin import load_teacher
from smi_plugin.zoo import SAVED_CARD, SAVED_FORMAT, SAVED_WEIGHTS, TeacherError, push_student_to_hub, save_student

KWARGS = {"img_size": [32, 32], "patch_size": [4, 4], "embed_dim": 32, "depth": 1, "num_heads": 2}
CARD = {"architecture": "vit_tiny_patch16_224", "model_kwargs": KWARGS, "num_classes": 10,
        "mean": (0.3, 0.3, 0.3), "std": (0.2, 0.2, 0.2), "accuracy": 0.5, "teacher": "digits-vit",
        "mode": "full", "dataset": "digits", "eval_images": 360}


@pytest.fixture
def student():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, **KWARGS).eval()


def test_timm_loads_a_saved_student_without_smi_plugin(tmp_path, student):
    assert save_student(student, tmp_path, CARD) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["pretrained_cfg"]["mean"] == [0.3] * 3 and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["smi_plugin"]["accuracy"] == 0.5 and config["smi_plugin"]["teacher"] == "digits-vit"
    card = (tmp_path / "README.md").read_text()
    assert "library_name: timm" in card and "50.00%" in card and "digits-vit" in card and "local-dir:" in card
    x = torch.rand(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    # A fresh interpreter that never imports smi_plugin: what a timm user with the folder runs.
    script = (f"import sys, timm, torch; model = timm.create_model('local-dir:{tmp_path}', pretrained=True).eval(); "
              f"assert 'smi_plugin' not in sys.modules; cfg = timm.data.resolve_data_config({{}}, model=model); "
              f"print(list(cfg['mean']), tuple(cfg['input_size'])); torch.save(model(torch.load('{tmp_path}/x.pt')), "
              f"'{tmp_path}/timm.pt')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[0.3, 0.3, 0.3] (3, 32, 32)" in result.stdout
    (tmp_path / "x.pt").unlink()
    loaded = load_teacher(str(tmp_path))
    with torch.no_grad():
        ours = loaded(x)
    assert torch.allclose(torch.load(tmp_path / "timm.pt"), ours, atol=1e-6) and torch.allclose(ours, student(x))
    assert loaded.pretrained_cfg["mean"] == (0.3, 0.3, 0.3) and loaded.pretrained_cfg["saved_dir"] == str(tmp_path)
    assert loaded.pretrained_cfg["architecture"] == "vit_tiny_patch16_224"
    assert loaded.pretrained_cfg["model_kwargs"] == {**KWARGS, "num_classes": 10}
    with pytest.raises(ValueError, match="architecture"):
        save_student(student, tmp_path, {"num_classes": 10})


def test_the_old_two_file_form_still_loads_with_a_note(tmp_path, student, caplog):
    from safetensors.torch import save_file

    save_file(student.state_dict(), str(tmp_path / SAVED_WEIGHTS))
    body = {"format": SAVED_FORMAT, **CARD, "weights": SAVED_WEIGHTS, "mean": [0.3] * 3, "std": [0.2] * 3}
    (tmp_path / SAVED_CARD).write_text(json.dumps(body))
    loaded = load_teacher(str(tmp_path))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), student(x))
    assert loaded.pretrained_cfg["std"] == (0.2, 0.2, 0.2) and "re-save" in caplog.text
    save_student(loaded, tmp_path, CARD)  # re-saving converts it: one form in the folder
    assert not (tmp_path / SAVED_CARD).exists() and (tmp_path / "config.json").is_file()


def test_a_directory_without_a_model_and_an_offline_push_are_one_line(tmp_path, student, monkeypatch):
    with pytest.raises(TeacherError, match="directory without a model"):
        load_teacher(str(tmp_path))
    save_student(student, tmp_path, CARD)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE=1"):
        push_student_to_hub(tmp_path, "me/student")
