"""Compare calibration sources for torchao PTQ on a teacher's real held-out images.

Sources: Gaussian noise, densely inverted, sparsely inverted, real training images (a reference a
data-free user does not have) or a saved inverted dataset. For every bit width and coverage, each
calibrated model is evaluated densely on the real held-out split: top-1 and the logits' SQNR
against FP32, as mean and spread over calibration seeds.
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Any, Sequence

import torch
from torch import nn

from smi_plugin.integrations.torchao import quantize_with_inverted_data, resolve_range_estimator
from smi_plugin.calibration import SparseInvertedCalibrationDataset
from smi_plugin.batch import balanced_labels
from smi_plugin.config import InversionConfig
from smi_plugin.data import ImageSplit
from smi_plugin.evaluation import predict_logits, sqnr_db, top1_accuracy
from smi_plugin.images import model_normalization
from smi_plugin.inverter import SparseInverter
from smi_plugin.schedule import StoppingSchedule

BUILTIN_SOURCES = ("gaussian", "dense", "sparse", "real")


def calibration_data(source: str, teacher: nn.Module, num_images: int, seed: int, inversion: InversionConfig,
                     train_split: ImageSplit | None, progress: bool = False) -> tuple[SparseInvertedCalibrationDataset, float]:
    """One calibration set and the seconds it took to make (inversion time for inverted sources)."""
    started = time.perf_counter()
    if source == "gaussian":
        data = SparseInvertedCalibrationDataset.gaussian(teacher, num_images, seed=seed)
    elif source in ("dense", "sparse"):
        # "dense" means every patch inverted, whatever the configured selection policy (rebirth would still emit)
        config = (inversion.replace(seed=seed, schedule=StoppingSchedule.dense(), selection="dense") if source == "dense"
                  else inversion.replace(seed=seed))
        batch = SparseInverter(teacher, config, progress=progress).invert(balanced_labels(num_images, int(teacher.num_classes)))
        data = SparseInvertedCalibrationDataset.from_batches([batch])
        data.source = f"{source}-inverted"
    elif source == "real":
        if train_split is None:
            raise ValueError("the 'real' calibration source needs the teacher's training split")
        index = torch.randperm(len(train_split), generator=torch.Generator().manual_seed(seed))[:num_images]
        mean, std = model_normalization(teacher)
        data = SparseInvertedCalibrationDataset.from_images(teacher, train_split.images(index), mean, std,
                                                            train_split.labels[index], source="real")
    else:
        data = SparseInvertedCalibrationDataset.from_hf(source)
    return data, time.perf_counter() - started


def compare_calibrations(teacher: nn.Module, test_split: ImageSplit, train_split: ImageSplit | None, *,
                         sources: Sequence[str] = BUILTIN_SOURCES, schemes: Sequence[str] = ("w8a8", "w4a8"),
                         coverages: Sequence[str] = ("linear",), seeds: Sequence[int] = (0,), num_calibration: int = 32,
                         inversion: InversionConfig | None = None, backend: str = "pt2e",
                         range_estimator: str | Sequence[str] = "auto", progress: bool = True) -> dict[str, Any]:
    """Quantize ``teacher`` once per (source, seed, scheme, coverage, range estimator); evaluate each on
    ``test_split``. Each calibration set is made once and serves every scheme, coverage and estimator."""
    from tqdm.auto import tqdm

    inversion = inversion or InversionConfig(iterations=300, schedule=StoppingSchedule.paper_scaled(300))
    mean, std = model_normalization(teacher)
    with torch.no_grad():
        reference = predict_logits(teacher, test_split, mean, std)
    estimators = [range_estimator] if isinstance(range_estimator, str) else list(range_estimator)
    runs: list[dict[str, Any]] = []
    total = len(seeds) * len(sources) * len(schemes) * len(coverages) * len(estimators)
    bar = tqdm(total=total, desc="quantizing", unit="model", disable=not progress)
    for seed in seeds:
        for source in sources:
            data, seconds = calibration_data(source, teacher, num_calibration, seed, inversion, train_split)
            for scheme, coverage, estimator in itertools.product(schemes, coverages, estimators):
                qmodel = quantize_with_inverted_data(teacher, data, scheme, backend=backend, coverage=coverage,
                                                     range_estimator=estimator)
                logits = predict_logits(qmodel, test_split, mean, std)
                resolved = resolve_range_estimator(estimator, scheme)
                runs.append({"source": source, "seed": seed, "scheme": scheme, "coverage": coverage,
                             "range_estimator": resolved if estimator == resolved else f"{estimator} ({resolved})",
                             "top1": top1_accuracy(logits, test_split.labels), "sqnr_db": sqnr_db(reference, logits),
                             "calibration_seconds": seconds, "kept_fraction": data.kept_fraction})
                bar.update(1)
    bar.close()
    return {"fp32_top1": top1_accuracy(reference, test_split.labels), "eval_images": len(test_split),
            "num_calibration": num_calibration, "backend": backend, "range_estimator": range_estimator,
            "inversion": inversion.to_dict(), "runs": runs, "summary": summarize(runs)}


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread (population std) over seeds per (scheme, coverage, range estimator, source)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        key = (run["scheme"], run["coverage"], run.get("range_estimator", "minmax"), run["source"])
        groups.setdefault(key, []).append(run)
    rows = []
    for (scheme, coverage, estimator, source), members in groups.items():
        top1 = [m["top1"] for m in members]
        sqnr = [m["sqnr_db"] for m in members]
        rows.append({"scheme": scheme, "coverage": coverage, "range_estimator": estimator, "source": source,
                     "seeds": len(members), "top1_mean": statistics.fmean(top1), "top1_std": statistics.pstdev(top1),
                     "sqnr_mean": statistics.fmean(sqnr), "sqnr_std": statistics.pstdev(sqnr),
                     "calibration_seconds": statistics.fmean(m["calibration_seconds"] for m in members)})
    return rows


def format_report(report: dict[str, Any]) -> str:
    """One line per (scheme, coverage, range estimator) with every source's top-1 and SQNR side by side."""
    rows = report["summary"]
    sources = list(dict.fromkeys(r["source"] for r in rows))
    header = ["scheme", "coverage", "ranges"] + [f"{s} top1 / SQNR" for s in sources]
    lines = [header]
    settings = lambda r: (r["scheme"], r["coverage"], r.get("range_estimator", "minmax"))  # noqa: E731
    for setting in dict.fromkeys(settings(r) for r in rows):
        cells = list(setting)
        for source in sources:
            match = [r for r in rows if settings(r) == setting and r["source"] == source]
            if match:
                r = match[0]
                cells.append(f"{100 * r['top1_mean']:.2f}±{100 * r['top1_std']:.2f} / {r['sqnr_mean']:.1f}±{r['sqnr_std']:.1f}dB")
            else:
                cells.append("-")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [f"FP32 top-1 {100 * report['fp32_top1']:.2f}% on {report['eval_images']} real held-out images; "
            f"{report['num_calibration']} calibration images; mean±std over seeds"]
    text += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(text)
