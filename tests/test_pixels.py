import torch

from smi_plugin.pixels import ChannelMap, initial_noise, patch_frequency_basis
from smi_plugin.tokens import PatchGrid, images_to_patches

GRID = PatchGrid(patch_size=(2, 2), grid_size=(2, 2), num_prefix_tokens=1, in_chans=3)
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def test_untied_map_is_the_identity_and_clamps_to_pixels_0_and_1():
    channels = ChannelMap.build(MEAN, STD, tie_channels=False)
    assert channels.param_channels == 3
    patches = torch.randn(2, 4, 12) * 10
    assert channels.to_model(patches) is patches
    channels.clamp_(patches)
    pixels = channels.to_pixels(patches, GRID)
    assert pixels.min() >= 0 and pixels.max() <= 1
    assert (pixels == 0).any() and (pixels == 1).any()  # the clamp bounds are exactly pixels 0 and 1


def test_to_pixels_inverts_the_normalization():
    channels = ChannelMap.build(MEAN, STD, tie_channels=False)
    pixels = torch.rand(2, 3, 4, 4)
    normalized = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(channels.to_pixels(images_to_patches(normalized, (2, 2)), GRID), pixels, atol=1e-6)


def test_tied_channels_drive_every_channel_with_one_gray_level():
    channels = ChannelMap.build(MEAN, STD, tie_channels=True)
    assert channels.param_channels == 1
    gray = torch.randn(2, 4, 4) * 10
    channels.clamp_(gray)
    pixels = channels.to_pixels(gray, GRID)
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-6) and torch.allclose(pixels[:, 0], pixels[:, 2], atol=1e-6)
    assert pixels.min() >= 0 and pixels.max() <= 1


def test_from_pixels_is_the_inverse_of_to_pixels():
    pixels = torch.rand(2, 3, 4, 4)
    untied = ChannelMap.build(MEAN, STD, tie_channels=False)
    assert torch.allclose(untied.to_pixels(untied.from_pixels(pixels, GRID), GRID), pixels, atol=1e-6)
    tied = ChannelMap.build(MEAN, STD, tie_channels=True)
    gray = pixels.mean(1, keepdim=True)  # tied channels keep the gray level: the channels' average
    assert torch.allclose(tied.to_pixels(tied.from_pixels(pixels, GRID), GRID), gray.expand(-1, 3, -1, -1), atol=1e-6)


def test_patch_noise_is_one_draw_per_patch_smoothed_to_unit_variance():
    """``patch`` noise: the coarse draw per patch, bilinearly upsampled (each patch's mean tracks its own
    draw), unit variance per image, and far smoother than per-pixel noise; ``pixel`` is torch.randn's."""
    grid = PatchGrid(patch_size=(4, 4), grid_size=(6, 5), num_prefix_tokens=1, in_chans=1)
    coarse = torch.randn(8, 1, 6, 5, generator=torch.Generator().manual_seed(3))
    smooth = initial_noise("patch", 8, 1, grid, torch.Generator().manual_seed(3))
    assert smooth.shape == (8, 1, 24, 20)
    assert torch.allclose(smooth.flatten(1).std(1), torch.ones(8), atol=1e-5)
    patch_means = torch.nn.functional.avg_pool2d(smooth, 4)
    assert torch.corrcoef(torch.stack([patch_means.flatten(), coarse.flatten()]))[0, 1] > 0.9
    pixel = initial_noise("pixel", 8, 1, grid, torch.Generator().manual_seed(3))
    assert torch.equal(pixel, torch.randn(8, 1, 24, 20, generator=torch.Generator().manual_seed(3)))

    def roughness(x):  # mean squared difference of horizontal neighbours: 2 for white noise of unit variance
        return (x[..., 1:] - x[..., :-1]).pow(2).mean().item()
    assert roughness(smooth) < 0.2 < 1.5 < roughness(pixel)


def test_patch_frequency_basis_is_scaled_cosines_of_the_patch():
    """Columns: orthogonal 2-D cosines over row-major pixels (the constant first, a cosine along the
    width next), scaled by (1 + |f|)^-decay relative to each other, unit root-mean-square scale."""
    basis = patch_frequency_basis((2, 3), 1.0).double()
    gram = basis.T @ basis  # diagonal: the squared scales
    scales = gram.diagonal().sqrt()
    assert torch.allclose(gram, torch.diag(gram.diagonal()), atol=1e-6)
    assert torch.allclose(scales.pow(2).mean(), torch.tensor(1.0, dtype=torch.float64))
    frequency = torch.tensor([[0, 1, 2], [1, 2 ** 0.5, 5 ** 0.5]], dtype=torch.float64).flatten()
    assert torch.allclose(scales / scales[0], 1 / (1 + frequency), atol=1e-6)
    assert torch.allclose(basis[:, 0], torch.full((6,), scales[0].item() / 6 ** 0.5, dtype=torch.float64))
    along_width = basis[:, 1].view(2, 3)  # cos(pi (j + 0.5) / 3): +, 0, - in each row
    assert torch.allclose(along_width[0], along_width[1]) and along_width[0, 0] > 0 > along_width[0, 2]
    assert abs(along_width[0, 1]) < 1e-6
    assert torch.allclose(patch_frequency_basis((4, 4), 0.0).T @ patch_frequency_basis((4, 4), 0.0),
                          torch.eye(16), atol=1e-6)
