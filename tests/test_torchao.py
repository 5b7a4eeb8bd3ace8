"""torchao integration, on the shipped digits teacher and its real held-out digits."""

import pytest
import torch

from smi_plugin.integrations.torchao import calibrate_pt2e, observer_ranges, quantize_with_inverted_data
from smi_plugin.calibration import SparseInvertedCalibrationDataset
from smi_plugin.data import load_split
from smi_plugin.images import model_normalization, normalize

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def real_test(digits_teacher):
    mean, std = model_normalization(digits_teacher)
    split = load_split("digits", "test")
    return normalize(split.images(slice(0, 200)), mean, std)


def _with_noisy_background(data: SparseInvertedCalibrationDataset, scale: float = 8.0):
    keep = data.patch_mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    noise = torch.randn(data.pixel_values.shape, generator=torch.Generator().manual_seed(0)) * scale
    return SparseInvertedCalibrationDataset.from_tensors(torch.where(keep, data.pixel_values, noise), data.patch_mask, data.labels)


@pytest.mark.parametrize("coverage", ["linear", "full"])
def test_retained_token_calibration_ignores_the_background(digits_teacher, digits_calibration, coverage):
    assert digits_calibration.kept_fraction < 0.5
    clean = observer_ranges(calibrate_pt2e(digits_teacher, digits_calibration, coverage=coverage))
    noisy = observer_ranges(calibrate_pt2e(digits_teacher, _with_noisy_background(digits_calibration), coverage=coverage))
    assert len(clean) > 10 and clean == noisy
    # The same noise does change the ranges when every patch is forwarded: the test can fail.
    dense_clean = observer_ranges(calibrate_pt2e(digits_teacher, digits_calibration.dense(), coverage=coverage))
    dense_noisy = observer_ranges(calibrate_pt2e(digits_teacher, _with_noisy_background(digits_calibration).dense(), coverage=coverage))
    assert dense_clean != dense_noisy


def test_noise_calibration_gives_other_ranges(digits_teacher, digits_calibration):
    noise = SparseInvertedCalibrationDataset.gaussian(digits_teacher, 16)
    assert observer_ranges(calibrate_pt2e(digits_teacher, noise)) != observer_ranges(calibrate_pt2e(digits_teacher, digits_calibration))


@pytest.mark.parametrize("backend", ["pt2e", "quantize_"])
def test_w8a8_agrees_with_fp32_on_real_images(digits_teacher, digits_calibration, real_test, backend):
    qmodel = quantize_with_inverted_data(digits_teacher, digits_calibration, "w8a8", backend=backend)
    with torch.no_grad():
        reference, quantized = digits_teacher(real_test), qmodel(real_test)
    assert torch.nn.functional.cosine_similarity(reference, quantized).mean() >= 0.99
    assert (reference.argmax(1) == quantized.argmax(1)).float().mean() >= 0.97
    assert any(p.dtype == torch.float32 for p in digits_teacher.parameters())  # the user's model is untouched


def test_low_bit_schemes_run_and_take_masks(digits_teacher, digits_calibration, real_test):
    qmodel = quantize_with_inverted_data(digits_teacher, digits_calibration, "w4a4", coverage="full", range_estimator="mse")
    with torch.no_grad():
        dense = qmodel(real_test[:4])
        sparse = qmodel(digits_calibration.pixel_values[:4], digits_calibration.patch_mask[:4])
    assert dense.shape == sparse.shape == (4, 10) and torch.isfinite(dense).all()


def test_bad_input_gets_clear_errors(digits_teacher, digits_calibration):
    with pytest.raises(ValueError, match="unknown scheme"):
        quantize_with_inverted_data(digits_teacher, digits_calibration, "w2a2")
    with pytest.raises(ValueError, match="backend='pt2e'"):
        quantize_with_inverted_data(digits_teacher, digits_calibration, "w4a8", backend="quantize_")
    with pytest.raises(TypeError, match="not supported"):
        quantize_with_inverted_data(torch.nn.Linear(4, 4), digits_calibration)
    wrong = SparseInvertedCalibrationDataset.from_tensors(torch.zeros(2, 3, 32, 32), torch.ones(2, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="patch grid"):
        quantize_with_inverted_data(digits_teacher, wrong)


def test_range_estimator_auto_picks_min_max_at_8_bit_activations_and_mse_below():
    from smi_plugin.integrations.torchao import InvertedPTQConfig

    assert InvertedPTQConfig().range_estimator == "auto"
    assert InvertedPTQConfig(scheme="w8a8").resolved_range_estimator == "minmax"
    assert InvertedPTQConfig(scheme="w4a8").resolved_range_estimator == "minmax"
    assert InvertedPTQConfig(scheme="w8a6").resolved_range_estimator == "mse"
    assert InvertedPTQConfig(scheme="w4a4", coverage="full").resolved_range_estimator == "mse"
    assert InvertedPTQConfig(scheme="w4a4", range_estimator="percentile").resolved_range_estimator == "percentile"
    assert InvertedPTQConfig(backend="quantize_").resolved_range_estimator == "minmax"  # auto is allowed there
    with pytest.raises(ValueError, match="quantize_"):
        InvertedPTQConfig(backend="quantize_", range_estimator="mse")
