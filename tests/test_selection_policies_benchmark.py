"""benchmarks/selection_policies.py runs as documented (at a tiny size) and reports every policy."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
POLICIES = ("smi", "random", "dense", "rebirth")


@pytest.mark.slow(seconds=65)
def test_selection_policies_benchmark_reports_every_policy(tmp_path):
    out, report_path = tmp_path / "pictures", tmp_path / "selection.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/selection_policies.py"), "--teachers", "digits-vit",
                             "--iterations", "4", "--batch-size", "4", "--seconds", "1", "--eval-images", "50",
                             "--kd-minutes", "0.02", "--calibration-draws", "2", "--out", str(out), "--json", str(report_path)],
                            check=False, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout.splitlines()
    for policy in POLICIES:
        assert any(line.startswith(policy) for line in table), f"no row for {policy}:\n{result.stdout}"

    report = json.loads(report_path.read_text())
    digits = report["teachers"]["digits-vit"]
    assert digits["eval_images"] == 50 and 0.9 < digits["fp32_top1"] <= 1.0
    assert set(digits["policies"]) == set(POLICIES)
    calibration = digits["calibration_images"]
    assert 1 <= calibration <= 32
    for policy, row in digits["policies"].items():
        assert row["inversion"]["selection"] == policy and row["inversion"]["iterations"] == 4
        assert row["batches"] >= 1 and row["samples"] >= 4 and row["samples_per_second"] > 0
        assert row["trajectories"] == 4 * row["batches"]
        assert 0 < row["kept_fraction"] <= 1 and 0 <= row["teacher_hits"] <= 1
        for scheme in ("w8a8", "w4a4"):
            assert 0 <= row["quantization"][scheme]["top1"] <= 1
            assert isinstance(row["quantization"][scheme]["sqnr_db"], float)
        student = row["distillation"]  # smi distill --selection POLICY with its defaults: full KD for digits
        assert student["minutes"] == 0.02 and student["mode"] == "full" and 0 <= student["student_accuracy"] <= 1
        assert (out / "digits-vit" / f"{policy}.png").is_file()
    policies = digits["policies"]
    # Dense inversion never stops a patch; the sparse policies keep fewer; rebirth emits several
    # disjoint samples per trajectory.
    assert policies["dense"]["kept_fraction"] == 1.0
    assert policies["smi"]["kept_fraction"] < 1.0 and policies["random"]["kept_fraction"] < 1.0
    assert policies["rebirth"]["samples"] > policies["rebirth"]["trajectories"]
    assert policies["smi"]["samples"] == policies["smi"]["trajectories"]
    assert {r["source"] for r in digits["quantization_summary"]} == set(POLICIES)
    assert {r["seeds"] for r in digits["quantization_summary"]} == {2}  # two random calibration draws each
    assert (out / "digits-vit" / "policies.png").is_file()
    assert json.loads((out / "digits-vit" / "summary.json").read_text())["teacher"] == "digits-vit"
