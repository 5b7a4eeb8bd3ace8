"""What a saved quantized model's folder is, whatever runs it: the card's format and fields, and writing the
folder atomically. ``package`` (the torch runtime) and ``openvino`` both build on it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from smi_plugin.io import current_umask

from .inductor import FrozenCompiled
from .timing import timed_calls

FORMAT = "smi-plugin/quantized-vit/v1"
MODEL_FILE = "model.pt2"
CARD_FILE = "card.json"
# What runs the saved model; cards written before the runtime was recorded are "torch".
RUNTIMES = ("torch", "openvino")


class QuantizedModelError(ValueError):
    """A saved quantized model that cannot be used here (missing files, other format or versions)."""


def write_directory(directory: str | os.PathLike, card: dict[str, Any], fill: Callable[[Path], None]) -> Path:
    """Make ``directory`` atomically (all or nothing): ``fill(staging)`` writes a runtime's files into a
    staging folder beside it (and completes ``card``), then ``card.json`` is written and the folder renamed
    into place. ``directory`` must be absent or a previous output (``check_output_directory``); it is replaced.
    """
    target = Path(directory)
    check_output_directory(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        fill(staging)
        (staging / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
        os.chmod(staging, 0o777 & ~current_umask())
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, trash / "old")
            os.replace(staging, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def check_output_directory(directory: str | os.PathLike) -> None:
    """Raise ``ValueError`` unless ``directory`` is absent or a previous output of ``save_quantized``."""
    path = Path(directory)
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"--out {path} exists and is not a directory; choose a new path")
    card = path / CARD_FILE
    try:
        ours = json.loads(card.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours and any(path.iterdir()):
        raise ValueError(f"--out {path} exists and is not a previous 'smi quantize' output; "
                         "refusing to overwrite it (choose a new path or remove it)")


def card_fields(teacher: nn.Module, dataset: Any, calibration: dict[str, Any] | None = None,
                teacher_name: str | None = None) -> dict[str, Any]:
    """The card's runtime-independent fields: the teacher, its input and the calibration's provenance."""
    from smi_plugin.images import model_normalization
    from smi_plugin.tokens import patch_grid

    grid = patch_grid(teacher, tuple(dataset.pixel_values.shape[2:]))
    return {
        "teacher": teacher_name or teacher.pretrained_cfg.get("zoo_name") or teacher.pretrained_cfg.get("architecture"),
        "input": {"shape": ["B", grid.in_chans, *grid.image_size],
                  "normalization": dict(zip(("mean", "std"), map(list, model_normalization(teacher))))},
        "calibration": {"source": dataset.source, "images": len(dataset), "kept_fraction": dataset.kept_fraction,
                        **(calibration or {})},
    }


def evaluate_against_fp32(teacher: nn.Module, quantized: Any, image_shape: tuple[int, ...], test_split: Any = None,
                          eval_batch_size: int = 500) -> dict[str, Any]:
    """The card's measured fields for ``quantized`` (normalized images -> logits) against the FP32 ``teacher``:
    top-1 of both on the real held-out ``test_split``, agreement, logit SQNR, and latency at one batch of
    ``image_shape`` (``(C, H, W)``) images against the teacher compiled by inductor just in time.
    ``test_split=None``: all null.
    """
    from smi_plugin.evaluation import predict_logits, sqnr_db, top1_accuracy
    from smi_plugin.images import model_normalization

    fields: dict[str, Any] = {"fp32_accuracy": None, "quantized_accuracy": None, "agreement": None, "sqnr_db": None,
                              "evaluation": None, "latency": None}
    if test_split is None:
        return fields
    mean, std = model_normalization(teacher)
    started = time.perf_counter()
    logits = predict_logits(quantized, test_split, mean, std, batch_size=eval_batch_size)
    first_pass = time.perf_counter() - started
    with torch.no_grad():
        reference = predict_logits(teacher.eval(), test_split, mean, std, batch_size=eval_batch_size)
    fields.update(fp32_accuracy=top1_accuracy(reference, test_split.labels),
                  quantized_accuracy=top1_accuracy(logits, test_split.labels),
                  agreement=(reference.argmax(1) == logits.argmax(1)).float().mean().item(),
                  sqnr_db=sqnr_db(reference, logits),
                  evaluation={"dataset": test_split.name, "split": test_split.split, "images": len(test_split),
                              "batch_size": eval_batch_size, "compile_and_eval_seconds": first_pass})
    batch = min(eval_batch_size, len(test_split))
    inputs = torch.randn(batch, *image_shape)
    seconds = timed_calls(quantized, inputs, repeats=3)[0]["median_s"]
    # the promise checked where it is made: int8 against the FP32 teacher compiled by inductor just in
    # time (an FP32 package would cost another compile; on the small zoo teachers it ran up to ~17%
    # faster at batch 100: benchmarks/quantized_speed.py times both)
    fp32_seconds = timed_calls(FrozenCompiled(teacher.eval()), inputs, repeats=3)[0]["median_s"]
    fields["latency"] = {"batch": batch, "seconds_per_batch": seconds, "ms_per_image": 1000 * seconds / batch,
                         "fp32_compiled_seconds_per_batch": fp32_seconds,
                         "speedup_vs_fp32_compiled": fp32_seconds / seconds, "threads": torch.get_num_threads(),
                         "note": "median of 3 calls after one; noisy; FP32 compiled just in time"}
    return fields
