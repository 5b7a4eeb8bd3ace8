"""A deployable, fast int8 model out of torchao's pt2e flow: lower, export, save, load.

After ``quantize_with_inverted_data`` (calibration on retained tokens only), the converted pt2e graph
is wrapped as a dense-image model (normalized images ``(B, C, H, W)`` -> logits, every patch kept),
re-exported with ``torch.export`` (the int8 weights are folded graph constants; the FP32 weights
are not kept) and saved as ``DIR/model.pt2`` beside a JSON card ``DIR/card.json``. The program is
lowered the way torchao's X86 inductor tutorial does it (inductor with ``freezing`` on, so its linears
run oneDNN int8 kernels; on CPUs with native bfloat16 the ops left unquantized run in bfloat16, the
tutorial's int8-mixed-bf16, as the card records), ahead of time by AOTInductor into
``DIR/compiled.pt2``: a package for this CPU that loads in a fraction of a second, takes any batch size
and calls its kernels from C++ (at batch 1 the Python wrapper of a just-in-time compile costs a tenth
to a fifth of the time). By default it holds a second compile whose GEMM kernels were chosen by timing
at batch 1, run at the small batch sizes where it measured faster. ``load_quantized(DIR)`` returns that
package where it was compiled for this CPU's instruction set, and otherwise compiles ``model.pt2`` just
in time.

Example:
    >>> qmodel = quantize_with_inverted_data(teacher, data, "w8a8")
    >>> program = export_quantized(qmodel)
    >>> save_quantized(program, "out/", card, compile_package(program))
    >>> fast = load_quantized("out/")            # normalized images -> logits, int8 kernels
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch
from torch import nn

from smi_plugin.io import current_umask
from smi_plugin.tokens import PatchGrid, images_to_patches

from .torchao import PRECISIONS

logger = logging.getLogger(__name__)

FORMAT = "smi-plugin/quantized-vit/v1"
MODEL_FILE = "model.pt2"
PACKAGE_FILE = "compiled.pt2"
# The compiles a package holds: oneDNN's GEMM kernels (the package's default model) and, with
# tune_for_batch, GEMMs tuned for small batches.
DEFAULT_MODEL, LATENCY_MODEL = "model", "latency"
CARD_FILE = "card.json"
_SDPA = torch.ops.aten.scaled_dot_product_attention.default
# Schemes whose pt2e graph inductor lowers to int8 (oneDNN qlinear) kernels. w4a8 keeps 4-bit
# weight values in int8 storage: W4 accuracy, W8 speed and size.
LOWERABLE_SCHEMES = ("w8a8", "w4a8")


class QuantizedModelError(ValueError):
    """A saved quantized model that cannot be used here (missing files, other format or versions)."""


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


def versions() -> dict[str, str]:
    """The library versions a saved program depends on."""
    import torchao

    return {"torch": torch.__version__, "torchao": torchao.__version__}


class DenseImageForward(nn.Module):
    """Normalized images ``(B, C, H, W)`` -> logits through a kept-token forward, every patch kept."""

    def __init__(self, patch_forward: nn.Module, grid: PatchGrid) -> None:
        super().__init__()
        self.patch_forward = patch_forward
        self.patch_size = tuple(grid.patch_size)
        self.num_patches = grid.num_patches

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = images_to_patches(pixel_values, self.patch_size)
        positions = torch.arange(self.num_patches, device=pixel_values.device).expand(patches.shape[0], -1)
        return self.patch_forward(patches, positions)


def export_quantized(qmodel: nn.Module, max_batch: int = 4096) -> torch.export.ExportedProgram:
    """The dense-image ``ExportedProgram`` of a pt2e ``QuantizedViT`` (dynamic batch size).

    Only the tensors the converted graph uses are kept (int8 weights, scales, biases, norms): the
    FP32 copies of the quantized weights are dropped.
    """
    core = getattr(qmodel, "patch_forward", None)
    if not isinstance(core, torch.fx.GraphModule):
        raise ValueError("only a backend='pt2e' quantized model can be exported (got a "
                         f"{type(core).__name__} core)")
    slim = torch.fx.GraphModule(core, core.graph)  # copies only the attributes the graph references
    grid = qmodel.grid
    example = torch.zeros(2, grid.in_chans, *grid.image_size, device=_device_of(slim))
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        program = torch.export.export(DenseImageForward(slim, grid), (example,), dynamic_shapes=({0: batch},))
    # What the saved file needs is the graph and its tensors: the example input (a full batch of
    # images) and the per-node tracing records (source lines, module paths) only add bytes.
    program.example_inputs = None
    for node in program.graph.nodes:
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "from_node", "torch_fn"):
            node.meta.pop(key, None)
    return program


def _device_of(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


class FrozenCompiled(nn.Module):
    """``module`` compiled by inductor with ``freezing`` on: the int8 program's runtime form, and the
    fair FP32 (or bfloat16) baseline it is compared with.

    Args:
        module: maps a batch to a batch.
        autocast_dtype: ``torch.bfloat16`` runs the ops autocast covers in bfloat16 (for a quantized
            program, torchao's int8-mixed-bf16: the int8 kernels stay int8 and, in a ViT, the attention
            between them turns bfloat16); ``None`` keeps float32. Outputs are returned as float32 either way.

    Compilation happens on the first call of each batch size (tens of seconds on a small CPU);
    shapes are static so results never depend on which batch sizes were seen before.
    """

    def __init__(self, module: nn.Module, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eager = module if autocast_dtype is None else _Autocast(module, autocast_dtype)
        self._compiled = torch.compile(self.eager, dynamic=False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        # freezing folds the int8 weights into prepacked oneDNN weights; it is read when compiling
        with inductor_config.patch(freezing=True):
            return self._compiled(pixel_values)


class _Autocast(nn.Module):
    """``module`` under CPU autocast to ``dtype``, returning float32 (traced by dynamo as one graph)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.autocast(pixel_values.device.type, dtype=self.dtype):
            return self.module(pixel_values).float()


