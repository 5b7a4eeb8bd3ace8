import pytest
import torch

from smi_plugin.losses import ImagePriors
from smi_plugin.priors import RetainedPixelPriors
from smi_plugin.tokens import PatchGrid, patches_to_images


@pytest.mark.parametrize("channels, grid_size, patch, keep", [(3, (8, 8), 4, 13), (1, (4, 6), 3, 5), (3, (5, 5), 2, 25)])
def test_retained_pixel_priors_equal_whole_image_priors(channels, grid_size, patch, keep):
    torch.manual_seed(0)
    grid = PatchGrid((patch, patch), grid_size, 1, channels)
    b, n, d = 3, grid.num_patches, channels * patch * patch
    canvas = torch.randn(b, n, d, dtype=torch.float64)
    kept = torch.stack([torch.randperm(n)[:keep].sort().values for _ in range(b)])
    plan = RetainedPixelPriors.plan(canvas, kept, grid, channels)

    param_sparse = canvas.gather(1, kept.unsqueeze(-1).expand(-1, -1, d)).clone().requires_grad_(True)
    sparse = plan.bind(param_sparse)
    param_dense = param_sparse.detach().clone().requires_grad_(True)
    full = canvas.scatter(1, kept.unsqueeze(-1).expand(-1, -1, d), param_dense)
    dense = ImagePriors(patches_to_images(full, grid, channels))

    for term in ("tv_l2", "tv_l1", "l2", "input_stats"):
        value_sparse, value_dense = getattr(sparse, term)(), getattr(dense, term)()
        assert torch.allclose(value_sparse, value_dense, rtol=1e-10, atol=1e-10), term
        grad_sparse, = torch.autograd.grad(value_sparse, param_sparse, retain_graph=True)
        grad_dense, = torch.autograd.grad(value_dense, param_dense, retain_graph=True)
        assert torch.allclose(grad_sparse, grad_dense, rtol=1e-9, atol=1e-12), term


def test_plan_touches_only_pixels_near_retained_patches():
    grid = PatchGrid((4, 4), (8, 8), 1, 3)
    canvas = torch.randn(1, 64, 48)
    plan = RetainedPixelPriors.plan(canvas, torch.tensor([[27]]), grid, 3)  # one interior patch
    # Frozen border: 3 channels x (4 right + 4 below + 4 left + 4 above + 3 corner-ish diagonals) pixels at most.
    assert plan.border.shape[1] - 1 <= 3 * (4 * 4 + 4)
    # Crossing pairs per direction: at most 2 * (4 + 4) - 1 per channel for a diagonal.
    assert max(a.shape[1] for a, _ in plan.pairs) <= 3 * 15
    assert min(a.shape[1] for a, _ in plan.pairs) == 3 * 8
