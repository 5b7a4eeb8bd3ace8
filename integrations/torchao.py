"""torchao static post-training quantization of timm ViTs, calibrated on (sparsely) inverted images.

Two torchao flows, one entry point (``quantize_with_inverted_data``):

* ``backend="pt2e"`` (default): ``torch.export`` of the kept-token forward with dynamic batch and
  token count, ``prepare_pt2e`` with torchao's X86 inductor quantizer (configurable bit widths and
  range estimators), calibration forwards on the retained patches only, ``convert_pt2e``. Only the
  retained patches are even embedded, so no observer (the patch-embedding input included) sees
  background pixels. ``coverage="full"`` also quantizes, as PSAQ-ViT and the paper do, the residual
  stream, LayerNorm, GELU and linear outputs and the attention inputs (q/dq simulation where no
  kernel exists).
* ``backend="quantize_"`` (W8/A8): torchao's ``Int8StaticActivationInt8WeightConfig`` per linear,
  with activation scales from torchao's own ``AffineQuantizedMinMaxObserver`` fed only retained
  tokens; the result runs real int8 matmuls in eager mode.

The returned ``QuantizedViT`` takes full normalized images (or images plus patch masks).
Min/max statistics are all-reduced across processes when calibration runs distributed.
See ``docs/design.md#torchao-on-the-cpu`` for what runs in torchao 0.18 on the CPU and why.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from smi_plugin.calibration import SparseInvertedCalibrationDataset
from smi_plugin.config import ConfigBase, option
from smi_plugin.tokens import (PatchGrid, PatchLevelViT, check_vit, forward_patches, patch_grid, position_tokens,
                               run_on_kept_patches)

SCHEMES = {"w8a8": (8, 8), "w4a8": (4, 8), "w8a6": (8, 6), "w4a4": (4, 4)}
BACKENDS = ("pt2e", "quantize_")
COVERAGES = ("linear", "full")
RANGE_ESTIMATORS = ("auto", "minmax", "percentile", "mse")
# What a compiled program's unquantized ops run in (resolved, as a card records it): float32;
# bfloat16 under autocast (torchao's int8-mixed-bf16, the attention by aten's flash kernel); or the same with
# the attention as two bfloat16 matmuls around a float32 softmax (``deploy.attention_in_bfloat16``).
PRECISIONS = ("float32", "bfloat16", "bfloat16-matmul-attention")
UNQUANTIZED_PRECISIONS = ("auto", *PRECISIONS)


def resolve_range_estimator(estimator: str, scheme: str) -> str:
    """``auto``: min/max ranges for 8-bit activations, the MSE-optimal clipping below.

    Measured on the digits teacher (``smi quantize --compare --range-estimators minmax,percentile,mse``,
    32 calibration images, 2 seeds): at 8-bit activations min/max gave the highest logit SQNR with every
    source; at W4A4 with full coverage MSE clipping gave 94% top-1 where min/max gave 32% (FP32 98.6%).
    """
    if estimator != "auto":
        return estimator
    return "minmax" if SCHEMES[scheme][1] >= 8 else "mse"


def native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX); without them
    bfloat16 is emulated."""
    return amx() or getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()