def _register_x86_lowering() -> None:
    # Importing the X86 quantizer registers torchao's inductor passes (q/dq -> onednn.qlinear).
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401


def compile_quantized(program: torch.export.ExportedProgram | torch.fx.GraphModule,
                      unquantized_precision: str = "float32") -> FrozenCompiled:
    """The int8-kernel module of an exported quantized program (or of its ``.module()``).

    ``unquantized_precision``: one of ``PRECISIONS``, what the ops left unquantized run in; a saved
    model's card records which one its accuracy was measured with.
    """
    module = program.module() if isinstance(program, torch.export.ExportedProgram) else program
    _register_x86_lowering()
    return FrozenCompiled(_with_precision(module, unquantized_precision))


def _with_precision(module: nn.Module, unquantized_precision: str) -> nn.Module:
    """``module`` with its unquantized ops running in ``unquantized_precision`` once compiled."""
    if unquantized_precision not in PRECISIONS:
        raise ValueError(f"unquantized_precision must be one of {PRECISIONS}, got {unquantized_precision!r}")
    if unquantized_precision == "bfloat16-matmul-attention":
        if not isinstance(module, torch.fx.GraphModule):
            raise ValueError("unquantized_precision='bfloat16-matmul-attention' rewrites a graph: pass an exported "
                             "program (export_quantized) or its .module()")
        module = attention_in_bfloat16(module)
    if unquantized_precision.startswith("bfloat16"):
        return _Autocast(module, torch.bfloat16)
    return module


