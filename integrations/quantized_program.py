"""The dense-image ``ExportedProgram`` of a pt2e quantized ViT: the portable program ``model.pt2`` holds.

The converted pt2e graph (calibrated on retained tokens) is wrapped as a dense-image model (normalized
images ``(B, C, H, W)`` -> logits, every patch kept) and re-exported with ``torch.export`` with a dynamic
batch size; the int8 weights are folded graph constants and the FP32 weights are not kept.
"""

from __future__ import annotations

import torch
from torch import nn

from smi_plugin.tokens import PatchGrid, images_to_patches


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
    example = torch.zeros(2, grid.in_chans, *grid.image_size, device=device_of(slim))
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


def device_of(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")

