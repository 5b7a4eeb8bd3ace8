"""Running a timm ViT on a subset of its patch tokens, and ranking patches by CLS attention.

Everything here uses timm's own seams: ``patch_embed.proj`` weights, ``_pos_embed`` (so class,
distillation and register tokens, ``no_embed_class`` and dynamic image sizes behave exactly as in
timm), ``patch_drop``/``norm_pre``, the blocks as they are (LayerScale, fused attention), ``norm`` and
``forward_head``. Only the selected patches are embedded: the patch-embedding convolution is
evaluated as a matrix product on the kept patches alone. When the head reads the prefix tokens alone
(class-token pooling), the last block computes only their rows (``prefix_block_forward``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


class UnsupportedModelError(TypeError):
    """The model is not a timm VisionTransformer with a class token and a patch-embedding conv."""


# What a ViT's forward can run at (``vit_precision``).
PRECISIONS = ("float32", "bfloat16")

SUPPORTED = ("timm VisionTransformer models with a class token (ViT, DeiT, DeiT-distilled, DeiT-III, "
             "ViTs with register tokens) whose patch embedding is a single strided convolution")


@dataclass(frozen=True)
class PatchGrid:
    """Geometry of a ViT's patch grid at one image size."""

    patch_size: tuple[int, int]
    grid_size: tuple[int, int]
    num_prefix_tokens: int
    in_chans: int

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.grid_size[0] * self.patch_size[0], self.grid_size[1] * self.patch_size[1]

    @property
    def patch_dim(self) -> int:
        return self.in_chans * self.patch_size[0] * self.patch_size[1]


def check_vit(model: nn.Module) -> None:
    """Raise ``UnsupportedModelError`` unless ``model`` is a ViT this library can sparsify."""
    from timm.models.vision_transformer import VisionTransformer

    name = type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(f"{name} is not supported: smi-plugin works with {SUPPORTED}")
    if getattr(model, "cls_token", None) is None:
        raise UnsupportedModelError(
            f"{name} has no class token (class_token=False), so there is no CLS attention to rank patches "
            f"by; supported: {SUPPORTED}")
    proj = getattr(model.patch_embed, "proj", None)
    if not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride or proj.padding != (0, 0):
        raise UnsupportedModelError(f"{name}'s patch embedding is not a single non-overlapping convolution "
                                    f"(hybrid stems are not supported); supported: {SUPPORTED}")
    if getattr(model.patch_embed, "dynamic_img_pad", False):
        raise UnsupportedModelError(f"{name} pads images dynamically (dynamic_img_pad=True), which breaks the "
                                    "fixed patch grid; create it with dynamic_img_pad=False")
    if not hasattr(model.blocks[-1], "attn") or not hasattr(model.blocks[-1].attn, "qkv"):
        raise UnsupportedModelError(f"{name}'s last block has no `attn.qkv` to read CLS attention from; "
                                    f"supported: {SUPPORTED}")