def amx() -> bool:
    """Whether this CPU has AMX tiles (bfloat16 and int8 matrix units)."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def resolve_unquantized_precision(precision: str) -> str:
    """``auto``: what the ops between the int8 linears run fastest in on this CPU, measured on int8
    packages (2 threads):

    - AMX: ``bfloat16``, torchao's int8-mixed-bf16 (bfloat16 flash attention about 1.8x float32's on
      DeiT-Small);
    - AVX512-BF16 without AMX: ``bfloat16-matmul-attention``, int8-mixed-bf16 with the attention as two oneDNN
      bfloat16 GEMMs (aten's bfloat16 flash-attention kernel gains nothing over float32's without AMX, so plain
      ``bfloat16`` was as fast as float32 or slower on AMD Zen 4; DeiT-Small's package at batch 32 on Zen 4:
      598 ms against 693 ms with only the attention's matmuls in bfloat16, which was 1.4x float32's on Zen 5);
    - otherwise ``float32`` (bfloat16 would be emulated).
    """
    if precision != "auto":
        return precision
    if amx():
        return "bfloat16"
    return "bfloat16-matmul-attention" if native_bfloat16() else "float32"


@dataclass
class InvertedPTQConfig(ConfigBase):
    """Static PTQ settings (validated; round-trips to JSON; ``smi quantize`` generates its flags from them).

    Weights are per-channel symmetric, activations per-tensor affine (unsigned), as in PSAQ-ViT.
    """

    scheme: str = option("w8a8", "weight/activation bits", choices=tuple(SCHEMES))
    backend: str = option("pt2e", "torchao flow: pt2e (any scheme; the one that is saved and compiled) or "
                          "quantize_ (w8a8 only, in memory)", choices=BACKENDS)
    coverage: str = option("linear", "quantized ops: linear (torchao's X86 default: inputs of linear layers) or "
                           "full (also residual stream, LayerNorm/GELU/linear outputs, attention inputs; pt2e only)",
                           choices=COVERAGES)
    range_estimator: str = option("auto", "activation ranges over the retained tokens: minmax (the paper's), "
                                  "percentile, mse (the clipping that minimises quantization error), or auto "
                                  "(minmax for 8-bit activations, mse below: measured)", choices=RANGE_ESTIMATORS)
    percentile: float = option(99.99, "upper percentile of --range-estimator percentile (the lower is 100 - it)")
    batch_size: int = option(32, "calibration images per forward")
    max_samples: int = option(1 << 20, "values kept per observer for the percentile/mse estimators")
    unquantized_precision: str = option("auto", "what the saved model's float ops between the int8 linears run in: "
                                        "float32; bfloat16 (torchao's int8-mixed-bf16 autocast: in a ViT the "
                                        "attention's q/k/v, softmax and weighted sum; LayerNorm and the residual "
                                        "stream stay float32; the attention by aten's flash kernel); "
                                        "bfloat16-matmul-attention (the same, the attention as two bfloat16 "
                                        "matmuls: faster without AMX); or auto (the fastest measured for the CPU: "
                                        "bfloat16 with AMX, bfloat16-matmul-attention with AVX512-BF16 alone, "
                                        "else float32). Saved models only: --compare judges the q/dq simulation",
                                        choices=UNQUANTIZED_PRECISIONS)
    tune_for_batch: int = option(1, "saved models: compiled.pt2 also holds int8 GEMM kernels chosen by timing them "
                                 "at this batch size (inductor's max_autotune: AMX micro-kernels against oneDNN), "
                                 "run for the batch sizes at which they measured faster than oneDNN's (at batch 1 "
                                 "up to 1.8x faster here; slower at large batches); compiling takes about 2.5x "
                                 "longer and the file doubles; 0: oneDNN's kernels only")

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}; use one of {sorted(SCHEMES)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; use one of {BACKENDS}")
        if self.coverage not in COVERAGES:
            raise ValueError(f"unknown coverage {self.coverage!r}; use one of {COVERAGES}")
        if self.range_estimator not in RANGE_ESTIMATORS:
            raise ValueError(f"unknown range_estimator {self.range_estimator!r}; use one of {RANGE_ESTIMATORS}")
        if self.backend == "quantize_" and (self.scheme, self.coverage, self.resolved_range_estimator) != \
                ("w8a8", "linear", "minmax"):
            raise ValueError("backend='quantize_' supports scheme='w8a8', coverage='linear', range_estimator='minmax' "
                             "(torchao's static int8 linear); use backend='pt2e' for other settings")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.tune_for_batch < 0:
            raise ValueError(f"tune_for_batch must be >= 0 (0: no tuning), got {self.tune_for_batch}")
        if self.unquantized_precision not in UNQUANTIZED_PRECISIONS:
            raise ValueError(f"unknown unquantized_precision {self.unquantized_precision!r}; use one of "
                             f"{UNQUANTIZED_PRECISIONS}")

    @property
    def resolved_unquantized_precision(self) -> str:
        """``unquantized_precision`` with ``auto`` resolved for this machine's CPU."""
        return resolve_unquantized_precision(self.unquantized_precision)

    @property
    def resolved_range_estimator(self) -> str:
        """The estimator used: ``range_estimator`` with ``auto`` resolved for ``scheme``."""
        return resolve_range_estimator(self.range_estimator, self.scheme)


