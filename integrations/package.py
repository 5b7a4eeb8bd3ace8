"""The saved quantized model's file format: the folder, its card, saving it atomically and loading it back.

A folder holds ``card.json`` (``format``, ``runtime``, provenance, accuracy, latency) and the runtime's
files: for ``runtime: "torch"`` ``model.pt2`` (the portable ``torch.export`` program) and, usually,
``compiled.pt2`` (its AOTInductor package: native code for the CPU that built it); for
``runtime: "openvino"`` the int8 IR ``openvino_model.xml``/``.bin`` (``integrations/openvino.py``).

``load_quantized(DIR)`` runs a ``compiled.pt2`` only where this user's own run built it (its sha256 is in
the trust store, ``integrations/trust.py``) or the caller vouches for it (``trust_compiled=True``), and
only on a CPU with the instruction sets it was compiled for; otherwise it compiles ``model.pt2`` here
and says why in the log. The returned module's ``loaded_from`` says which ran.

Example:
    >>> save_quantized(program, "out/", card, compile_package(program))
    >>> fast = load_quantized("out/")            # normalized images -> logits, int8 kernels
    >>> fast.loaded_from
    'compiled.pt2 (built by this user here)'
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn


from .aot_package import PACKAGE_FILE, CompiledPackage
from .card import (CARD_FILE, FORMAT, MODEL_FILE, RUNTIMES, QuantizedModelError,  # noqa: F401  (the format, here too)
                   check_output_directory, write_directory)
from .inductor import compile_quantized, cpu_target, register_x86_lowering
from .torchao import PRECISIONS
from .trust import file_sha256, is_trusted, record_trusted, trust_store_path

logger = logging.getLogger(__name__)

def versions() -> dict[str, str]:
    """The library versions a saved program depends on."""
    import torchao

    return {"torch": torch.__version__, "torchao": torchao.__version__}



def save_quantized(program: torch.export.ExportedProgram, directory: str | os.PathLike, card: dict[str, Any],
                   compiled: CompiledPackage | None = None) -> Path:
    """Write ``model.pt2``, ``compiled.pt2`` (``compiled``'s package, when given) and ``card.json`` into
    ``directory`` atomically (all or nothing).

    ``directory`` must be absent or a previous output of this function (it is then replaced).
    ``card`` gains (in place) ``format``, ``runtime`` (``"torch"``), ``versions``, ``files`` (sizes in
    bytes) and, with a package, ``compiled`` (its file, the CPU instruction sets it was compiled for, and
    its sha256). A package that ``compile_package`` built in this process is recorded in this user's
    trust store, so that ``load_quantized`` runs it; one loaded from elsewhere is copied but not recorded.
    """
    def fill(staging: Path) -> None:
        write_program(program, staging / MODEL_FILE)
        card.update(format=FORMAT, runtime="torch", versions=versions(),
                    files={MODEL_FILE: (staging / MODEL_FILE).stat().st_size})
        card.pop("compiled", None)
        if compiled is not None:
            shutil.copyfile(compiled.path, staging / PACKAGE_FILE)
            card["files"][PACKAGE_FILE] = (staging / PACKAGE_FILE).stat().st_size
            card["compiled"] = {"file": PACKAGE_FILE, "cpu_target": compiled.cpu_target or cpu_target(),
                                "tuned_for_batch": compiled.tuned_for_batch,
                                "latency_up_to_batch": compiled.latency_up_to_batch,
                                "sha256": file_sha256(staging / PACKAGE_FILE)}

    target = write_directory(directory, card, fill)
    package = card.get("compiled")
    # the copy is trusted only if it holds the very bytes compile_package wrote in this process
    if package is not None and package["sha256"] == compiled.built_sha256:
        logger.info("recorded %s/%s as built by this user in %s", target, PACKAGE_FILE,
                    record_trusted(package["sha256"], target / PACKAGE_FILE))
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


def load_quantized(directory: str | os.PathLike, compile: bool = True, trust_compiled: bool = False) -> nn.Module:
    """Load a saved quantized ViT: normalized images ``(B, C, H, W)`` -> float32 logits.

    Args:
        directory: an output of ``smi quantize --out`` / ``save_quantized`` (or of ``--runtime openvino``).
        compile: return the compiled int8 module (default): the saved ``compiled.pt2`` package where this
            user's own run built it and it was compiled for this CPU's instruction sets (loads at once),
            else ``model.pt2`` compiled here by inductor on the first call of each batch size; its
            unquantized ops in the card's ``unquantized_precision`` either way. ``False`` gives the eager
            exported module (float32 q/dq simulation, slow, for debugging). An OpenVINO folder is always
            compiled by OpenVINO for this CPU.
        trust_compiled: run the folder's ``compiled.pt2`` although this user did not build it (it is
            native code: pass ``True`` only for a folder from someone you would run a program from).

    The returned module's ``loaded_from`` (a string) says which file ran and why.

    Raises:
        QuantizedModelError: missing files, another format, or saved under other torch/torchao versions.
    """
    directory = Path(directory)
    card = read_card(directory)
    runtime = card.get("runtime", "torch")
    if runtime == "openvino":
        from .openvino import load_openvino

        return load_openvino(directory, card)
    if runtime not in RUNTIMES:
        raise QuantizedModelError(f"{directory} needs runtime {runtime!r}; this version runs {', '.join(RUNTIMES)}: "
                                  "upgrade smi-plugin or re-run 'smi quantize' here")
    saved, here = card.get("versions", {}), versions()
    if saved != here:
        raise QuantizedModelError(f"{directory} was saved with torch {saved.get('torch')}/torchao "
                                  f"{saved.get('torchao')} but this is torch {here['torch']}/torchao "
                                  f"{here['torchao']}; re-run 'smi quantize' with these versions")
    register_x86_lowering()  # the program holds torchao's quantize/dequantize ops
    package = card.get("compiled") or {}
    reason = f"no {PACKAGE_FILE}"
    if compile and package and (directory / package["file"]).exists():
        path = directory / package["file"]
        if package.get("cpu_target") != cpu_target():
            reason = f"{path.name} was compiled for a CPU with {package.get('cpu_target')}, this one has {cpu_target()}"
            logger.info("%s: compiling %s here instead", reason, MODEL_FILE)
        elif not trust_compiled and not is_trusted(file_sha256(path)):
            reason = f"{path.name} was not built by this user (its sha256 is not in {trust_store_path()})"
            logger.warning("%s is native code that this user did not build (its sha256 is not in the trust store %s): "
                           "compiling %s here instead; pass trust_compiled=True only if you trust whoever "
                           "built it", path, trust_store_path(), MODEL_FILE)
        else:
            trust = "trusted by the caller" if trust_compiled else "built by this user here"
            logger.info("running %s (%s)", path, trust)
            model = CompiledPackage(path, package["cpu_target"], package.get("tuned_for_batch", 0),
                                    package.get("latency_up_to_batch", 0))
            model.loaded_from = f"{PACKAGE_FILE} ({trust})"
            return model
    program = torch.export.load(directory / MODEL_FILE)
    if not compile:
        module = program.module()
        module.loaded_from = f"{MODEL_FILE}, eager (compile=False)"
        return module
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
    model = compile_quantized(program, precision)
    model.loaded_from = f"{MODEL_FILE}, compiled here ({reason})"
    return model
