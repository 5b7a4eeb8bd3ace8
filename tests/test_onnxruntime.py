"""ONNX Runtime static int8 path: patch-level export, kept-token calibration, QDQ model."""

import pytest
import torch

from smi_plugin.calibration import SparseInvertedCalibrationDataset
from smi_plugin.data import load_split
from smi_plugin.images import model_normalization, normalize

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
from smi_plugin.integrations.onnxruntime import (KeptTokenDataReader, OrtViT, calibration_ranges,  # noqa: E402
                                                 export_patch_onnx, quantize_onnx)

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def onnx_path(digits_teacher, tmp_path_factory):
    return export_patch_onnx(digits_teacher, tmp_path_factory.mktemp("onnx") / "vit.onnx")


def _huge_background(data: SparseInvertedCalibrationDataset) -> SparseInvertedCalibrationDataset:
    keep = data.patch_mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    return SparseInvertedCalibrationDataset.from_tensors(torch.where(keep, data.pixel_values, torch.full_like(
        data.pixel_values, 1e4)), data.patch_mask, data.labels)


def test_stopped_patches_do_not_move_ort_calibration_ranges(digits_teacher, digits_calibration, onnx_path, tmp_path):
    assert digits_calibration.kept_fraction < 0.5
    clean = calibration_ranges(onnx_path, KeptTokenDataReader(digits_calibration, digits_teacher), tmp_path)
    noisy = calibration_ranges(onnx_path, KeptTokenDataReader(_huge_background(digits_calibration), digits_teacher), tmp_path)
    assert len(clean) > 10 and clean == noisy
    dense_noisy = calibration_ranges(onnx_path, KeptTokenDataReader(_huge_background(digits_calibration).dense(), digits_teacher),
                                     tmp_path)
    assert dense_noisy != clean  # the same background does move them when every patch is fed


def test_qdq_int8_model_runs_and_agrees_with_fp32(digits_teacher, digits_calibration, onnx_path, tmp_path):
    import onnx

    int8_path = quantize_onnx(onnx_path, tmp_path / "vit.int8.onnx", KeptTokenDataReader(digits_calibration, digits_teacher))
    ops = {node.op_type for node in onnx.load(int8_path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    mean, std = model_normalization(digits_teacher)
    images = normalize(load_split("digits", "test").images(slice(0, 64)), mean, std)
    with torch.no_grad():
        reference = digits_teacher(images)
    fp32 = OrtViT(onnx_path, digits_teacher)(images)
    int8 = OrtViT(int8_path, digits_teacher)(images)
    assert torch.allclose(fp32, reference, atol=1e-3)
    assert (int8.argmax(1) == reference.argmax(1)).float().mean() >= 0.95
