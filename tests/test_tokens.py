import pytest
import timm
import torch
import torch.nn.functional as F

from smi_plugin import UnsupportedModelError, forward_kept_tokens
from smi_plugin.tokens import (PatchLevelViT, forward_patches, images_to_patches, indices_to_mask, mask_to_indices,
                               patch_grid, patches_to_images, position_tokens, record_cls_attention, vit_precision)

from conftest import make_vit


def _images(model, batch=3, seed=0):
    torch.manual_seed(seed)
    return torch.randn(batch, 3, *model.patch_embed.img_size)


@torch.no_grad()
def test_all_true_mask_matches_timm_forward(family_vit):
    x = _images(family_vit)
    grid = patch_grid(family_vit)
    mask = torch.ones(x.shape[0], *grid.grid_size, dtype=torch.bool)
    expected = family_vit(x)
    assert torch.allclose(forward_kept_tokens(family_vit, x, mask), expected, atol=1e-5, rtol=0)
    assert torch.allclose(forward_kept_tokens(family_vit, x), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_kept_tokens_match_timm_with_dropped_tokens(family_vit):
    """An independent route: timm's own embedding, then drop tokens after the position embedding."""
    x = _images(family_vit)
    grid = patch_grid(family_vit)
    generator = torch.Generator().manual_seed(1)
    keep = torch.stack([torch.randperm(grid.num_patches, generator=generator)[:grid.num_patches // 3]
                        for _ in range(x.shape[0])]).sort(1).values
    tokens = family_vit._pos_embed(family_vit.patch_embed(x))
    prefix = grid.num_prefix_tokens
    kept_tokens = tokens[:, prefix:].gather(1, (keep).unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    reference = family_vit.forward_head(family_vit.norm(family_vit.blocks(
        torch.cat([tokens[:, :prefix], kept_tokens], 1))))
    ours = forward_kept_tokens(family_vit, x, indices_to_mask(keep, grid))
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)


def test_a_class_token_head_makes_the_last_block_compute_only_the_prefix_rows(family_vit):
    """Same logits and input gradients as timm's full last block (which a hook on it brings back), for
    exactly the FLOPs of the patch rows' projection, MLP and attention queries fewer."""
    from smi_plugin.flops import flop_counter

    grid = patch_grid(family_vit)
    patches = images_to_patches(_images(family_vit, batch=2), grid.patch_size).requires_grad_(True)
    positions = torch.arange(grid.num_patches).expand(2, -1)
    cache = position_tokens(family_vit, grid, patches.dtype)

    def logits_grads_flops():
        counter = flop_counter()
        with counter:
            logits = forward_patches(family_vit, grid, patches, positions, cache)
        return logits, torch.autograd.grad(logits.square().sum(), patches)[0], counter.get_total_flops()

    fast = logits_grads_flops()
    handle = family_vit.blocks[-1].attn.register_forward_pre_hook(lambda module, args: None)
    full = logits_grads_flops()
    handle.remove()
    assert torch.allclose(fast[0], full[0], atol=1e-5, rtol=0) and torch.allclose(fast[1], full[1], atol=1e-5, rtol=0)
    dim, hidden = family_vit.embed_dim, family_vit.blocks[-1].mlp.fc1.out_features
    tokens, patch_rows = grid.num_prefix_tokens + grid.num_patches, 2 * grid.num_patches
    saved = 2 * patch_rows * (dim * dim + 2 * dim * hidden) + 4 * patch_rows * tokens * dim
    assert full[2] - fast[2] == (0 if family_vit.global_pool == "avg" else saved)


@torch.no_grad()
def test_unequal_kept_counts_are_grouped_in_input_order(tiny_vit):
    x = _images(tiny_vit, batch=4)
    grid = patch_grid(tiny_vit)
    mask = torch.zeros(4, grid.num_patches, dtype=torch.bool)
    for row, count in enumerate([5, 9, 5, 64]):
        mask[row, torch.randperm(grid.num_patches)[:count]] = True
    mask = mask.reshape(4, *grid.grid_size)
    together = forward_kept_tokens(tiny_vit, x, mask)
    one_by_one = torch.cat([forward_kept_tokens(tiny_vit, x[i:i + 1], mask[i:i + 1]) for i in range(4)])
    assert torch.allclose(together, one_by_one, atol=1e-5, rtol=0)
    assert torch.allclose(together[3], tiny_vit(x[3:4])[0], atol=1e-5, rtol=0)


def test_patch_layout_round_trips_and_matches_conv(tiny_vit):
    x = _images(tiny_vit)
    grid = patch_grid(tiny_vit)
    patches = images_to_patches(x, grid.patch_size)
    assert torch.equal(patches_to_images(patches, grid), x)
    proj = tiny_vit.patch_embed.proj
    conv = proj(x).flatten(2).transpose(1, 2)
    assert torch.allclose(patches @ proj.weight.flatten(1).T + proj.bias, conv, atol=1e-5)


@torch.no_grad()
def test_patch_level_vit_is_timm_forward_and_its_projection_follows_the_conv():
    model = make_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2)
    patch_model = PatchLevelViT(model).double()  # a conversion after wrapping must keep the two tied
    x = _images(model).double()
    grid = patch_model.grid
    positions = torch.arange(grid.num_patches).expand(x.shape[0], -1)
    logits = patch_model(images_to_patches(x, grid.patch_size), positions)
    assert logits.dtype == torch.float64 and torch.allclose(logits, model(x), atol=1e-10, rtol=0)
    conv_weight = model.patch_embed.proj.weight
    assert patch_model.patch_projection.weight.data_ptr() == conv_weight.data_ptr()
    conv_weight.mul_(2)  # one storage: a change to the conv is the projection's too
    assert torch.equal(patch_model.patch_projection.weight, conv_weight.flatten(1))


@torch.no_grad()
@pytest.mark.parametrize("family", ["deit", "registers", "deit_distilled"])
def test_cls_scores_equal_explicit_attention_map(family):
    from conftest import FAMILIES

    name, overrides = FAMILIES[family]
    model = make_vit(name, **overrides)
    attn = model.blocks[-1].attn
    attn.fused_attn = False  # timm's explicit path: softmax(q k^T scale) goes through attn_drop
    maps = []
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o))
    x = _images(model)
    with record_cls_attention(model) as record:
        model(x)
    handle.remove()
    expected = maps[0].mean(1)[:, 0, model.num_prefix_tokens:]
    assert torch.allclose(record["scores"], expected, atol=1e-6)
    assert not attn._forward_pre_hooks  # the hook leaves with the context


