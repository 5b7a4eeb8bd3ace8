"""Ahead-of-time compiles: an AOTInductor package (``compiled.pt2``) of a program, loaded for inference.

The package is native code for this CPU's instruction sets: it loads in a fraction of a second, takes
any batch size and calls its kernels from C++ (at batch 1 the Python wrapper of a just-in-time compile
costs a tenth to a fifth of the time). With ``tune_for_batch`` it holds a second compile whose GEMM
kernels were chosen by timing at a small batch, run at the batch sizes where it measured faster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

from .inductor import cpu_target, register_x86_lowering, with_precision
from .quantized_program import device_of
from .timing import timed_calls
from .trust import file_sha256

logger = logging.getLogger(__name__)

PACKAGE_FILE = "compiled.pt2"
# The compiles a package holds: oneDNN's GEMM kernels (the package's default model) and, with
# tune_for_batch, GEMMs tuned for small batches.
DEFAULT_MODEL, LATENCY_MODEL = "model", "latency"


class CompiledPackage(nn.Module):
    """An AOTInductor package loaded for inference: images ``(B, C, H, W)`` -> float32 logits.

    No compile on load, any batch size up to the exported bound, kernels called from C++. A package
    compiled with ``tune_for_batch`` holds two compiles of one program: ``"model"`` (oneDNN's GEMM
    kernels, what ``torch._inductor.aoti_load_package`` loads) and ``"latency"`` (GEMM kernels tuned at a
    small batch); batches of up to ``latency_up_to_batch`` images run the latter.

    Args:
        path: the package file.
        cpu_target, tuned_for_batch: how it was compiled, where known.
        latency_up_to_batch: the largest batch the ``"latency"`` compile runs (0: it is not used).
        keep_alive: the temporary directory of a package not saved yet.
        built_sha256: the sha256 of the file as ``compile_package`` wrote it, in this process (``None``: a
            package from disk); ``save_quantized`` records a copy with this hash as built here.
    """

    def __init__(self, path: str | os.PathLike, cpu_target: str | None = None, tuned_for_batch: int = 0,
                 latency_up_to_batch: int = 0, keep_alive: Any = None, built_sha256: str | None = None) -> None:
        from torch._inductor.package import load_package

        super().__init__()
        self.path, self.cpu_target, self.tuned_for_batch = Path(path), cpu_target, tuned_for_batch
        self.latency_up_to_batch = latency_up_to_batch
        self._runner = load_package(str(path), DEFAULT_MODEL)
        self._latency_runner = load_package(str(path), LATENCY_MODEL) if latency_up_to_batch else None
        self._keep_alive = keep_alive
        self.built_sha256 = built_sha256

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[0] <= self.latency_up_to_batch:
            return self._latency_runner(pixel_values)
        return self._runner(pixel_values)


def compile_package(model: torch.export.ExportedProgram | nn.Module, path: str | os.PathLike | None = None,
                    unquantized_precision: str = "float32", image_shape: tuple[int, ...] | None = None,
                    max_batch: int = 4096, tune_for_batch: int = 0) -> CompiledPackage:
    """Compile ``model`` ahead of time (AOTInductor, ``freezing`` on: int8 weights prepacked for oneDNN)
    into the package ``path`` (a temporary file, removed with the returned module, when ``None``) and load it.

    Args:
        model: an ``export_quantized`` program, or any module mapping images to logits (the FP32 teacher).
        unquantized_precision: one of ``PRECISIONS``, for the ops not quantized
            (``"bfloat16-matmul-attention"``: an exported program only).
        image_shape: ``(C, H, W)``; read from the program's input when ``None``.
        max_batch: the largest batch size the package accepts (an exported program's own bound, if lower).
        tune_for_batch: ``N > 0`` compiles the program a second time with each GEMM's kernel chosen by
            timing candidates at batch ``N`` (2 for 1: exporting at batch 1 would fix the batch size) with
            inductor's ``max_autotune`` (its AMX micro-kernel templates against oneDNN), then times both
            compiles at batch 1, 2, 4, ...: the tuned one runs the batch sizes up to the last at which it
            was faster (``latency_up_to_batch``) and is left out of the package if it never was.
            ``0``: one compile with oneDNN's kernels. See ``InvertedPTQConfig.tune_for_batch``.
    """
    from torch._inductor.package import package_aoti

    if isinstance(model, torch.export.ExportedProgram):
        register_x86_lowering()  # the program holds torchao's quantize/dequantize ops
        value = next(n for n in model.graph.nodes if n.op == "placeholder"
                     and n.name in model.graph_signature.user_inputs).meta["val"]
        image_shape = image_shape or tuple(int(size) for size in value.shape[1:])
        if isinstance(value.shape[0], torch.SymInt):  # the exported bound on the batch size
            max_batch = min(max_batch, int(model.range_constraints[value.shape[0].node.expr].upper))
        model = model.module()
    if image_shape is None:
        raise ValueError("compile_package needs image_shape=(C, H, W) for a module")
    if not 0 <= tune_for_batch <= max_batch:
        raise ValueError(f"tune_for_batch must be in [0, {max_batch}] (0: no tuning), got {tune_for_batch}")
    module = with_precision(model, unquantized_precision)
    keep_alive = None
    if path is None:
        keep_alive = tempfile.TemporaryDirectory(prefix="smi-compiled-")
        path = Path(keep_alive.name) / PACKAGE_FILE
    # The example's batch is the size hint kernels are tuned at; batch 1 would specialize the graph to 1.
    example = torch.zeros(max(2, tune_for_batch), *image_shape, device=device_of(module))
    compiles = {DEFAULT_MODEL: {}}
    if tune_for_batch:
        compiles[LATENCY_MODEL] = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
    with torch.no_grad():
        program = torch.export.export(module, (example,),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=max_batch)},))
        started = time.perf_counter()
        graph = program.module(check_guards=False)
        # Generated files keep their content-hashed names (aot_inductor.model_name_for_generated_files
        # would name them after the model, and inductor's cache would then reuse the first such file for
        # every later program: stale constants, garbage logits, torch 2.14); packaging names the models.
        files = {}
        for name, options in compiles.items():
            with _no_cpp_bmm_template() if options.get("max_autotune") else contextlib.nullcontext():
                files[name] = torch._inductor.aot_compile(
                    graph, (example,), options={"freezing": True, "aot_inductor.package": True, **options})
    package_aoti(str(path), files)
    latency_up_to_batch = 0
    if tune_for_batch:
        latency_up_to_batch = measure_latency_crossover(path, image_shape, min(max_batch, max(64, 2 * tune_for_batch)))
        if not latency_up_to_batch:  # the tuned kernels were slower even at batch 1: not shipped
            package_aoti(str(path), {DEFAULT_MODEL: files[DEFAULT_MODEL]})
    logger.info("compiled %s ahead of time in %.1f s%s", Path(path).name, time.perf_counter() - started,
                f" (kernels tuned at batch {tune_for_batch} run batches up to {latency_up_to_batch})"
                if tune_for_batch else "")
    return CompiledPackage(path, cpu_target(), tune_for_batch, latency_up_to_batch, keep_alive,
                           built_sha256=file_sha256(path))


def _no_cpp_bmm_template() -> contextlib.AbstractContextManager:
    """Keep inductor's C++ bmm template out of a ``max_autotune`` compile (aten's bmm runs instead).

    With a batch size that varies, autotuning that template freezes the first bmm's operand view at the
    example's batch size: the package then fails at any other batch ("Expected size for first two
    dimensions of batch2 tensor"), the attention's bmm of ``bfloat16-matmul-attention`` included (torch 2.14,
    whenever inductor's autotune cache is cold). The int8 GEMMs are what the tuned compile is for.
    """
    import torch._inductor.kernel.bmm as bmm_lowering

    if not hasattr(bmm_lowering, "use_cpp_bmm_template"):
        return contextlib.nullcontext()
    return mock.patch.object(bmm_lowering, "use_cpp_bmm_template", lambda *args, **kwargs: False)


def measure_latency_crossover(path: str | os.PathLike, image_shape: tuple[int, ...], largest_batch: int,
                              rounds: int = 3, repeats: int = 3, min_sqnr_db: float = 10.0) -> int:
    """The largest batch ``1, 2, 4, ... <= largest_batch`` up to which the package's ``"latency"`` compile
    ran faster than its ``"model"`` compile at every probed size (0: not even at batch 1, or its logits
    are not the other compile's: below ``min_sqnr_db`` logit SQNR; rounding differences between the two
    compound to ~28 dB through a random-weight DeiT-Small, broken kernels gave -4 dB and below).

    Each size is timed in ``rounds`` alternating blocks of ``repeats`` calls per compile, each block after
    one untimed call: a model in use runs call after call with its weights in cache, and a machine that
    slows down or speeds up meanwhile slows both; the medians of the block medians are compared.
    """
    from torch._inductor.package import load_package

    from smi_plugin.evaluation import sqnr_db

    runners = load_package(str(path), DEFAULT_MODEL), load_package(str(path), LATENCY_MODEL)
    crossover, batch = 0, 1
    with torch.no_grad():
        while batch <= largest_batch:
            inputs = torch.randn(batch, *image_shape)
            agreement = sqnr_db(*(runner(inputs).float() for runner in runners))
            if agreement < min_sqnr_db:
                logger.warning("the GEMM kernels tuned by max_autotune disagree with oneDNN's at batch %d (%.1f dB "
                               "logit SQNR): left out of the package", batch, agreement)
                return 0
            # per block, the median after one untimed call (caches hold the other compile's weights)
            blocks = [[timed_calls(runner, inputs, repeats)[0]["median_s"] for runner in runners]
                      for _ in range(rounds)]
            default_seconds, latency_seconds = (sorted(column)[rounds // 2] for column in zip(*blocks))
            if latency_seconds >= default_seconds:
                break
            crossover, batch = batch, 2 * batch
    return crossover

