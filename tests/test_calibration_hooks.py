"""Toolkit-neutral calibration forms, checked against fake toolkits that record what they see."""

import torch

from smi_plugin.calibration import SparseInvertedCalibrationDataset
from smi_plugin.integrations.calibration_hooks import PatchLevelViT, kept_token_forward_loop, kept_token_inputs


def _sparse_data(model, seed: int = 0) -> SparseInvertedCalibrationDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(10, 3, 32, 32, generator=generator)
    mask = torch.rand(10, 8, 8, generator=generator) < 0.3
    mask[:, 0, 0] = True
    mask[:5] = mask[0]  # two images share a count at least
    return SparseInvertedCalibrationDataset.from_tensors(images, mask)


class _RecordingToolkit:
    """A ModelOpt/INC-like toolkit: instruments the blocks' inputs, then calls forward_loop(model)."""

    def __init__(self) -> None:
        self.token_counts: list[int] = []
        self.maxima: list[float] = []

    def quantize(self, model, forward_loop):
        handle = model.blocks[0].register_forward_pre_hook(self._record)
        try:
            forward_loop(model)
        finally:
            handle.remove()
        return model

    def _record(self, _module, args):
        self.token_counts += [args[0].shape[1]] * args[0].shape[0]
        self.maxima.append(args[0].abs().max().item())


def test_forward_loop_runs_only_retained_tokens(tiny_vit):
    data = _sparse_data(tiny_vit)
    toolkit = _RecordingToolkit()
    toolkit.quantize(tiny_vit, kept_token_forward_loop(data, batch_size=4))
    expected = sorted((data.patch_mask.flatten(1).sum(1) + 1).tolist())  # + the class token
    assert sorted(toolkit.token_counts) == expected and max(expected) < 65


def test_forward_loop_ignores_stopped_patches(tiny_vit):
    data = _sparse_data(tiny_vit)
    keep = data.patch_mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    huge = SparseInvertedCalibrationDataset.from_tensors(torch.where(keep, data.pixel_values, torch.tensor(1e4)),
                                                         data.patch_mask)
    clean, noisy = _RecordingToolkit(), _RecordingToolkit()
    clean.quantize(tiny_vit, kept_token_forward_loop(data))
    noisy.quantize(tiny_vit, kept_token_forward_loop(huge))
    assert clean.maxima == noisy.maxima


def test_input_iterable_feeds_a_patch_level_model(tiny_vit):
    data = _sparse_data(tiny_vit)
    items = list(kept_token_inputs(data, tiny_vit, batch_size=4))
    seen = []

    def fake_nncf_quantize(model, dataset):  # NNCF style: iterate the inputs, call the model on each
        for patches, positions in dataset:
            seen.append(model(patches, positions).shape)
        return model

    patch_model = PatchLevelViT(tiny_vit)
    fake_nncf_quantize(patch_model, items)
    assert sum(shape[0] for shape in seen) == len(data)
    assert all(p.shape[1] == pos.shape[1] < 64 for p, pos in items)
    # the patch-level model with every patch equals the ViT itself
    full = torch.arange(64).expand(2, -1)
    from smi_plugin.tokens import images_to_patches

    images = data.pixel_values[:2]
    with torch.no_grad():
        assert torch.allclose(patch_model(images_to_patches(images, (4, 4)), full), tiny_vit(images), atol=1e-5)
    assert patch_model.model is tiny_vit  # shares the parameters
