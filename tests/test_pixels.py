import torch

from smi_plugin.pixels import ChannelMap
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
