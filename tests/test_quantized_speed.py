"""benchmarks/quantized_speed.py runs at a tiny size and reports every variant and size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smi_plugin.integrations.deploy import cpu_target
from smi_plugin.integrations.torchao import InvertedPTQConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow(seconds=80)
def test_quantized_speed_reports_latency_and_sizes(tmp_path):
    out = tmp_path / "speed.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/quantized_speed.py"), "--models", "digits-vit",
                             "--zoo-batches", "4", "--repeats", "1", "--warmup", "1", "--calibration-images", "8",
                             "--iterations", "8", "--tune-for-batch", "0", "--json", str(out)],
                            env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    (digits,) = report["results"]
    assert report["cpu_target"] == cpu_target() and f"inductor's target): {cpu_target()}" in result.stdout
    rows = digits["latency"]["4"]
    assert set(rows) == {"fp32 eager", "fp32 compiled", "fp32 package", "bf16 compiled", "int8 compiled",
                         "int8 package", "ort fp32", "ort int8", "openvino fp32", "openvino int8"}
    assert digits["int8_unquantized_precision"] == InvertedPTQConfig().resolved_unquantized_precision
    assert all(r["median_s"] > 0 for r in rows.values())
    assert min(rows[v]["sqnr_db_vs_fp32"] for v in ("fp32 compiled", "fp32 package", "ort fp32", "openvino fp32")) > 60
    assert 30 < rows["bf16 compiled"]["sqnr_db_vs_fp32"] < 60  # bfloat16 rounding: close, not equal
    # Judged on real held-out digits (within the calibrated ranges): the int8 logits track FP32's.
    assert digits["inputs"] == "real held-out"
    assert rows["ort int8"]["sqnr_db_vs_fp32"] > 12 and rows["openvino int8"]["sqnr_db_vs_fp32"] > 12
    for ours in ("int8 compiled", "int8 package"):
        assert rows[ours]["sqnr_db_vs_fp32"] > 25 and rows[ours]["agreement_vs_fp32"] >= 0.75
    sizes = digits["sizes_bytes"]
    assert sizes["model.pt2"] < sizes["fp32 state dict"] and sizes["onnx int8"] < sizes["onnx fp32"]
    assert sizes["compiled.pt2"] > 0
    assert "int8 package vs openvino int8" in result.stdout  # the comparison measured in the same run
    assert "int8 package vs faster FP32 compiled" in result.stdout and "top-1 agreement" in result.stdout
