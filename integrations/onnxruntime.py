"""ONNX Runtime static int8 quantization of timm ViTs, calibrated on retained tokens only.

The ViT is exported to ONNX at the patch level: ``(patches (B, K, C*p*p), positions (B, K) int64)
-> logits``, with dynamic batch and token count. Calibration feeds only each image's retained
patches (``KeptTokenDataReader``, one ``onnxruntime.quantization.CalibrationDataReader`` batch
per kept count), so stopped patches never shape a range. ``quantize_static`` then writes a QDQ
model (per-channel int8 weights, uint8 activations) that ONNX Runtime runs with int8 kernels. The
same graph does dense inference when every patch is passed (``OrtViT`` does that from images).

Example:
    >>> export_patch_onnx(teacher, "vit.onnx", image_size=(224, 224))
    >>> quantize_onnx("vit.onnx", "vit.int8.onnx", KeptTokenDataReader(calibration_data, teacher))
    >>> logits = OrtViT("vit.int8.onnx", teacher)(images)          # normalized images -> logits
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from smi_plugin.tokens import PatchGrid, PatchLevelViT, check_vit, kept_patch_groups, patch_grid

logger = logging.getLogger(__name__)
INPUT_NAMES = ("patches", "positions")


def export_patch_onnx(model: nn.Module, path: str | os.PathLike, image_size: tuple[int, int] | None = None,
                      opset: int = 18) -> str:
    """Export ``model``'s kept-token forward ``(patches, positions) -> logits`` to ONNX.

    Uses ``torch.onnx.export(dynamo=True)`` (needs onnxscript) and falls back to the TorchScript
    exporter. Batch and token count are dynamic.
    """
    check_vit(model)
    model = copy.deepcopy(model).eval().requires_grad_(False).cpu()
    grid = patch_grid(model, image_size)
    wrapper = PatchLevelViT(model, grid.image_size).eval()  # a new module starts in training mode
    example = (torch.zeros(2, grid.num_patches, grid.patch_dim),
               torch.arange(grid.num_patches).expand(2, -1).contiguous())
    path = str(path)
    try:
        batch, tokens = torch.export.Dim("batch", min=1, max=1 << 16), torch.export.Dim("tokens", min=1,
                                                                                         max=grid.num_patches)
        program = torch.onnx.export(wrapper, example, input_names=list(INPUT_NAMES), output_names=["logits"],
                                    dynamic_shapes=({0: batch, 1: tokens}, {0: batch, 1: tokens}), opset_version=opset,
                                    dynamo=True, verbose=False)
        program.save(path)
    except Exception as err:  # noqa: BLE001 - any dynamo-exporter failure falls back to TorchScript
        logger.info("dynamo ONNX export failed (%s); using the TorchScript exporter", err)
        torch.onnx.export(wrapper, example, path, input_names=list(INPUT_NAMES), output_names=["logits"],
                          dynamic_axes={"patches": {0: "batch", 1: "tokens"}, "positions": {0: "batch", 1: "tokens"},
                                        "logits": {0: "batch"}}, opset_version=opset, dynamo=False)
    return path


def onnx_feeds(pixel_values: torch.Tensor, patch_mask: torch.Tensor | None, grid: PatchGrid,
               batch_size: int | None = 32) -> Iterator[dict[str, np.ndarray]]:
    """ONNX feeds ``{"patches", "positions"}`` of the retained patches, batches of equal kept count."""
    for _, patches, positions in kept_patch_groups(pixel_values.float().cpu(), patch_mask, grid, batch_size):
        yield {"patches": patches.numpy(), "positions": positions.numpy().astype(np.int64)}


def KeptTokenDataReader(dataset: Any, model: nn.Module, batch_size: int = 32):  # noqa: N802 - a class factory
    """A ``CalibrationDataReader`` over a ``SparseInvertedCalibrationDataset``'s retained tokens.

    (A factory so that onnxruntime is imported only when one is made.)
    """
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            grid = patch_grid(model, tuple(dataset.pixel_values.shape[2:]))
            self._feeds = list(onnx_feeds(dataset.pixel_values, dataset.patch_mask, grid, batch_size))
            self._iter = iter(self._feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._iter, None)

        def rewind(self) -> None:
            self._iter = iter(self._feeds)

        def __len__(self) -> int:
            return len(self._feeds)

    return _Reader()


def quantize_onnx(model_path: str | os.PathLike, output_path: str | os.PathLike, reader: Any,
                  per_channel: bool = True, calibrate_method: str = "MinMax") -> str:
    """``quantize_static`` to a QDQ model: per-channel int8 weights, uint8 activations, MatMul/Gemm ops."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(model_path), str(output_path), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    calibrate_method=getattr(CalibrationMethod, calibrate_method),
                    op_types_to_quantize=["MatMul", "Gemm"])
    return str(output_path)


def calibration_ranges(model_path: str | os.PathLike, reader: Any, workdir: str | os.PathLike) -> dict[str, tuple]:
    """``{tensor name: (min, max)}`` that ORT's MinMax calibrater collects from ``reader``."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    calibrator = create_calibrator(str(model_path), op_types_to_calibrate=["MatMul", "Gemm"],
                                   augmented_model_path=os.path.join(str(workdir), "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax)
    calibrator.collect_data(reader)
    ranges = calibrator.compute_data()
    return {name: tuple(float(np.asarray(v).item()) for v in ranges[name].range_value) for name in ranges}


class OrtViT:
    """An ONNX Runtime session of a patch-level ViT export that takes normalized images (all patches kept)."""

    def __init__(self, path: str | os.PathLike, model_or_grid: nn.Module | PatchGrid, threads: int | None = None,
                 image_size: tuple[int, int] | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.grid = model_or_grid if isinstance(model_or_grid, PatchGrid) else patch_grid(model_or_grid, image_size)

    def __call__(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        if patch_mask is not None and bool((patch_mask.flatten(1).sum(1) != patch_mask[0].sum()).any()):
            raise ValueError("OrtViT takes images that all keep the same number of patches")
        feed = next(onnx_feeds(pixel_values, patch_mask, self.grid, batch_size=pixel_values.shape[0]))
        return torch.from_numpy(self.session.run(["logits"], feed)[0])