class QuantizedViT(nn.Module):
    """A quantized ViT that takes full normalized images, or images plus patch masks (kept tokens only)."""

    def __init__(self, patch_forward: nn.Module | Callable, grid: PatchGrid, config: InvertedPTQConfig,
                 calibration_source: str) -> None:
        super().__init__()
        self.patch_forward = patch_forward
        self.grid = grid
        self.config = config
        self.calibration_source = calibration_source

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        return run_on_kept_patches(self.patch_forward, self.grid, pixel_values, patch_mask)


def quantize_with_inverted_data(model: nn.Module, dataset: SparseInvertedCalibrationDataset, scheme: str = "w8a8",
                                backend: str = "pt2e", coverage: str = "linear", **options: Any) -> QuantizedViT:
    """Static PTQ of a timm ViT with torchao, calibrated on ``dataset``'s retained tokens.

    Args:
        model: a supported timm ``VisionTransformer`` (left unchanged: a copy is quantized).
        dataset: calibration data (sparse inverted, dense, Gaussian or real).
        scheme, backend, coverage: see ``InvertedPTQConfig``.
        **options: other ``InvertedPTQConfig`` fields (``range_estimator``, ``percentile``, ``batch_size``).

    Returns:
        a ``QuantizedViT`` taking full normalized images (``qmodel(x)``) or kept tokens (``qmodel(x, mask)``).

    Example:
        >>> data = SparseInvertedCalibrationDataset.from_inverter(teacher, 32, config)
        >>> qmodel = quantize_with_inverted_data(teacher, data, "w4a8")
        >>> logits = qmodel(images)
    """
    config = InvertedPTQConfig(scheme=scheme, backend=backend, coverage=coverage, **options)
    model, grid, device = _prepare_inputs(model, dataset)
    if config.backend == "pt2e":
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        core = convert_pt2e(_calibrate_pt2e(model, grid, dataset, config, device))
    else:
        core = _quantize_int8_static(model, grid, dataset, config, device)
    return QuantizedViT(core, grid, config, dataset.source)


def _prepare_inputs(model: nn.Module, dataset: SparseInvertedCalibrationDataset):
    """Validate, then a frozen copy of the model (the user's stays unchanged), its grid and device."""
    check_vit(model)
    if not isinstance(dataset, SparseInvertedCalibrationDataset):
        raise TypeError(f"dataset must be a SparseInvertedCalibrationDataset, got {type(dataset).__name__}")
    dataset.check_model(model)
    model = copy.deepcopy(model).eval().requires_grad_(False)
    return model, patch_grid(model, tuple(dataset.pixel_values.shape[2:])), next(model.parameters()).device


