"""smi quantize --runtime openvino: NNCF int8 on the inverted calibration images, saved as IR, loaded back."""

import json

import pytest
import torch
from conftest import real_digits

from smi_plugin import load_quantized, load_teacher
from smi_plugin.cli import main
from smi_plugin.integrations.deploy import CARD_FILE, FORMAT

pytest.importorskip("openvino")
pytest.importorskip("nncf")
from smi_plugin.integrations.openvino import IR_FILE, WEIGHTS_FILE, OpenVINOModel  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow(seconds=30)]


def test_quantize_for_openvino_through_the_cli_and_load_it_back(tmp_path, capsys):
    out = tmp_path / "openvino"
    main(["quantize", "--teacher", "digits-vit", "--runtime", "openvino", "--iterations", "20", "--tie-channels",
          "--num-calibration", "16", "--eval-images", "100", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "OpenVINO int8 model of digits-vit" in printed and "evaluated with OpenVINO" in printed
    card = json.loads((out / CARD_FILE).read_text())
    assert card["format"] == FORMAT and card["runtime"] == "openvino" and card["backend"] == "nncf"
    assert card["nncf"] == {"preset": "mixed", "model_type": "transformer", "calibration_inputs": "whole images"}
    assert card["calibration"]["source"] == "sparse-inverted" and card["calibration"]["images"] == 16
    assert card["evaluation"]["images"] == 100 and card["agreement"] >= 0.95 and card["sqnr_db"] > 15
    assert card["latency"]["seconds_per_batch"] > 0 and card["latency"]["fp32_compiled_seconds_per_batch"] > 0
    assert set(card["versions"]) == {"torch", "openvino", "nncf"}
    assert sorted(p.name for p in out.iterdir()) == sorted([CARD_FILE, IR_FILE, WEIGHTS_FILE])
    assert card["files"][WEIGHTS_FILE] < 0.5 * sum(p.numel() * 4 for p in load_teacher("digits-vit").parameters())

    model = load_quantized(out)
    assert isinstance(model, OpenVINOModel) and model.loaded_from.startswith(IR_FILE)
    teacher = load_teacher("digits-vit").eval()
    images = real_digits(teacher, 200)
    with torch.no_grad():
        reference, logits = teacher(images), model(images)
    assert logits.dtype == torch.float32 and logits.shape == reference.shape
    assert (logits.argmax(1) == reference.argmax(1)).float().mean() >= 0.95
    assert torch.allclose(torch.cat([model(images[:1]), model(images[1:7])]), logits[:7], atol=1e-4)  # any batch


def test_openvino_refuses_schemes_other_than_w8a8_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["quantize", "--teacher", "digits-vit", "--runtime", "openvino", "--scheme", "w4a8",
              "--out", str(tmp_path / "x")])
    error = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "--runtime openvino quantizes w8a8" in error and "\n" not in error
    assert not (tmp_path / "x").exists()
