import pytest
import torch

from smi_plugin.losses import image_l2, input_statistics, tv_l1, tv_l2
from smi_plugin.priors import RetainedPixelPriors, crossing_groups
from smi_plugin.tokens import PatchGrid, patches_to_images

WHOLE_IMAGE = {"tv_l2": tv_l2, "tv_l1": tv_l1, "l2": image_l2, "input_stats": input_statistics}


def _naive_tv_l2(images: torch.Tensor) -> torch.Tensor:
    """TV_l2 written out pixel pair by pixel pair (an independent truth for the sliced definitions)."""
    total = images.new_zeros(images.shape[0])
    h, w = images.shape[-2:]
    for dy, dx in ((0, 1), (1, 0), (1, -1), (1, 1)):
        square = images.new_zeros(images.shape[0])
        for y in range(h - dy):
            for x in range(max(0, -dx), w - max(0, dx)):
                square = square + (images[:, :, y + dy, x + dx] - images[:, :, y, x]).pow(2).sum(1)
        total = total + square.sqrt()
    return total.mean()


def test_tv_l2_matches_pixel_pairs():
    images = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    assert torch.allclose(tv_l2(images), _naive_tv_l2(images), rtol=1e-12)


@pytest.mark.parametrize("channels, grid_size, patch, keep", [(3, (8, 8), 4, 13), (1, (4, 6), 3, 5), (3, (5, 5), 2, 25),
                                                             (3, (6, 5), 3, 1)])
def test_retained_pixel_priors_equal_whole_image_priors(channels, grid_size, patch, keep):
    torch.manual_seed(0)
    grid = PatchGrid((patch, patch), grid_size, 1, channels)
    b, n, d = 3, grid.num_patches, channels * patch * patch
    canvas = torch.randn(b, n, d, dtype=torch.float64)
    kept = torch.stack([torch.randperm(n)[:keep].sort().values for _ in range(b)])
    plan = RetainedPixelPriors.plan(canvas, kept, grid, channels)

    param_sparse = canvas.gather(1, kept.unsqueeze(-1).expand(-1, -1, d)).clone().requires_grad_(True)
    sparse = plan.bind(param_sparse, with_abs=True)
    param_dense = param_sparse.detach().clone().requires_grad_(True)
    full = patches_to_images(canvas.scatter(1, kept.unsqueeze(-1).expand(-1, -1, d), param_dense), grid, channels)

    for term, whole_image in WHOLE_IMAGE.items():
        value_sparse, value_dense = getattr(sparse, term)(), whole_image(full)
        assert torch.allclose(value_sparse, value_dense, rtol=1e-10, atol=1e-10), term
        grad_sparse, = torch.autograd.grad(value_sparse, param_sparse, retain_graph=True)
        grad_dense, = torch.autograd.grad(value_dense, param_dense, retain_graph=True)
        assert torch.allclose(grad_sparse, grad_dense, rtol=1e-9, atol=1e-12), term


def test_tv_weights_combine_in_one_backward():
    """tv_l2 and tv_l1 share one fused node; their weighted sum has the sum of their gradients."""
    torch.manual_seed(1)
    grid = PatchGrid((3, 3), (4, 4), 1, 2)
    canvas = torch.randn(2, 16, 18, dtype=torch.float64)
    kept = torch.tensor([[0, 5, 6, 15], [1, 2, 3, 9]])
    plan = RetainedPixelPriors.plan(canvas, kept, grid, 2)
    param = canvas.gather(1, kept.unsqueeze(-1).expand(-1, -1, 18)).clone().requires_grad_(True)
    bound = plan.bind(param, with_abs=True)
    grad, = torch.autograd.grad(0.3 * bound.tv_l2() + 2.0 * bound.tv_l1(), param)
    full = patches_to_images(canvas.scatter(1, kept.unsqueeze(-1).expand(-1, -1, 18), param), grid, 2)
    expected, = torch.autograd.grad(0.3 * tv_l2(full) + 2.0 * tv_l1(full), param)
    assert torch.allclose(grad, expected, rtol=1e-9, atol=1e-12)


def test_tv_l1_needs_the_absolute_sums():
    grid = PatchGrid((2, 2), (2, 2), 1, 1)
    plan = RetainedPixelPriors.plan(torch.randn(1, 4, 4), torch.tensor([[0, 3]]), grid, 1)
    with pytest.raises(ValueError, match="with_abs=True"):
        plan.bind(torch.randn(1, 2, 4)).tv_l1()


def test_crossing_groups_cover_every_pair_between_patches_once():
    grid = PatchGrid((3, 3), (4, 5), 1, 2)
    h, w = grid.image_size
    for direction, (dy, dx) in enumerate(((0, 1), (1, 0), (1, -1), (1, 1))):
        groups = [g for g in crossing_groups(grid, 2) if g.direction == direction]
        listed = sum(g.first.numel() * g.first_offset.numel() for g in groups)
        # Pairs of the direction whose two pixels lie in different patches, counted directly.
        crossing = sum(1 for y in range(h - dy) for x in range(max(0, -dx), w - max(0, dx))
                       if (y // 3, x // 3) != ((y + dy) // 3, (x + dx) // 3)) * 2
        assert listed == crossing


def test_plan_lists_only_pairs_near_retained_patches():
    grid = PatchGrid((4, 4), (8, 8), 1, 3)
    plan = RetainedPixelPriors.plan(torch.randn(1, 64, 48), torch.tensor([[27]]), grid, 3)  # one interior patch
    # Right and down: 4 pairs across each of two sides; each diagonal: 7 pairs leaving the patch
    # (a row and a column of 4 sharing a corner pixel) and 7 entering it. Times 3 channels.
    assert plan.widths == (24, 24, 42, 42)
