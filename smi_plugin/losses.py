"""Inversion objectives: the dense base methods that sparse stopping plugs into.

A base method turns the teacher's logits on the current (sparse) tokens and the current image into
a scalar loss. Sparse stopping never changes a base method: it only decides which tokens reach the
teacher and which pixels the optimiser may move. Methods register themselves by name::

    @register_base_method("my-method")
    class MyMethod(DeepInversion): ...

Regularizers are per-image quantities averaged over the batch, so weights keep their meaning at any
batch size (the authors' code sums norms over the whole batch instead).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn


class LossWeights(Protocol):
    """The loss weights a base method reads (``InversionConfig`` has them all)."""

    ce_weight: float
    tv_l2_weight: float
    tv_l1_weight: float
    l2_weight: float
    input_stats_weight: float
    patch_similarity_weight: float

BASE_METHODS: dict[str, type["DeepInversion"]] = {}


def register_base_method(name: str) -> Callable[[type], type]:
    """Class decorator registering a base method under ``name`` (used by ``InversionConfig.base_method``)."""

    def decorate(cls: type) -> type:
        BASE_METHODS[name] = cls
        return cls

    return decorate


def pixel_differences(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Horizontal, vertical and the two diagonal neighbour differences of ``(B, C, H, W)`` images."""
    return (
        images[..., :, 1:] - images[..., :, :-1],
        images[..., 1:, :] - images[..., :-1, :],
        images[..., 1:, :-1] - images[..., :-1, 1:],
        images[..., 1:, 1:] - images[..., :-1, :-1],
    )


def tv_l2(images: torch.Tensor) -> torch.Tensor:
    """DeepInversion's ``TV_l2`` per image, batch-averaged: the sum of the Frobenius norms of the four
    directional pixel differences."""
    return sum(d.flatten(1).norm(dim=1) for d in pixel_differences(images)).mean()


def tv_l1(images: torch.Tensor) -> torch.Tensor:
    """``TV_l1`` per image, batch-averaged: the sum of the four mean absolute pixel differences."""
    return sum(d.abs().flatten(1).mean(dim=1) for d in pixel_differences(images)).mean()


def image_l2(images: torch.Tensor) -> torch.Tensor:
    """Per-image l2 norm of the (normalized) image, batch-averaged."""
    return images.flatten(1).norm(dim=1).mean()


def moment_distance(pixel_sum: torch.Tensor, square_sum: torch.Tensor, count: int) -> torch.Tensor:
    """``||mean||_2 + ||var - 1||_2`` of per-channel pixel moments given as sums over ``count`` pixels.

    In the teacher's normalized space the training data has mean 0 and variance 1 per channel; this is
    DeepInversion's feature-statistics distance applied to the input normalization, the one set of
    data statistics every timm model carries (``pretrained_cfg`` mean/std).
    """
    mean = pixel_sum / count
    return mean.norm() + (square_sum / count - mean.pow(2) - 1).norm()


def input_statistics(images: torch.Tensor) -> torch.Tensor:
    """``moment_distance`` of a batch of normalized ``(B, C, H, W)`` images (population variance)."""
    return moment_distance(images.sum(dim=(0, 2, 3)), images.pow(2).sum(dim=(0, 2, 3)),
                           images[:, 0].numel())


class PixelPriors(Protocol):
    """The whole image's pixel priors as a base method reads them. ``smi_plugin.priors.BoundPriors``
    computes them from the retained pixels; they equal ``tv_l2``, ``tv_l1``, ``image_l2`` and
    ``input_statistics`` of the full images."""

    def tv_l2(self) -> torch.Tensor: ...

    def tv_l1(self) -> torch.Tensor: ...

    def l2(self) -> torch.Tensor: ...

    def input_stats(self) -> torch.Tensor: ...


