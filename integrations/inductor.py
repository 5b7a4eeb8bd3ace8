"""Inductor just in time: the int8 program's runtime form, the FP32 baseline, the unquantized ops' precision.

``compile_quantized`` lowers an exported pt2e program the way torchao's X86 inductor tutorial does
(``freezing`` on, so its linears run oneDNN int8 kernels); on CPUs with native bfloat16 the ops left
unquantized may run in bfloat16 (torchao's int8-mixed-bf16).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention_rewrite import attention_in_bfloat16
from .torchao import PRECISIONS


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


def register_x86_lowering() -> None:
    # Importing the X86 quantizer registers torchao's inductor passes (q/dq -> onednn.qlinear).
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401


def compile_quantized(program: torch.export.ExportedProgram | torch.fx.GraphModule,
                      unquantized_precision: str = "float32") -> FrozenCompiled:
    """The int8-kernel module of an exported quantized program (or of its ``.module()``).

    ``unquantized_precision``: one of ``PRECISIONS``, what the ops left unquantized run in; a saved
    model's card records which one its accuracy was measured with.
    """
    module = program.module() if isinstance(program, torch.export.ExportedProgram) else program
    register_x86_lowering()
    return FrozenCompiled(with_precision(module, unquantized_precision))


def with_precision(module: nn.Module, unquantized_precision: str) -> nn.Module:
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


def cpu_target() -> str:
    """The instruction sets inductor compiles C++ kernels for here (``"avx512 avx512_vnni amx_tile"``): a
    package compiled for one set may not run on a CPU without it."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return str(pick_vec_isa()) or "scalar"