def bfloat16_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       scale: float | None = None) -> torch.Tensor:
    """``softmax(query @ key^T * scale) @ value`` with both matmuls in bfloat16 (float32 accumulation) and
    the softmax in float32, returned in ``query``'s dtype.

    Why not ``scaled_dot_product_attention`` in bfloat16: aten's CPU flash-attention kernel is no faster in
    bfloat16 than in float32 without AMX, while inductor runs these two matmuls as oneDNN bfloat16 GEMMs
    (AVX512-BF16) and fuses the casts and the softmax into one kernel (figures in benchmarks/README.md,
    "The attention in bfloat16 without AMX").
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    # The scale goes on the query (as in timm's unfused attention), not on the 197x197 scores.
    scores = ((query * scale).to(torch.bfloat16) @ key.to(torch.bfloat16).transpose(-2, -1)).float()
    # The softmax written out: inductor's own lowering divides every score by the row's sum, and a division
    # costs several multiplications; one reciprocal per row instead.
    exponentials = (scores - scores.amax(-1, keepdim=True)).exp()
    weights = (exponentials * exponentials.sum(-1, keepdim=True).reciprocal()).to(torch.bfloat16)
    return (weights @ value.to(torch.bfloat16)).to(query.dtype)


def attention_in_bfloat16(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite, in place, each ``scaled_dot_product_attention`` of an exported graph without mask, dropout
    or causal masking (a ViT's) into ``bfloat16_attention``; returns ``graph_module``. Other attention
    calls are left as they are."""
    names = [argument.name for argument in _SDPA._schema.arguments]
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target is not _SDPA:
            continue
        bound = {**dict(zip(names, node.args)), **node.kwargs}
        if (bound.get("attn_mask") is not None or bound.get("dropout_p", 0.0) or bound.get("is_causal", False)
                or bound.get("enable_gqa", False)):
            continue
        with graph_module.graph.inserting_before(node):
            rewritten = graph_module.graph.call_function(
                bfloat16_attention, (bound["query"], bound["key"], bound["value"]), {"scale": bound.get("scale")})
        rewritten.meta = dict(node.meta)
        node.replace_all_uses_with(rewritten)
        graph_module.graph.erase_node(node)
    graph_module.recompile()
    return graph_module


def cpu_target() -> str:
    """The instruction sets inductor compiles C++ kernels for here (``"avx512 avx512_vnni amx_tile"``): a
    package compiled for one set may not run on a CPU without it."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return str(pick_vec_isa()) or "scalar"


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
    """

    def __init__(self, path: str | os.PathLike, cpu_target: str | None = None, tuned_for_batch: int = 0,
                 latency_up_to_batch: int = 0, keep_alive: Any = None) -> None:
        from torch._inductor.package import load_package

        super().__init__()
        self.path, self.cpu_target, self.tuned_for_batch = Path(path), cpu_target, tuned_for_batch
        self.latency_up_to_batch = latency_up_to_batch
        self._runner = load_package(str(path), DEFAULT_MODEL)
        self._latency_runner = load_package(str(path), LATENCY_MODEL) if latency_up_to_batch else None
        self._keep_alive = keep_alive

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
        _register_x86_lowering()  # the program holds torchao's quantize/dequantize ops
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
    module = _with_precision(model, unquantized_precision)
    keep_alive = None
    if path is None:
        keep_alive = tempfile.TemporaryDirectory(prefix="smi-compiled-")
        path = Path(keep_alive.name) / PACKAGE_FILE
    # The example's batch is the size hint kernels are tuned at; batch 1 would specialize the graph to 1.
    example = torch.zeros(max(2, tune_for_batch), *image_shape, device=_device_of(module))
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
    return CompiledPackage(path, cpu_target(), tune_for_batch, latency_up_to_batch, keep_alive)


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