@register_base_method("deepinversion")
class DeepInversion:
    """DeepInversion for ViTs: CE + TV_l2 + TV_l1 + l2 + input-statistics priors.

    ViTs have no BatchNorm running statistics; the input normalization is the only data statistic
    left, and ``input_stats_weight`` matches the batch's pixel moments to it.
    """

    def __init__(self, config: LossWeights) -> None:
        self.config = config

    def hooks(self, model: nn.Module) -> ContextManager:
        """Forward hooks the method needs on the teacher while inverting (none here)."""
        return nullcontext()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor,
             priors: PixelPriors | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted total loss and its unweighted components (for logging).

        ``labels``: class indices ``(B,)``, or class probabilities ``(B, C)`` (soft targets).

        ``priors`` gives the whole image's TV, l2 and input statistics. Only terms with a non-zero
        weight are computed. The components are detached 0-dim tensors, never Python floats:
        converting them would wait for the device every iteration, so callers convert only when
        they log (``loss_floats``).
        """
        cfg = self.config
        ce = F.cross_entropy(logits, labels)
        total, parts = cfg.ce_weight * ce, {"ce": ce}
        if priors is not None:
            for name, weight in (("tv_l2", cfg.tv_l2_weight), ("tv_l1", cfg.tv_l1_weight), ("l2", cfg.l2_weight),
                                 ("input_stats", cfg.input_stats_weight)):
                if weight > 0:
                    parts[name] = getattr(priors, name)()
                    total = total + weight * parts[name]
        return total, {k: v.detach() for k, v in parts.items()}

    def needs_images(self) -> bool:
        """Whether ``loss`` needs the full image (only the pixel-space priors do)."""
        cfg = self.config
        return max(cfg.tv_l2_weight, cfg.tv_l1_weight, cfg.l2_weight, cfg.input_stats_weight) > 0


def class_similarity(head_weight: torch.Tensor) -> torch.Tensor:
    """ZSKD's class similarity ``(C, C)``: cosine similarity of the classifier's weight vectors, each
    row min-max scaled to ``[0, 1]`` (a class is most similar to itself)."""
    unit = F.normalize(head_weight.detach().float(), dim=1)
    similarity = unit @ unit.t()
    low, high = similarity.min(1, keepdim=True).values, similarity.max(1, keepdim=True).values
    return (similarity - low) / (high - low).clamp_min(1e-12)


def dirichlet_targets(labels: torch.Tensor, similarity: torch.Tensor, scale: float,
                      generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Soft targets ``(B, C)`` of ``dtype`` on ``labels``' device: row ``i`` drawn from
    ``Dir(scale * similarity[labels[i]])`` (ZSKD), with the label's class made the most likely;
    reproducible from ``generator``."""
    classes = labels.cpu()
    concentration = (scale * similarity[classes]).clamp_min(1e-3)
    seed = int(torch.randint(1 << 62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):  # gamma sampling takes no generator
        torch.manual_seed(seed)
        draws = torch._standard_gamma(concentration)
    targets = draws / draws.sum(1, keepdim=True)
    # The drawn maximum goes to the label's class, so the sample still stands for its label.
    rows = torch.arange(len(classes))
    top = targets.argmax(1)
    swapped = targets.clone()
    swapped[rows, classes] = targets[rows, top]
    swapped[rows, top] = targets[rows, classes]
    return swapped.to(labels.device, dtype)


def jensen_shannon(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 3.0,
                   per_sample: bool = False) -> torch.Tensor:
    """Jensen-Shannon divergence between softened student and teacher predictions, batch-averaged
    (``(B,)``, one per sample, with ``per_sample``)."""
    p = F.softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits / temperature, dim=1)
    m = (0.5 * (p + q)).clamp_min(1e-12).log()
    divergence = 0.5 * (F.kl_div(m, p, reduction="none") + F.kl_div(m, q, reduction="none")).sum(1)
    return divergence if per_sample else divergence.mean()