def patch_grid(model: nn.Module, image_size: tuple[int, int] | None = None) -> PatchGrid:
    """The patch grid of ``model`` at ``image_size`` (default: the model's own input size).

    Raises:
        ValueError: if the model does not accept that image size.
    """
    check_vit(model)
    embed = model.patch_embed
    patch = tuple(embed.proj.kernel_size)
    native = tuple(embed.img_size) if embed.img_size is not None else None
    size = tuple(image_size) if image_size is not None else native
    if size is None:
        raise ValueError("the model has no fixed image size; pass image_size=(H, W)")
    if size[0] % patch[0] or size[1] % patch[1]:
        raise ValueError(f"image size {size} is not a multiple of the patch size {patch}")
    if size != native and not getattr(model, "dynamic_img_size", False):
        raise ValueError(f"the model accepts {native} images only (create it with dynamic_img_size=True to "
                         f"accept {size})")
    return PatchGrid(patch, (size[0] // patch[0], size[1] // patch[1]), model.num_prefix_tokens,
                     embed.proj.in_channels)


def images_to_patches(images: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, C*p*p)``, patches in row-major grid order, laid out like conv weights."""
    b, c, h, w = images.shape
    ph, pw = patch_size
    x = images.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // ph) * (w // pw), c * ph * pw)


def patches_to_images(patches: torch.Tensor, grid: PatchGrid, channels: int | None = None) -> torch.Tensor:
    """Inverse of ``images_to_patches``: ``(B, N, C*p*p)`` -> ``(B, C, H, W)``."""
    b = patches.shape[0]
    (gh, gw), (ph, pw) = grid.grid_size, grid.patch_size
    c = channels or grid.in_chans
    x = patches.reshape(b, gh, gw, c, ph, pw).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, gh * ph, gw * pw)


def mask_to_indices(patch_mask: torch.Tensor) -> torch.Tensor:
    """``(B, gh, gw)`` bool mask with equal counts per image -> ``(B, K)`` ascending kept indices."""
    flat = patch_mask.flatten(1)
    counts = flat.sum(1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError("images in one batch keep different numbers of patches; group them by kept count")
    return flat.nonzero()[:, 1].reshape(flat.shape[0], -1)


def indices_to_mask(kept: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """``(B, K)`` kept patch indices -> ``(B, gh, gw)`` bool mask."""
    mask = torch.zeros(kept.shape[0], grid.num_patches, dtype=torch.bool, device=kept.device)
    mask.scatter_(1, kept, True)
    return mask.reshape(kept.shape[0], *grid.grid_size)


def position_tokens(model: nn.Module, grid: PatchGrid, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prefix tokens with their embeddings (1, P, C), patch position embeddings (1, N, C))``.

    Computed by timm's own ``_pos_embed`` on zero patch tokens, so every prefix/position layout
    timm supports (class, distillation, register tokens, ``no_embed_class``, resampled
    positions for dynamic image sizes) is honoured without re-implementing it.
    """
    device = model.cls_token.device
    if getattr(model, "dynamic_img_size", False):
        zeros = torch.zeros(1, *grid.grid_size, model.embed_dim, device=device, dtype=dtype)
    else:
        zeros = torch.zeros(1, grid.num_patches, model.embed_dim, device=device, dtype=dtype)
    tokens = model._pos_embed(zeros)
    return tokens[:, :grid.num_prefix_tokens], tokens[:, grid.num_prefix_tokens:]


def embed_patches(model: nn.Module, patches: torch.Tensor, projection: nn.Module | None = None) -> torch.Tensor:
    """Patch embedding of ``(B, K, C*p*p)`` patches -> ``(B, K, D)``: the conv as a matmul, then its norm.

    ``projection``: the conv as an ``nn.Linear`` on flattened patches, when the caller holds one
    (``PatchLevelViT`` does); by default the conv's weight is used as a matrix directly.
    """
    proj = model.patch_embed.proj
    tokens = F.linear(patches, proj.weight.flatten(1), proj.bias) if projection is None else projection(patches)
    return model.patch_embed.norm(tokens)


def forward_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Run prefix + patch tokens (position embeddings already added) through the rest of the ViT.

    Equals timm's forward from ``patch_drop`` on. Where the head reads the prefix tokens alone and the
    last block is timm's plain ``Block`` with no hook on it, that block computes only the prefix rows:
    the patch tokens' last-block outputs never reach the logits, and skipping them saves 6.5-7% of a
    DeiT's forward and backward FLOPs at every kept count.
    """
    x = model.patch_drop(tokens)
    x = model.norm_pre(x)
    *blocks, last = model.blocks
    for block in blocks:
        x = block(x)
    if _head_reads_prefix_only(model) and _is_plain_block(last):
        x = prefix_block_forward(last, x, model.num_prefix_tokens)
    else:
        x = last(x)
    x = model.norm(x)
    return model.forward_head(x)


def prefix_block_forward(block: nn.Module, x: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """timm's ``Block`` on ``x`` ``(B, N, D)`` with the first ``num_prefix_tokens`` rows as its only queries.

    Returns ``block(x)[:, :num_prefix_tokens]``: keys and values come from every token, while the
    attention output, projection and MLP run on the prefix rows alone. Mirrors timm's
    ``Attention.forward`` and ``Block.forward`` (fused attention, q/k norms, gate, LayerScale,
    dropouts), calling the block's own submodules so quantizers and toolkit hooks on them still apply.
    """
    attn, b, n = block.attn, x.shape[0], x.shape[1]
    normed = block.norm1(x)
    q, k, v = attn.qkv(normed).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q[:, :, :num_prefix_tokens]), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(b, num_prefix_tokens, -1))
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(normed[:, :num_prefix_tokens]).sigmoid()
    # contiguous: inductor's int8 linear fused with a residual add misreads a strided residual (torch 2.14)
    x = x[:, :num_prefix_tokens].contiguous() + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _head_reads_prefix_only(model: nn.Module) -> bool:
    """Whether ``model.forward_head`` reads nothing but the prefix tokens (class/distillation-token pooling)."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    cls = type(model)
    if cls.forward_head is VisionTransformerDistilled.forward_head:
        return True
    return (cls.forward_head is VisionTransformer.forward_head and cls.pool is VisionTransformer.pool
            and model.global_pool == "token" and model.attn_pool is None)


def _is_plain_block(block: nn.Module) -> bool:
    """timm's own ``Block``/``Attention`` with fused attention and no hook anywhere in it (a hook's owner,
    such as ``record_cls_attention`` or a method reading every token's features, gets timm's forward)."""
    from timm.models.vision_transformer import Attention, Block

    return (type(block) is Block and type(block.attn) is Attention and block.attn.fused_attn
            and not any(m._forward_hooks or m._forward_pre_hooks for m in block.modules()))


def forward_patches(model: nn.Module, grid: PatchGrid, patches: torch.Tensor, positions: torch.Tensor,
                    position_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                    projection: nn.Module | None = None) -> torch.Tensor:
    """Logits of ``model`` on ``patches`` ``(B, K, C*p*p)`` placed at grid ``positions`` ``(B, K)``.

    ``positions`` need not be sorted nor be the patches' original places: the inverter uses them to
    express whole-patch rolls and flips without touching the full image. ``projection``: see
    ``embed_patches``.
    """
    prefix, patch_pos = position_cache or position_tokens(model, grid, patches.dtype)
    tokens = embed_patches(model, patches, projection)
    pos = patch_pos.expand(tokens.shape[0], -1, -1).gather(1, positions.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    tokens = torch.cat([prefix.expand(tokens.shape[0], -1, -1), tokens + pos], dim=1)
    return forward_tokens(model, tokens)


class PatchLevelViT(nn.Module):
    """``(patches (B, K, C*p*p), positions (B, K)) -> logits``: the ViT run on the given patches only.

    A thin module over ``forward_patches`` (the form exporters, quantizers and calibration hooks
    trace). It shares ``model``'s parameters, so a toolkit that instruments its submodules
    instruments the model itself. The patch-embedding conv is also held as ``patch_projection``, an
    ``nn.Linear`` on flattened patches whose weight is a view of the conv's (same storage) and whose
    bias is the conv's, so traced graphs see a linear layer like every other, which quantizers
    lower to an int8 matmul. The view is re-taken after ``.to()``/``.half()``, so the two never
    part; it is frozen (gradients reach the conv only through ``model`` itself): the wrapper is for
    tracing and inference.
    """

    def __init__(self, model: nn.Module, image_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        check_vit(model)
        self.model = model
        self.grid: PatchGrid = patch_grid(model, image_size)
        proj = model.patch_embed.proj
        self.patch_projection = nn.Linear(self.grid.patch_dim, proj.out_channels, bias=proj.bias is not None,
                                          device="meta")
        self._tie_projection()

    def _tie_projection(self) -> None:
        proj = self.model.patch_embed.proj
        self.patch_projection.weight = nn.Parameter(proj.weight.detach().flatten(1), requires_grad=False)
        self.patch_projection.bias = proj.bias

    def _apply(self, fn, recurse: bool = True):
        # nn.Module._apply converts the view into a tensor of its own; point it back at the conv's storage.
        super()._apply(fn, recurse)
        self._tie_projection()
        return self

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return forward_patches(self.model, self.grid, patches, positions, projection=self.patch_projection)


def forward_kept_tokens(model: nn.Module, pixel_values: torch.Tensor,
                        patch_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of a timm ViT when only the kept patches enter the transformer.

    Args:
        model: a supported timm ``VisionTransformer`` (see ``check_vit``).
        pixel_values: ``(B, C, H, W)`` images, normalized as the model expects.
        patch_mask: ``(B, H/p, W/p)`` bool, True where a patch is kept; ``None`` keeps all patches,
            which equals ``model(pixel_values)``. Images may keep different counts: they are run in
            groups of equal count and the logits returned in input order.

    Example:
        >>> logits = forward_kept_tokens(vit, batch.normalized(), batch.patch_mask)
    """
    grid = patch_grid(model, tuple(pixel_values.shape[-2:]))
    cache = position_tokens(model, grid, pixel_values.dtype)
    return run_on_kept_patches(lambda p, pos: forward_patches(model, grid, p, pos, cache), grid,
                               pixel_values, patch_mask)


def kept_patch_groups(pixel_values: torch.Tensor, patch_mask: torch.Tensor | None, grid: PatchGrid,
                      batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(rows, patches (b, K, C*p*p), positions (b, K))`` of each image's retained patches.

    Images are grouped by kept count, so every group is rectangular, with at most ``batch_size``
    images per group; ``patch_mask=None`` keeps every patch. The one place that turns masked images
    into what a kept-token forward takes (calibration, exporters, toolkit hooks all read it).
    """
    if pixel_values.dim() != 4 or pixel_values.shape[1] != grid.in_chans:
        raise ValueError(f"pixel_values must be (B, {grid.in_chans}, H, W), got {tuple(pixel_values.shape)}")
    patches = images_to_patches(pixel_values, grid.patch_size)
    b = patches.shape[0]
    if patch_mask is None:
        patch_mask = torch.ones(b, *grid.grid_size, dtype=torch.bool, device=patches.device)
    if patch_mask.shape != (b, *grid.grid_size):
        raise ValueError(f"patch_mask has shape {tuple(patch_mask.shape)} but the model's patch grid for these "
                         f"images is {(b, *grid.grid_size)}")
    patch_mask = patch_mask.to(device=patches.device, dtype=torch.bool)
    counts = patch_mask.flatten(1).sum(1)
    if bool((counts == 0).any()):
        raise ValueError("patch_mask keeps no patch for some images; every image needs at least one kept patch")
    for count in counts.unique().tolist():
        rows = (counts == count).nonzero().squeeze(1)
        step = batch_size or len(rows)
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            kept = mask_to_indices(patch_mask[chunk])
            yield chunk, patches[chunk].gather(1, kept.unsqueeze(-1).expand(-1, -1, patches.shape[-1])), kept


def run_on_kept_patches(patch_forward, grid: PatchGrid, pixel_values: torch.Tensor,
                        patch_mask: torch.Tensor | None) -> torch.Tensor:
    """Apply ``patch_forward(patches (b, K, C*p*p), positions (b, K))`` to the kept patches of each image.

    Outputs are returned in input order; ``patch_mask=None`` keeps every patch.
    """
    outputs = None
    for rows, patches, positions in kept_patch_groups(pixel_values, patch_mask, grid):
        out = patch_forward(patches, positions)
        if outputs is None:
            outputs = out.new_empty(pixel_values.shape[0], *out.shape[1:])
        outputs[rows] = out
    return outputs


def cls_attention_scores(attn: nn.Module, x: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Head-averaged attention from the CLS query to each patch token, ``(B, N - P)``.

    Only the CLS row is computed: ``softmax(q_cls k^T * scale)`` from the block's own ``qkv``
    weights and q/k norms, so the block itself keeps its fused attention.
    """
    b, n, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    dim = heads * head_dim
    q = F.linear(x[:, :1], weight[:dim], None if bias is None else bias[:dim])
    k = F.linear(x, weight[dim:2 * dim], None if bias is None else bias[dim:2 * dim])
    q = attn.q_norm(q.reshape(b, 1, heads, head_dim).transpose(1, 2))
    k = attn.k_norm(k.reshape(b, n, heads, head_dim).transpose(1, 2))
    weights = (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)
    return weights.mean(dim=1)[:, 0, num_prefix_tokens:]


class _Float32Attention(TorchFunctionMode):
    """Runs ``F.scaled_dot_product_attention`` in float32 inside a bfloat16 autocast and hands back the
    inputs' dtype. On the CPU, torch's bfloat16 flash-attention backward is slower than its float32 one
    (on DeiT-Base no faster at 137 tokens than at 196), while the linear layers gain about 2x from bfloat16."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        query, key, value, *rest = args
        mask = kwargs.get("attn_mask")
        if mask is not None and mask.is_floating_point():
            kwargs = {**kwargs, "attn_mask": mask.float()}
        with torch.autocast(query.device.type, enabled=False):
            return func(query.float(), key.float(), value.float(), *rest, **kwargs).to(query.dtype)


@contextmanager
def vit_precision(device_type: str, precision: str) -> Iterator[None]:
    """The context a ViT's forward (and its backward) runs in at ``precision``.

    ``"float32"``: nothing changes. ``"bfloat16"``: an autocast that runs the linear layers' matmuls in
    bfloat16 (AMX or AVX512-BF16 on CPUs, tensor cores on GPUs); LayerNorm, softmax and losses stay
    float32 as autocast keeps them, and on the CPU the attention too (see ``_Float32Attention``).
    Outputs may be bfloat16: cast the logits before a loss.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is unknown; use one of {list(PRECISIONS)}")
    if precision == "float32":
        yield
        return
    with torch.autocast(device_type, dtype=torch.bfloat16):
        if device_type == "cpu":
            with _Float32Attention():
                yield
        else:
            yield


@contextmanager
def record_cls_attention(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the last block's head-averaged CLS->patch attention of every forward made inside.

    Yields a dict whose ``"scores"`` entry holds the latest detached ``(B, K)`` scores, in the order
    the patch tokens were given. The hook exists only inside the context (the inverter enters it for
    the one forward before each stopping stage, so its other steps carry no hook).
    """
    record: dict[str, torch.Tensor] = {}
    attn = model.blocks[-1].attn
    prefix = model.num_prefix_tokens

    def hook(_module: nn.Module, args: tuple) -> None:
        # Scores in float32 even under a bfloat16 autocast, so near-equal attentions do not tie.
        x = args[0].detach()
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            record["scores"] = cls_attention_scores(attn, x.to(attn.qkv.weight.dtype), prefix)

    handle = attn.register_forward_pre_hook(hook)
    try:
        yield record
    finally:
        handle.remove()
