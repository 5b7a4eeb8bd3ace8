"""integrations/torchao_report.py: the comparison table's grouping and statistics."""

import pytest

from smi_plugin.integrations.torchao_report import format_report, summarize


def _run(source, estimator, seed, top1, sqnr):
    return {"source": source, "seed": seed, "scheme": "w4a4", "coverage": "full", "range_estimator": estimator,
            "top1": top1, "sqnr_db": sqnr, "calibration_seconds": 1.0, "kept_fraction": 0.5}


def test_runs_are_summarized_per_range_estimator_and_source():
    runs = [_run("sparse", "minmax", 0, 0.50, 10.0), _run("sparse", "minmax", 1, 0.70, 14.0),
            _run("sparse", "mse", 0, 0.90, 20.0), _run("dense", "mse", 0, 0.80, 18.0)]
    rows = {(r["range_estimator"], r["source"]): r for r in summarize(runs)}
    assert set(rows) == {("minmax", "sparse"), ("mse", "sparse"), ("mse", "dense")}
    minmax = rows["minmax", "sparse"]
    assert minmax["seeds"] == 2 and minmax["top1_mean"] == pytest.approx(0.60)
    assert minmax["top1_std"] == pytest.approx(0.10) and minmax["sqnr_std"] == pytest.approx(2.0)  # population std
    text = format_report({"summary": summarize(runs), "fp32_top1": 0.95, "eval_images": 100, "num_calibration": 32})
    lines = text.splitlines()
    assert any("minmax" in line and "60.00±10.00" in line for line in lines)
    assert any("mse" in line and "90.00±0.00" in line and "80.00±0.00" in line for line in lines)
    # A run without an estimator (older reports) counts as min/max.
    legacy = {k: v for k, v in _run("real", "minmax", 0, 0.4, 5.0).items() if k != "range_estimator"}
    assert summarize([legacy])[0]["range_estimator"] == "minmax"