def _calibration_batches(dataset: SparseInvertedCalibrationDataset, config: InvertedPTQConfig, grid: PatchGrid):
    """``(retained patches, their grid indices)`` per batch; this process's share when distributed."""
    from smi_plugin.tokens import images_to_patches, mask_to_indices

    rank, world = _rank_and_world()
    for batch in dataset.batches(config.batch_size, num_replicas=world, rank=rank):
        patches = images_to_patches(batch["pixel_values"], grid.patch_size)
        kept = mask_to_indices(batch["patch_mask"])
        yield patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, patches.shape[-1])), kept


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ----------------------------------------------------------------------------------------- pt2e
def _observer_classes():
    """Observer classes for pt2e: min/max, and one that also keeps a bounded value sample."""
    from torchao.quantization.pt2e.observer import MinMaxObserver

    class ClippedRangeObserver(MinMaxObserver):
        """Min/max plus a strided sample of the observed values, clipped by percentile or by MSE."""

        def __init__(self, estimator: str = "percentile", percentile: float = 99.99, max_samples: int = 1 << 20,
                     **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.estimator, self.percentile, self.max_samples = estimator, percentile, max_samples
            self.samples: list[torch.Tensor] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            super().forward(x)
            flat = x.detach().flatten().float()
            stride = max(1, flat.numel() * 8 // self.max_samples)
            self.samples.append(flat[::stride].cpu())
            return x

        def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
            values = torch.cat(self.samples) if self.samples else torch.zeros(1)
            if self.estimator == "percentile":
                qs = torch.tensor([100.0 - self.percentile, self.percentile]) / 100.0
                low, high = torch.quantile(values[:1 << 24], qs)
            else:
                low, high = _mse_clip(values, self.min_val.cpu(), self.max_val.cpu(), self.quant_min, self.quant_max)
            return torch.minimum(low, torch.zeros(())), torch.maximum(high, torch.zeros(()))

        @torch.jit.export
        def calculate_qparams(self):
            low, high = self.clip_range()
            return self._calculate_qparams(low.to(self.min_val.device), high.to(self.max_val.device))

    return MinMaxObserver, ClippedRangeObserver


def _mse_clip(values: torch.Tensor, low: torch.Tensor, high: torch.Tensor, qmin: int, qmax: int,
              steps: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """The shrunken ``(alpha * low, alpha * high)`` range with the least fake-quantization MSE."""
    best, best_range = None, (low, high)
    for alpha in torch.linspace(1.0, 0.2, steps):
        lo, hi = torch.minimum(low * alpha, torch.zeros(())), torch.maximum(high * alpha, torch.zeros(()))
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-12)
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
        dequant = (torch.clamp(torch.round(values / scale) + zero, qmin, qmax) - zero) * scale
        error = (dequant - values).pow(2).mean()
        if best is None or error < best:
            best, best_range = error, (lo, hi)
    return best_range


def _pt2e_quantizer(config: InvertedPTQConfig):
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.observer import PerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import QuantizationConfig

    weight_bits, act_bits = SCHEMES[config.scheme]
    minmax, clipped = _observer_classes()
    eps = 2 ** -12
    estimator = config.resolved_range_estimator
    if estimator == "minmax":
        act_observer = minmax.with_args(eps=eps)
    else:
        act_observer = clipped.with_args(eps=eps, estimator=estimator, percentile=config.percentile,
                                         max_samples=config.max_samples)
    activation = QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=2 ** act_bits - 1,
                                  qscheme=torch.per_tensor_affine, is_dynamic=False,
                                  observer_or_fake_quant_ctr=act_observer)
    weight = QuantizationSpec(dtype=torch.int8, quant_min=-(2 ** (weight_bits - 1)), quant_max=2 ** (weight_bits - 1) - 1,
                              qscheme=torch.per_channel_symmetric, ch_axis=0, is_dynamic=False,
                              observer_or_fake_quant_ctr=PerChannelMinMaxObserver.with_args(eps=eps))
    quant_config = QuantizationConfig(activation, activation, weight, None, False)

    class FullCoverageX86Quantizer(xiq.X86InductorQuantizer):
        """X86's linear annotation plus outputs of residual adds, LayerNorm, GELU, linear, and SDPA inputs."""

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().annotate(model)
            aten = torch.ops.aten
            outputs = {aten.add.Tensor, aten.layer_norm.default, aten.gelu.default, aten.linear.default}
            for node in model.graph.nodes:
                if node.op != "call_function":
                    continue
                value = node.meta.get("val")
                if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                    continue
                annotation = node.meta.get("quantization_annotation") or QuantizationAnnotation()
                if node.target in outputs and annotation.output_qspec is None:
                    annotation.output_qspec = activation
                elif node.target == aten.scaled_dot_product_attention.default:
                    for arg in node.args[:3]:
                        annotation.input_qspec_map[arg] = activation
                else:
                    continue
                annotation._annotated = True
                node.meta["quantization_annotation"] = annotation
            return model

    quantizer = FullCoverageX86Quantizer() if config.coverage == "full" else xiq.X86InductorQuantizer()
    return quantizer.set_global(quant_config)


def calibrate_pt2e(model: nn.Module, dataset: SparseInvertedCalibrationDataset, scheme: str = "w8a8",
                   coverage: str = "linear", **options: Any) -> torch.fx.GraphModule:
    """Export, ``prepare_pt2e`` and calibrate on the retained tokens; returns the observed graph.

    ``convert_pt2e`` of the result gives the quantized graph (``quantize_with_inverted_data`` does
    both); the observers' ``min_val``/``max_val`` show the ranges the calibration data produced.
    """
    config = InvertedPTQConfig(scheme=scheme, backend="pt2e", coverage=coverage, **options)
    model, grid, device = _prepare_inputs(model, dataset)
    return _calibrate_pt2e(model, grid, dataset, config, device)


def observer_ranges(prepared: torch.fx.GraphModule) -> dict[str, tuple[float, float]]:
    """``{observer name: (min, max)}`` of the activation observers of a calibrated pt2e graph."""
    return {name: (module.min_val.min().item(), module.max_val.max().item())
            for name, module in prepared.named_modules()
            if hasattr(module, "min_val") and module.min_val.dim() == 0}


def _calibrate_pt2e(model: nn.Module, grid: PatchGrid, dataset: SparseInvertedCalibrationDataset,
                    config: InvertedPTQConfig, device: torch.device) -> torch.fx.GraphModule:
    from torch.export import Dim
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    wrapper = PatchLevelViT(model, grid.image_size).eval()
    example_patches = torch.zeros(2, grid.num_patches, grid.patch_dim, device=device)
    example_positions = torch.arange(grid.num_patches, device=device).expand(2, -1).contiguous()
    batch, tokens = Dim("batch", min=1, max=1 << 16), Dim("tokens", min=1, max=grid.num_patches)
    exported = torch.export.export(wrapper, (example_patches, example_positions),
                                   dynamic_shapes=({0: batch, 1: tokens}, {0: batch, 1: tokens})).module()
    prepared = prepare_pt2e(exported, _pt2e_quantizer(config))
    with torch.no_grad():
        for patches, kept in _calibration_batches(dataset, config, grid):
            prepared(patches.to(device), kept.to(device))
    _sync_observers([m for m in prepared.modules() if hasattr(m, "min_val") and hasattr(m, "max_val")])
    return prepared


# ------------------------------------------------------------------------------------ quantize_
def _quantize_int8_static(model: nn.Module, grid: PatchGrid, dataset: SparseInvertedCalibrationDataset,
                          config: InvertedPTQConfig, device: torch.device) -> Callable:
    from torchao.quantization import FqnToConfig, Int8StaticActivationInt8WeightConfig, quantize_
    from torchao.quantization.granularity import PerRow, PerTensor
    from torchao.quantization.observer import AffineQuantizedMinMaxObserver
    from torchao.quantization.quant_primitives import MappingType

    observers, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            observer = AffineQuantizedMinMaxObserver(
                MappingType.SYMMETRIC, torch.int8, PerTensor(), eps=torch.finfo(torch.float32).eps,
                scale_dtype=torch.float32, zero_point_dtype=torch.int8, keepdim=True)
            handles.append(module.register_forward_pre_hook(_observe_input(observer)))
            observers[name] = observer
    cache = position_tokens(model, grid, torch.float32)
    try:
        with torch.no_grad():
            for patches, kept in _calibration_batches(dataset, config, grid):
                forward_patches(model, grid, patches.to(device), kept.to(device), cache)
    finally:
        for handle in handles:
            handle.remove()
    _sync_observers(list(observers.values()))
    fqn_configs = {name: Int8StaticActivationInt8WeightConfig(act_quant_scale=obs.calculate_qparams()[0],
                                                              granularity=[PerTensor(), PerRow()])
                   for name, obs in observers.items()}
    quantize_(model, FqnToConfig(fqn_configs), filter_fn=None)
    cache = position_tokens(model, grid, torch.float32)
    return lambda patches, positions: forward_patches(model, grid, patches, positions, cache)


def _observe_input(observer: nn.Module) -> Callable:
    def hook(_module: nn.Module, args: tuple) -> None:
        # Observed with its own rank: the static Int8Tensor wants a keepdim scale of the
        # activation's ndim ([1, 1, 1] for token inputs, [1, 1] for the pooled head input).
        observer(args[0])

    return hook


def _sync_observers(observers: list[nn.Module]) -> None:
    """All-reduce observed ranges (MIN of mins, MAX of maxes; samples gathered) across processes."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for observer in observers:
        dist.all_reduce(observer.min_val, op=dist.ReduceOp.MIN)
        dist.all_reduce(observer.max_val, op=dist.ReduceOp.MAX)
        if hasattr(observer, "samples"):
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, torch.cat(observer.samples) if observer.samples else torch.zeros(0))
            observer.samples = [g for g in gathered if g.numel()]
