"""The benchmarks run as documented (at small sizes) and their measurements behave."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smi_plugin import StoppingSchedule

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow(seconds=45)
def test_stopping_premise_oracle_keeps_real_digits_recognisable(tmp_path):
    out = tmp_path / "premise.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/stopping_premise.py"), "--teachers", "digits-vit",
                             "--real-images", "300", "--inverted-images", "10", "--iterations", "5",
                             "--json", str(out)], env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    digits = json.loads(out.read_text())["digits-vit"]
    assert digits["kept_patches"] == [44, 30, 21, 14] and digits["num_patches"] == 64
    real = digits["real"]
    assert real["all patches"] > 0.9  # the judge learned the real data
    # Digits are bright strokes on black: keeping the brightest patches keeps the digit, so the
    # oracle must beat random stopping at every kept share by a wide margin.
    assert all(o > r + 0.1 for o, r in zip(real["oracle (brightest)"], real["random"]))
    assert 0.1 < real["background_patch_fraction"] < 0.5
    assert len(digits["inverted"]["attention (SMI)"]) == 4


@pytest.mark.slow(seconds=60)
def test_distillation_transfer_reports_every_pool_and_the_real_reference(tmp_path):
    out = tmp_path / "kd.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/distillation_transfer.py"), "--teacher", "digits-vit",
                             "--mode", "full", "--dense-images", "16", "--batch-size", "8", "--iterations", "4",
                             "--pool-sizes", "8", "--epochs", "30", "--eval-every", "1000", "--real-reference", "512",
                             "--json", str(out)], env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "full" and report["teacher_top1"] > 0.9
    assert report["dense"]["images"] == 16 and report["dense"]["curve"][-1][0] == 8  # 30 passes of 16 images, batch 64
    assert [r["images"] for r in report["sparse_by_size"]] == [8]
    # The reference distils from real training digits the teacher labels: 240 steps of a tiny ViT
    # from scratch must already beat chance (10%) on the held-out digits, or the row means nothing.
    assert report["real_reference"]["images"] == 512
    assert report["real_reference"]["best_top1"] > 0.25
    assert "real images (reference)" in result.stdout
    # The same real digits seen as the sparse pool's student sees its images: as many patches as the
    # paper's schedule, scaled to 4 iterations, leaves of the 8 x 8 grid.
    views = report["real_reference_sparse_views"]
    kept = StoppingSchedule.paper_scaled(4).kept_counts(64)[-1]
    assert views["kept"] == kept < 64 and views["images"] == 512
    assert f"real, {kept} of 64 patches" in result.stdout


@pytest.mark.slow
def test_online_variants_at_equal_steps_are_identical_until_the_variant_acts(tmp_path):
    out = tmp_path / "online.json"
    variants = "defaults (sparse, renewed pool);warm starts (two-class mixes)"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/distillation_transfer.py"), "--teacher", "digits-vit",
                             "--mode", "full", "--online-steps", "8", "--eval-every", "2", "--variants", variants,
                             "--jobs", "2", "--json", str(out), "--", "--pool-size", "16", "--batch-size", "8",
                             "--iterations", "6", "--kd-batch-size", "8"],
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "@8 steps" in result.stdout
    runs = json.loads(out.read_text())["variants"]
    noise, warm = (runs[name] for name in variants.split(";"))
    assert [step for step, _ in noise["curve"]] == [step for step, _ in warm["curve"]] == [2, 4, 6, 8]
    # Two slots of 8 images, 2 iterations per visit: slot 0 finishes its 6 iterations in step 6 and starts
    # again in step 7, warm or from noise; until then both runs are the same computation, bit for bit.
    assert [step for step, _ in noise["kd_loss"]] == list(range(1, 9))
    assert noise["kd_loss"][:6] == warm["kd_loss"][:6] and noise["kd_loss"][6] != warm["kd_loss"][6]
