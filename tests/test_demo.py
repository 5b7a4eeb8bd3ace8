"""The main job end to end (quick sizes): every stage runs, every picture is written, and it ends in a
saved int8 model and a saved student that load back and reproduce their held-out accuracy."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow(seconds=60)
def test_quick_demo_runs_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "examples/demo.py"), "--quick", "--out", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "smi-plugin demo" in result.stdout and "faster" in result.stdout
    for picture in ("inverted_sparse.png", "inverted_dense.png", "stopping_stages.png", "inversion_loss.png",
                    "distillation_curves.png"):
        assert (tmp_path / picture).stat().st_size > 1000, picture
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["teacher_top1"] > 0.7
    assert {r["source"] for r in results["quantization"]} == {"gaussian", "dense", "sparse", "real"}
    deployment = results["deployment"]
    assert (tmp_path / "int8" / "model.pt2").stat().st_size < 0.35 * deployment["fp32_state_dict_bytes"]
    assert deployment["reloaded_top1"] == deployment["card"]["quantized_accuracy"]
    assert deployment["card"]["agreement"] >= 0.9
    student = results["distillation"]
    assert (tmp_path / "student" / "model.safetensors").exists() and student["mode"] == "linear-probe"
    assert student["reloaded_top1"] == student["student_accuracy"]
    import datasets

    assert len(datasets.load_from_disk(str(tmp_path / "dataset"))) == 16
