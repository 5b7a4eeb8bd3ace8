"""Toolkit-neutral calibration on retained tokens: a ``forward_loop`` and a plain iterable of inputs.

Quantization toolkits take calibration data in one of two shapes:

* a ``forward_loop(model)`` callable that runs the (instrumented) model over the data
  (NVIDIA ModelOpt's ``mtq.quantize(model, config, forward_loop)``, Intel Neural Compressor's
  ``calib_func``): ``kept_token_forward_loop`` runs each image's retained tokens only;
* an iterable of model inputs (NNCF's ``nncf.Dataset(items)``, most PTQ loops):
  ``kept_token_inputs`` yields ``(patches, positions)`` for ``PatchLevelViT(model)``, the ViT
  re-expressed so that stopped patches are not inputs at all.

Neither imports a toolkit. Example:
    >>> loop = kept_token_forward_loop(calibration_data)
    >>> mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop=loop)          # ModelOpt
    >>> patch_model = PatchLevelViT(model)
    >>> nncf.quantize(patch_model, nncf.Dataset(list(kept_token_inputs(calibration_data, model))))
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from smi_plugin.calibration import SparseInvertedCalibrationDataset
from smi_plugin.tokens import PatchLevelViT, forward_kept_tokens, kept_patch_groups, patch_grid

__all__ = ["PatchLevelViT", "kept_token_forward_loop", "kept_token_inputs"]


def kept_token_inputs(dataset: SparseInvertedCalibrationDataset, model: nn.Module,
                      batch_size: int = 32) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(patches, positions)`` of each batch's retained patches (equal kept count per batch)."""
    grid = patch_grid(model, tuple(dataset.pixel_values.shape[2:]))
    for _, patches, positions in kept_patch_groups(dataset.pixel_values, dataset.patch_mask, grid, batch_size):
        yield patches, positions


def kept_token_forward_loop(dataset: SparseInvertedCalibrationDataset, batch_size: int = 32,
                            device: torch.device | str | None = None) -> Callable[[nn.Module], None]:
    """A ``forward_loop(model)`` that runs ``model`` on every image's retained tokens, without grads."""

    def forward_loop(model: nn.Module) -> None:
        target = device if device is not None else next(model.parameters()).device
        with torch.no_grad():
            for batch in dataset.batches(batch_size):
                forward_kept_tokens(model, batch["pixel_values"].to(target), batch["patch_mask"].to(target))

    return forward_loop
