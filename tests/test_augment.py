import torch

from smi_plugin.augment import random_resized_crop_cells, roll_flip_patches
from smi_plugin.tokens import PatchGrid, images_to_patches, patches_to_images

GRID = PatchGrid(patch_size=(4, 4), grid_size=(4, 4), num_prefix_tokens=1, in_chans=3)


def _place(positions, patches):
    return patches_to_images(torch.zeros_like(patches).scatter_(1, positions.unsqueeze(-1).expand_as(patches), patches), GRID)


def test_roll_and_flip_of_patches_equal_rolling_and_flipping_the_image():
    images = torch.randn(8, 3, 16, 16)
    kept = torch.arange(16).expand(8, -1)
    positions, moved = roll_flip_patches(kept, images_to_patches(images, (4, 4)), GRID, 0.5, True,
                                         torch.Generator().manual_seed(0))
    placed = _place(positions, moved)
    for i in range(8):
        candidates = [torch.roll(images[i], (dy * 4, dx * 4), (1, 2)) for dy in range(-2, 3) for dx in range(-2, 3)]
        assert any(torch.equal(placed[i], c) or torch.equal(placed[i], c.flip(-1)) for c in candidates)


def test_no_jitter_no_flip_is_the_identity_and_draws_nothing():
    patches = torch.randn(2, 16, 48)
    kept = torch.arange(16).expand(2, -1)
    generator = torch.Generator().manual_seed(1)
    state = generator.get_state()
    positions, same = roll_flip_patches(kept, patches, GRID, 0.0, False, generator)
    assert torch.equal(positions, kept) and same is patches
    assert torch.equal(generator.get_state(), state)


def test_sparse_roll_moves_only_the_retained_patches_positions():
    kept = torch.tensor([[0, 5, 15]])
    positions, _ = roll_flip_patches(kept, torch.randn(1, 3, 48), GRID, 0.5, False, torch.Generator().manual_seed(2))
    dy, dx = (positions[0, 0] // 4).item(), (positions[0, 0] % 4).item()
    expected = [((r + dy) % 4) * 4 + (c + dx) % 4 for r, c in ((0, 0), (1, 1), (3, 3))]
    assert positions[0].tolist() == expected


def test_crop_cells_are_k_distinct_ascending_cells_and_seeded():
    images = torch.randn(3, 3, 16, 16, requires_grad=True)
    kept = torch.tensor([[0, 1, 2, 3, 4]] * 3)
    first = random_resized_crop_cells(images, kept, GRID, (0.25, 1.0), True, torch.Generator().manual_seed(4))
    second = random_resized_crop_cells(images, kept, GRID, (0.25, 1.0), True, torch.Generator().manual_seed(4))
    cells, patches = first
    assert cells.shape == (3, 5) and patches.shape == (3, 5, 48)
    assert bool((cells.diff(dim=1) > 0).all()) and int(cells.max()) < 16
    assert torch.equal(cells, second[0]) and torch.equal(patches, second[1])
    patches.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_full_crop_of_a_fully_retained_image_covers_every_cell():
    images = torch.randn(2, 3, 16, 16)
    kept = torch.arange(16).expand(2, -1)
    cells, _ = random_resized_crop_cells(images, kept, GRID, (1.0, 1.0), False, torch.Generator().manual_seed(0))
    assert torch.equal(cells, kept)
