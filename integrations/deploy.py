"""A deployable, fast int8 model: calibrate on inverted data, lower, export, compile ahead of time, evaluate.

The pipeline behind ``smi quantize --out DIR``. Each step lives in its own module, re-exported here:
``quantized_program`` (the dense-image ``torch.export`` program), ``inductor`` (just-in-time compiles and
the unquantized ops' precision), ``attention_rewrite`` (attention in bfloat16), ``aot_package`` (the
AOTInductor ``compiled.pt2``), ``card`` (the folder and card any runtime writes), ``package`` (the torch
runtime's files, trusted loading), ``trust`` (the per-user record of packages built here), ``timing``;
``openvino`` is the OpenVINO runtime's pipeline.

Example:
    >>> program, compiled, card = quantize_for_deployment(teacher, data, "w8a8", test_split=split.first(1000))
    >>> save_quantized(program, "out/", card, compiled)
    >>> fast = load_quantized("out/")            # normalized images -> logits, int8 kernels
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .aot_package import (DEFAULT_MODEL, LATENCY_MODEL, PACKAGE_FILE, CompiledPackage, compile_package,
                          measure_latency_crossover)
from .attention_rewrite import attention_in_bfloat16, bfloat16_attention
from .card import card_fields, evaluate_against_fp32
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