def save_quantized(program: torch.export.ExportedProgram, directory: str | os.PathLike, card: dict[str, Any],
                   compiled: CompiledPackage | None = None) -> Path:
    """Write ``model.pt2``, ``compiled.pt2`` (``compiled``'s package, when given) and ``card.json`` into
    ``directory`` atomically (all or nothing).

    ``directory`` must be absent or a previous output of this function (it is then replaced).
    ``card`` gains (in place) ``format``, ``versions``, ``files`` (sizes in bytes) and, with a package,
    ``compiled`` (its file and the CPU instruction sets it was compiled for).
    """
    target = Path(directory)
    check_output_directory(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        write_program(program, staging / MODEL_FILE)
        card.update(format=FORMAT, versions=versions(), files={MODEL_FILE: (staging / MODEL_FILE).stat().st_size})
        card.pop("compiled", None)
        if compiled is not None:
            shutil.copyfile(compiled.path, staging / PACKAGE_FILE)
            card["files"][PACKAGE_FILE] = (staging / PACKAGE_FILE).stat().st_size
            card["compiled"] = {"file": PACKAGE_FILE, "cpu_target": compiled.cpu_target or cpu_target(),
                                "tuned_for_batch": compiled.tuned_for_batch,
                                "latency_up_to_batch": compiled.latency_up_to_batch}
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
    logger.info("saved the quantized model to %s", target)
    return target


def write_program(program: torch.export.ExportedProgram, path: str | os.PathLike) -> None:
    """``torch.export.save`` with the graph's text records deflated: a plain zip that ``torch.export.load``
    reads as it is. The graph's JSON is a fixed ~0.2-0.5 MB (a fifth to a half of a small model's int8
    weights) and shrinks about tenfold; tensor records stay stored, as ``torch.export.save`` writes them.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as staging:
        raw = Path(staging) / path.name  # records are named after the archive's stem: keep the final name
        torch.export.save(program, raw)
        with zipfile.ZipFile(raw) as source, zipfile.ZipFile(path, "w") as target:
            for info in source.infolist():
                tensor = "/data/weights/" in info.filename or "/data/constants/" in info.filename
                record = zipfile.ZipInfo(info.filename, info.date_time)  # torch's timestamps: same program, same bytes
                record.compress_type = zipfile.ZIP_STORED if tensor else zipfile.ZIP_DEFLATED
                target.writestr(record, source.read(info.filename))


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


def read_card(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON card of a saved quantized model."""
    path = Path(directory) / CARD_FILE
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise QuantizedModelError(f"{directory} holds no {CARD_FILE}: not a saved quantized model") from err
    if card.get("format") != FORMAT:
        raise QuantizedModelError(f"{path} has format {card.get('format')!r}; this version reads {FORMAT!r}")
    return card


def load_quantized(directory: str | os.PathLike, compile: bool = True) -> nn.Module:
    """Load a saved quantized ViT: normalized images ``(B, C, H, W)`` -> logits.

    Args:
        directory: an output of ``smi quantize --out`` / ``save_quantized``.
        compile: return the compiled int8 module (default): the saved ``compiled.pt2`` package where it
            was compiled for this CPU's instruction sets (loads at once), else ``model.pt2`` compiled
            here by inductor on the first call of each batch size; its unquantized ops in the card's
            ``unquantized_precision`` either way. ``False`` gives the eager exported module (float32
            q/dq simulation, slow, for debugging).

    Raises:
        QuantizedModelError: missing files, another format, or saved under other torch/torchao versions.
    """
    card = read_card(directory)
    saved, here = card.get("versions", {}), versions()
    if saved != here:
        raise QuantizedModelError(f"{directory} was saved with torch {saved.get('torch')}/torchao "
                                  f"{saved.get('torchao')} but this is torch {here['torch']}/torchao "
                                  f"{here['torchao']}; re-run 'smi quantize' with these versions")
    _register_x86_lowering()  # the program holds torchao's quantize/dequantize ops
    package = card.get("compiled") or {}
    if compile and package and (Path(directory) / package["file"]).exists():
        if package.get("cpu_target") == cpu_target():
            return CompiledPackage(Path(directory) / package["file"], package["cpu_target"],
                                   package.get("tuned_for_batch", 0), package.get("latency_up_to_batch", 0))
        logger.info("%s was compiled for a CPU with %s, this one has %s: compiling %s here instead", directory,
                    package.get("cpu_target"), cpu_target(), MODEL_FILE)
    program = torch.export.load(Path(directory) / MODEL_FILE)
    if not compile:
        return program.module()
    # the precision the card's accuracy was measured with (models saved before it was recorded: float32)
    precision = card.get("unquantized_precision", "float32")
    if precision not in PRECISIONS:
        raise QuantizedModelError(f"{directory} has unquantized_precision {precision!r}; this version runs "
                                  f"{', '.join(PRECISIONS)}: re-run 'smi quantize' with it")
    if precision.startswith("bfloat16"):
        from .torchao import native_bfloat16  # looked up at call time: tests stand in for the CPU probe

        if not native_bfloat16():
            logger.warning("%s runs unquantized ops in bfloat16 (%s), which this CPU emulates (no AVX512-BF16/AMX): "
                           "the same precision, slower, and its accuracy may differ from the card's in the last "
                           "digits; re-run 'smi quantize --unquantized-precision float32' here for speed",
                           directory, precision)
    return compile_quantized(program, precision)


def timed_calls(forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, repeats: int = 5,
                warmup: int = 1) -> tuple[dict[str, float], torch.Tensor]:
    """Latency of ``forward(inputs)``: median and min over ``repeats`` calls after ``warmup`` calls (the first
    of which, timed apart as ``first_call_s``, compiles), and the output."""
    with torch.no_grad():
        started = time.perf_counter()
        out = forward(inputs)
        first = time.perf_counter() - started
        for _ in range(max(0, warmup - 1)):
            forward(inputs)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            forward(inputs)
            times.append(time.perf_counter() - started)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "first_call_s": first}, out


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
    from smi_plugin.evaluation import predict_logits, sqnr_db, top1_accuracy
    from smi_plugin.images import model_normalization

    from .torchao import quantize_with_inverted_data, resolve_range_estimator

    check_deployable(scheme, backend, coverage)
    qmodel = quantize_with_inverted_data(teacher, dataset, scheme, backend=backend, coverage=coverage,
                                         range_estimator=range_estimator, unquantized_precision=unquantized_precision,
                                         **options)
    program = export_quantized(qmodel)
    precision = qmodel.config.resolved_unquantized_precision
    compiled = compile_package(program, unquantized_precision=precision, tune_for_batch=tune_for_batch)
    card: dict[str, Any] = {
        "teacher": teacher_name or teacher.pretrained_cfg.get("zoo_name") or teacher.pretrained_cfg.get("architecture"),
        "scheme": scheme, "backend": backend, "coverage": coverage,
        "range_estimator": resolve_range_estimator(range_estimator, scheme),
        "unquantized_precision": precision,
        "ptq_options": dict(options),
        "input": {"shape": ["B", qmodel.grid.in_chans, *qmodel.grid.image_size],
                  "normalization": dict(zip(("mean", "std"), map(list, model_normalization(teacher))))},
        "calibration": {"source": dataset.source, "images": len(dataset), "kept_fraction": dataset.kept_fraction,
                        **(calibration or {})},
        "fp32_accuracy": None, "quantized_accuracy": None, "agreement": None, "sqnr_db": None,
        "evaluation": None, "latency": None,
    }
    mean, std = model_normalization(teacher)
    if test_split is not None:
        started = time.perf_counter()
        quantized = predict_logits(compiled, test_split, mean, std, batch_size=eval_batch_size)
        first_pass = time.perf_counter() - started
        with torch.no_grad():
            reference = predict_logits(teacher.eval(), test_split, mean, std, batch_size=eval_batch_size)
        card.update(fp32_accuracy=top1_accuracy(reference, test_split.labels),
                    quantized_accuracy=top1_accuracy(quantized, test_split.labels),
                    agreement=(reference.argmax(1) == quantized.argmax(1)).float().mean().item(),
                    sqnr_db=sqnr_db(reference, quantized),
                    evaluation={"dataset": test_split.name, "split": test_split.split, "images": len(test_split),
                                "batch_size": eval_batch_size, "compile_and_eval_seconds": first_pass})
        batch = min(eval_batch_size, len(test_split))
        inputs = torch.randn(batch, qmodel.grid.in_chans, *qmodel.grid.image_size)
        seconds = timed_calls(compiled, inputs, repeats=3)[0]["median_s"]
        # the promise checked where it is made: int8 against the FP32 teacher compiled by inductor just in
        # time (an FP32 package would cost another compile; on the small zoo teachers it ran up to ~17%
        # faster at batch 100: benchmarks/quantized_speed.py times both)
        fp32_seconds = timed_calls(FrozenCompiled(teacher.eval()), inputs, repeats=3)[0]["median_s"]
        card["latency"] = {"batch": batch, "seconds_per_batch": seconds, "ms_per_image": 1000 * seconds / batch,
                           "fp32_compiled_seconds_per_batch": fp32_seconds,
                           "speedup_vs_fp32_compiled": fp32_seconds / seconds, "threads": torch.get_num_threads(),
                           "note": "median of 3 calls after one; noisy; FP32 compiled just in time"}
    return program, compiled, card