def competition_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     temperature: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepInversion's adaptive competition in its data-free form: ``(loss, mean JS)``.

    The loss is ``1 - JS`` per sample, counted only for samples on which the student still picks the
    teacher's class, averaged over the batch. Minimising it moves those samples to where the two
    disagree; a sample that got there stops pulling, so it stays near the student's decision boundary
    instead of drifting into an oddity that neither model reads as any class.
    """
    divergence = jensen_shannon(student_logits, teacher_logits, temperature, per_sample=True)
    agrees = (student_logits.argmax(1) == teacher_logits.argmax(1)).to(divergence.dtype)
    return ((1 - divergence.clamp(0, 1)) * agrees).mean(), divergence.mean().detach()


def patch_similarity_entropy(features: torch.Tensor, num_heads: int, num_prefix_tokens: int,
                             bandwidth: float = 0.01, points: int = 10) -> torch.Tensor:
    """PSAQ-ViT's differential entropy of patch-feature cosine similarities, batch-averaged.

    ``features`` is the attention output before the projection, ``(B, N, H*d)``; heads are averaged,
    prefix tokens dropped, and a Gaussian KDE of the pairwise cosine similarities is integrated
    (trapezoid rule) over ``points`` points between their batch-wide min and max.
    """
    b, n, c = features.shape
    patch = features.reshape(b, n, num_heads, c // num_heads).mean(2)[:, num_prefix_tokens:]
    patch = F.normalize(patch, dim=-1)
    similarity = (patch @ patch.transpose(1, 2)).flatten(1)
    with torch.no_grad():
        grid = _linspace(similarity.min(), similarity.max(), points)
    density = torch.exp(-0.5 * ((grid.view(1, -1, 1) - similarity.unsqueeze(1)) / bandwidth) ** 2)
    density = density.mean(-1) / (bandwidth * (2 * torch.pi) ** 0.5) + 1e-4
    return torch.trapezoid(-density * density.log(), grid, dim=-1).mean()


def _linspace(start: torch.Tensor, end: torch.Tensor, steps: int) -> torch.Tensor:
    """``torch.linspace`` between two 0-dim tensors, without reading them on the host.

    ``torch.linspace`` takes Python numbers, which would force a device sync every iteration. This
    reproduces its kernel exactly: ``start + step * i`` for the first half, ``end - step * (steps -
    1 - i)`` for the rest, each as one fused multiply-add (emulated in float64: the product of two
    float32 values is exact there), so the values are bit-identical to ``torch.linspace``.
    """
    wide = torch.float32 if start.device.type == "mps" else torch.float64  # MPS has no float64
    step = (end - start) / (steps - 1)
    index = torch.arange(steps, device=start.device, dtype=wide)
    values = torch.where(index < steps // 2, start.to(wide) + step.to(wide) * index,
                         end.to(wide) - step.to(wide) * (steps - 1 - index))
    return values.to(start.dtype)


def loss_floats(parts: dict[str, Any]) -> dict[str, Any]:
    """``parts`` with every tensor entry as a Python float (one host sync for all), for logging.

    Other entries (iteration numbers, counts) pass through unchanged.
    """
    names = [k for k, v in parts.items() if torch.is_tensor(v)]
    # float64 holds every float32/bf16 value exactly, so these equal ``.item()`` of each part.
    values = dict(zip(names, torch.stack([parts[k].detach().double().reshape(()) for k in names]).tolist()
                      if names else []))
    return {k: values[k] if k in values else v for k, v in parts.items()}


@register_base_method("psaq")
class PSAQViT(DeepInversion):
    """PSAQ-ViT: DeepInversion's terms plus maximising the patch-similarity entropy of every block.

    The features are read with forward pre-hooks on each block's ``attn.proj`` (the attention output,
    ``attn @ v``, which PSAQ hooks as ``matmul2``), so fused attention stays on.
    """

    def __init__(self, config: LossWeights) -> None:
        super().__init__(config)
        self._features: list[torch.Tensor] = []
        self._heads = 0
        self._prefix = 0

    @contextmanager
    def hooks(self, model: nn.Module) -> Iterator[None]:
        self._heads, self._prefix = model.blocks[0].attn.num_heads, model.num_prefix_tokens

        def keep(_module: nn.Module, args: tuple) -> None:
            self._features.append(args[0])

        handles = [block.attn.proj.register_forward_pre_hook(keep) for block in model.blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._features.clear()

    def loss(self, logits, labels, priors):
        total, parts = super().loss(logits, labels, priors)
        entropy = sum(patch_similarity_entropy(f, self._heads, self._prefix) for f in self._features)
        self._features.clear()
        parts["patch_entropy"] = entropy.detach()
        return total - self.config.patch_similarity_weight * entropy, parts
