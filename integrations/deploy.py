"""A deployable, fast int8 model: calibrate on inverted data, lower, export, compile ahead of time, evaluate.

The pipeline behind ``smi quantize --out DIR``. Each step lives in its own module, re-exported here:
``quantized_program`` (the dense-image ``torch.export`` program), ``inductor`` (just-in-time compiles and
the unquantized ops' precision), ``attention_rewrite`` (attention in bfloat16), ``aot_package`` (the
AOTInductor ``compiled.pt2``), ``package`` (the folder, its card, trusted loading), ``trust`` (the
per-user record of packages built here), ``timing``; ``openvino`` is the OpenVINO runtime's pipeline.

Example:
    >>> program, compiled, card = quantize_for_deployment(teacher, data, "w8a8", test_split=split.first(1000))
    >>> save_quantized(program, "out/", card, compiled)
    >>> fast = load_quantized("out/")            # normalized images -> logits, int8 kernels
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from .aot_package import (DEFAULT_MODEL, LATENCY_MODEL, PACKAGE_FILE, CompiledPackage, compile_package,
                          measure_latency_crossover)
from .attention_rewrite import attention_in_bfloat16, bfloat16_attention
from .inductor import FrozenCompiled, compile_quantized, cpu_target, register_x86_lowering
from .package import (CARD_FILE, FORMAT, MODEL_FILE, RUNTIMES, QuantizedModelError, check_output_directory,
                      load_quantized, read_card, save_quantized, versions, write_program)
from .quantized_program import DenseImageForward, export_quantized
from .timing import timed_calls

__all__ = [
    "CARD_FILE", "DEFAULT_MODEL", "FORMAT", "LATENCY_MODEL", "LOWERABLE_SCHEMES", "MODEL_FILE", "PACKAGE_FILE",
    "RUNTIMES", "CompiledPackage", "DenseImageForward", "FrozenCompiled", "QuantizedModelError",
    "attention_in_bfloat16", "bfloat16_attention", "card_fields", "check_deployable", "check_output_directory",
    "compile_package", "compile_quantized", "cpu_target", "evaluate_against_fp32", "export_quantized",
    "load_quantized", "measure_latency_crossover", "quantize_for_deployment", "read_card", "register_x86_lowering",
    "save_quantized", "timed_calls", "versions", "write_program",
]

# Schemes whose pt2e graph inductor lowers to int8 (oneDNN qlinear) kernels. w4a8 keeps 4-bit
# weight values in int8 storage: W4 accuracy, W8 speed and size.
LOWERABLE_SCHEMES = ("w8a8", "w4a8")


def check_deployable(scheme: str, backend: str = "pt2e", coverage: str = "linear") -> None:
    """Raise ``ValueError`` (one line) unless this setting can be lowered to int8 kernels and saved."""
    if backend != "pt2e":
        raise ValueError(f"backend {backend!r} gives an in-memory model only; use backend 'pt2e' to lower and "
                         "save a deployable model")
    if scheme not in LOWERABLE_SCHEMES:
        raise ValueError(f"scheme {scheme!r} has no int8 kernel on this backend (it would only be simulated); "
                         f"deployable schemes: {', '.join(LOWERABLE_SCHEMES)}")
    if coverage != "linear":
        raise ValueError(f"coverage {coverage!r} quantizes ops that have no int8 kernel (simulated q/dq only); "
                         "use coverage 'linear' for a deployable model")


def quantize_for_deployment(teacher: nn.Module, dataset: Any, scheme: str = "w8a8", *, coverage: str = "linear",
                            range_estimator: str = "auto", backend: str = "pt2e", test_split: Any = None,
                            unquantized_precision: str = "auto", tune_for_batch: int = 1,
                            eval_batch_size: int = 500,
                            calibration: dict[str, Any] | None = None, teacher_name: str | None = None,
                            **options: Any) -> tuple[torch.export.ExportedProgram, CompiledPackage, dict]:
    """Calibrate on ``dataset``'s retained tokens, lower, export, compile ahead of time and evaluate.

    Args:
        teacher: the FP32 timm ViT.
        dataset: a ``SparseInvertedCalibrationDataset``.
        scheme, coverage, range_estimator, backend: see ``InvertedPTQConfig`` (checked by
            ``check_deployable`` first).
        unquantized_precision: see ``InvertedPTQConfig``; the card records it resolved for this CPU.
        tune_for_batch: see ``InvertedPTQConfig`` (``compile_package``).
        test_split: real held-out ``ImageSplit`` to evaluate on, e.g. ``split.first(1000)`` (``None``:
            accuracies are null); its size is recorded in the card.
        eval_batch_size: evaluation and timing batch size (recorded: oneDNN picks kernels by shape).
        calibration: provenance for the card (source, images, seed, inversion config).
        teacher_name: the name recorded in the card.
        **options: the other ``InvertedPTQConfig`` fields (``percentile``, ``batch_size``, ``max_samples``),
            recorded in the card.

    Returns:
        ``(program, compiled package, card)``: the package is the module evaluated here; save all three
        with ``save_quantized(program, DIR, card, package)``.
    """
    from .torchao import quantize_with_inverted_data, resolve_range_estimator

    check_deployable(scheme, backend, coverage)
    qmodel = quantize_with_inverted_data(teacher, dataset, scheme, backend=backend, coverage=coverage,
                                         range_estimator=range_estimator, unquantized_precision=unquantized_precision,
                                         **options)
    program = export_quantized(qmodel)
    precision = qmodel.config.resolved_unquantized_precision
    compiled = compile_package(program, unquantized_precision=precision, tune_for_batch=tune_for_batch)
    card = {**card_fields(teacher, dataset, calibration, teacher_name), "runtime": "torch",
            "scheme": scheme, "backend": backend, "coverage": coverage,
            "range_estimator": resolve_range_estimator(range_estimator, scheme),
            "unquantized_precision": precision, "ptq_options": dict(options),
            **evaluate_against_fp32(teacher, compiled, tuple(dataset.pixel_values.shape[1:]), test_split,
                                    eval_batch_size)}
    return program, compiled, card


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