def test_mask_index_conversions(tiny_vit):
    grid = patch_grid(tiny_vit)
    kept = torch.tensor([[0, 5, 63], [1, 2, 3]])
    mask = indices_to_mask(kept, grid)
    assert mask.shape == (2, 8, 8) and mask.sum() == 6
    assert torch.equal(mask_to_indices(mask), kept)
    with pytest.raises(ValueError, match="different numbers"):
        mask_to_indices(torch.stack([mask[0], mask[0] | mask[1]]))


def test_unsupported_models_get_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="not supported"):
        forward_kept_tokens(torch.nn.Conv2d(3, 3, 3), torch.zeros(1, 3, 32, 32))
    no_cls = timm.create_model("vit_tiny_patch16_224", depth=1, img_size=32, patch_size=4, class_token=False,
                               global_pool="avg")
    with pytest.raises(UnsupportedModelError, match="no class token"):
        forward_kept_tokens(no_cls, torch.zeros(1, 3, 32, 32))


def test_bad_masks_and_sizes(tiny_vit):
    x = _images(tiny_vit, batch=2)
    with pytest.raises(ValueError, match="patch grid"):
        forward_kept_tokens(tiny_vit, x, torch.ones(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no patch"):
        forward_kept_tokens(tiny_vit, x, torch.zeros(2, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="accepts"):
        forward_kept_tokens(tiny_vit, torch.zeros(1, 3, 64, 64))


def test_bfloat16_precision_runs_linears_in_bfloat16_and_attention_in_float32_on_the_cpu():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=generator).bfloat16() for _ in range(3))
    weight = torch.randn(4, 8, generator=generator)
    float32_attention = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).bfloat16()
    with vit_precision("cpu", "bfloat16"):
        attention = F.scaled_dot_product_attention(q, k, v)
        linear = F.linear(q.float(), weight)
    assert attention.dtype == torch.bfloat16 and torch.equal(attention, float32_attention)
    assert linear.dtype == torch.bfloat16
    with vit_precision("cpu", "float32"):
        assert F.linear(q.float(), weight).dtype == torch.float32
    with pytest.raises(ValueError, match="float16"):
        with vit_precision("cpu", "float16"):
            pass
