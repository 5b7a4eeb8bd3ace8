"""The OpenVINO runtime: NNCF int8 post-training quantization on the inverted calibration images, saved as IR.

``smi quantize --runtime openvino --out DIR`` converts the FP32 teacher to an OpenVINO model (dynamic batch
size), calibrates NNCF's PTQ (``model_type=TRANSFORMER``: SmoothQuant and the transformer's ignored
patterns; the ``mixed`` preset: symmetric weights, asymmetric activations, which suits the activations
after GELU and softmax) on the same calibration set the torch runtime uses, and saves the int8 IR
``openvino_model.xml``/``.bin`` beside the same ``card.json``. NNCF sees whole images: the converted graph
takes images, so an inversion's stopped patches are calibrated on as they were left when they stopped
(the torch runtime calibrates on the kept tokens only).

The IR holds no native code: ``load_quantized(DIR)`` compiles it for this CPU with OpenVINO at load time.
``openvino`` and ``nncf`` are an optional extra (``pip install 'smi-plugin[openvino]'``), imported here only.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .card import CARD_FILE, FORMAT, QuantizedModelError, card_fields, evaluate_against_fp32, write_directory

logger = logging.getLogger(__name__)

IR_FILE, WEIGHTS_FILE = "openvino_model.xml", "openvino_model.bin"
PRESETS = ("mixed", "performance")


def check_openvino() -> None:
    """Raise ``ValueError`` (one line) unless openvino and nncf can be imported."""
    for module in ("openvino", "nncf"):
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"--runtime openvino needs the {module} package ({err}); install it with "
                             "pip install 'smi-plugin[openvino]'") from err


def openvino_versions() -> dict[str, str]:
    """The library versions an OpenVINO folder was made with (recorded; newer OpenVINO reads older IR)."""
    return {name: importlib.metadata.version(name) for name in ("torch", "openvino", "nncf")}


class OpenVINOModel(nn.Module):
    """An OpenVINO model compiled for this CPU: normalized images ``(B, C, H, W)`` -> float32 torch logits.

    Args:
        model: an ``openvino.Model`` or the path of its IR (``.xml``).
        threads: OpenVINO's inference threads (default: torch's, so that timings compare like with like).
        loaded_from: what ``load_quantized`` loaded, for reports.
    """

    def __init__(self, model: Any, threads: int | None = None, loaded_from: str | None = None) -> None:
        import openvino

        super().__init__()
        self.threads = threads or torch.get_num_threads()
        self._compiled = openvino.Core().compile_model(
            str(model) if isinstance(model, (str, os.PathLike)) else model, "CPU",
            {"INFERENCE_NUM_THREADS": self.threads})
        # OpenVINO picks the unquantized ops' precision per CPU (bf16 where it is native): recorded
        self.inference_precision = str(self._compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.loaded_from = loaded_from

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        logits = self._compiled(pixel_values.detach().cpu().float().numpy())[0]
        return torch.from_numpy(logits).float()


def convert_fp32(teacher: nn.Module, image_shape: tuple[int, ...]) -> Any:
    """The FP32 ``teacher`` as an ``openvino.Model`` taking images ``(B, *image_shape)`` of any batch size."""
    import openvino

    example = torch.zeros(2, *image_shape)
    with torch.no_grad():
        return openvino.convert_model(teacher.eval(), example_input=example, input=[(-1, *image_shape)])


def quantize_nncf(fp32_model: Any, dataset: Any, preset: str = "mixed", batch_size: int = 1) -> Any:
    """NNCF int8 PTQ of an ``openvino.Model`` calibrated on every image of ``dataset`` (whole images)."""
    import nncf

    if preset not in PRESETS:
        raise ValueError(f"the NNCF preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    images = dataset.pixel_values
    items = [images[start:start + batch_size].numpy() for start in range(0, len(images), batch_size)]
    return nncf.quantize(fp32_model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                         preset=nncf.QuantizationPreset(preset), subset_size=len(items))


def quantize_for_openvino(teacher: nn.Module, dataset: Any, *, preset: str = "mixed", test_split: Any = None,
                          eval_batch_size: int = 500, calibration: dict[str, Any] | None = None,
                          teacher_name: str | None = None) -> tuple[Any, OpenVINOModel, dict[str, Any]]:
    """Convert ``teacher``, quantize it with NNCF on ``dataset``'s images, compile it here and evaluate it.

    Args:
        teacher: the FP32 timm ViT.
        dataset: a ``SparseInvertedCalibrationDataset`` (its whole images are the calibration inputs).
        preset: NNCF's quantization preset, ``"mixed"`` (default) or ``"performance"`` (symmetric activations).
        test_split, eval_batch_size, calibration, teacher_name: as ``quantize_for_deployment``.

    Returns:
        ``(int8 openvino.Model, the compiled model evaluated here, card)``; save with ``save_openvino``.
    """

    check_openvino()
    image_shape = tuple(dataset.pixel_values.shape[1:])
    int8 = quantize_nncf(convert_fp32(teacher, image_shape), dataset, preset)
    compiled = OpenVINOModel(int8)
    card = {**card_fields(teacher, dataset, calibration, teacher_name), "runtime": "openvino",
            "scheme": "w8a8", "backend": "nncf",
            "nncf": {"preset": preset, "model_type": "transformer", "calibration_inputs": "whole images"},
            "unquantized_precision": compiled.inference_precision,
            **evaluate_against_fp32(teacher, compiled, image_shape, test_split, eval_batch_size)}
    return int8, compiled, card


def save_openvino(model: Any, directory: str | os.PathLike, card: dict[str, Any]) -> Path:
    """Write ``openvino_model.xml``/``.bin`` and ``card.json`` into ``directory`` atomically (all or nothing).

    ``directory`` must be absent or a previous ``smi quantize`` output (it is then replaced); ``card`` gains
    (in place) ``format``, ``runtime``, ``versions`` and ``files``.
    """
    import openvino

    def fill(staging: Path) -> None:
        openvino.save_model(model, staging / IR_FILE, compress_to_fp16=False)  # int8 weights stay int8 either way
        card.update(format=FORMAT, runtime="openvino", versions=openvino_versions(),
                    files={name: (staging / name).stat().st_size for name in (IR_FILE, WEIGHTS_FILE)})

    target = write_directory(directory, card, fill)
    logger.info("saved the OpenVINO int8 model to %s", target)
    return target


def load_openvino(directory: str | os.PathLike, card: dict[str, Any]) -> OpenVINOModel:
    """The saved int8 IR of ``directory`` (whose card is ``card``) compiled here by OpenVINO."""
    path = Path(directory) / IR_FILE
    if not path.exists() or not path.with_suffix(".bin").exists():
        raise QuantizedModelError(f"{directory}/{CARD_FILE} names the openvino runtime but {IR_FILE} or "
                                  f"{WEIGHTS_FILE} is missing; re-run 'smi quantize --runtime openvino'")
    try:
        check_openvino()
    except ValueError as err:
        raise QuantizedModelError(f"{directory} is an OpenVINO model: {err}") from err
    logger.info("compiling %s for this CPU with OpenVINO", path)
    return OpenVINOModel(path, loaded_from=f"{IR_FILE} (OpenVINO, compiled here)")
