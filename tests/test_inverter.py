import sys

import pytest
import torch
from conftest import make_vit

from smi_plugin import InversionConfig, SparseInverter, UnsupportedModelError
from smi_plugin.augment import roll_flip_patches
from smi_plugin.batch import InvertedBatch
from smi_plugin.inverter import check_labels
from smi_plugin.pixels import initial_noise
from smi_plugin.tokens import images_to_patches, patch_grid


def _config(**overrides):
    base = dict(iterations=12, batch_size=4, schedule="2:0.3,4:0.3,6:0.5", log_every=1)
    return InversionConfig(**{**base, **overrides})


def _count_block_inputs(model):
    lengths = []
    handle = model.blocks[0].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    return lengths, handle


def test_paper_schedule_token_counts_at_224():
    """DeiT at 224 with the paper's schedule: 196 -> 137 -> 95 -> 66 -> 46 tokens reach the blocks."""
    model = make_vit("deit_tiny_patch16_224", depth=1, embed_dim=24, num_heads=2)
    config = InversionConfig(iterations=8, batch_size=2, schedule="1:0.3,2:0.3,4:0.3,6:0.3")
    lengths, handle = _count_block_inputs(model)
    batch = SparseInverter(model, config, progress=False).invert([0, 1])
    handle.remove()
    assert lengths == [1 + n for n in [196, 137, 95, 95, 66, 66, 46, 46]]
    assert batch.patch_mask.sum(dim=(1, 2)).tolist() == [46, 46]
    assert batch.kept_indices.shape == (2, 46)


def test_stopped_pixels_are_bit_identical_to_the_end(tiny_vit):
    config = _config(l2_weight=1e-3, tv_l1_weight=0.1)
    batch = SparseInverter(tiny_vit, config, progress=False).invert([0, 1, 2, 3], snapshots=True)
    snaps = batch.snapshots
    assert [it for it, _, _ in snaps] == [2, 4, 6, 12]
    final = batch.images
    for (it, images, mask), (_, _, next_mask) in zip(snaps, snaps[1:]):
        stopped = mask & ~next_mask
        assert stopped.any()
        pixel_mask = stopped.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).expand_as(final)
        assert torch.equal(images[pixel_mask], final[pixel_mask]), f"pixels stopped at {it} changed"
    # Retained pixels did move, so the check above is not vacuous.
    first_images, last_mask = snaps[0][1], snaps[-1][2]
    keep = last_mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).expand_as(final)
    assert not torch.equal(first_images[keep], final[keep])


def test_same_seed_same_bits_other_seed_other_images(tiny_vit):
    config = _config()
    first = SparseInverter(tiny_vit, config, progress=False).invert([1, 2, 3])
    second = SparseInverter(tiny_vit, config, progress=False).invert([1, 2, 3])
    other = SparseInverter(tiny_vit, config.replace(seed=1), progress=False).invert([1, 2, 3])
    assert torch.equal(first.images, second.images) and torch.equal(first.patch_mask, second.patch_mask)
    assert not torch.equal(first.images, other.images)


def test_dense_is_the_same_path_with_every_patch(tiny_vit):
    lengths, handle = _count_block_inputs(tiny_vit)
    batch = SparseInverter(tiny_vit, _config(schedule="dense"), progress=False).invert([0, 1])
    handle.remove()
    assert set(lengths) == {65} and batch.patch_mask.all()


def test_whole_patch_augmentation_equals_rolling_and_flipping_the_image(tiny_vit):
    grid = patch_grid(tiny_vit)
    images = torch.randn(6, 3, 32, 32)
    patches = images_to_patches(images, grid.patch_size)
    kept = torch.arange(grid.num_patches).expand(6, -1)
    positions, moved = roll_flip_patches(kept, patches, grid, 0.25, True, torch.Generator().manual_seed(3))
    placed = torch.empty_like(patches).scatter_(1, positions.unsqueeze(-1).expand_as(moved), moved)
    from smi_plugin.tokens import patches_to_images
    placed = patches_to_images(placed, grid)
    for i in range(6):
        candidates = [torch.roll(images[i], (dy * 4, dx * 4), (1, 2)) for dy in range(-2, 3) for dx in range(-2, 3)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(placed[i], c) for c in candidates)


def test_inverted_images_reach_their_targets(tiny_vit):
    config = _config(iterations=60, schedule="10:0.3,20:0.3", lr=0.1)
    batch = SparseInverter(tiny_vit, config, progress=False).invert(torch.arange(8) % 10)
    assert batch.history[-1]["ce"] < batch.history[0]["ce"]
    assert batch.images.min() >= 0 and batch.images.max() <= 1
    assert batch.provenance["config"]["schedule"] == "10:0.3,20:0.3"
    assert batch.provenance["kept_counts"] == [64, 44, 30]


def test_tied_channels_give_gray_images(tiny_vit):
    batch = SparseInverter(tiny_vit, _config(tie_channels=True), progress=False).invert([0, 1])
    assert torch.allclose(batch.images[:, 0], batch.images[:, 1]) and torch.allclose(batch.images[:, 0], batch.images[:, 2])


def test_psaq_base_method_runs_sparse(tiny_vit):
    batch = SparseInverter(tiny_vit, _config(base_method="psaq"), progress=False).invert([0, 1])
    assert "patch_entropy" in batch.history[-1] and batch.num_kept == 15


def test_long_label_lists_are_chunked(tiny_vit):
    batch = SparseInverter(tiny_vit, _config(batch_size=3, iterations=3, schedule="1:0.5"), progress=False).invert(list(range(7)))
    assert batch.images.shape == (7, 3, 32, 32) and batch.labels.tolist() == list(range(7))


def test_callback_sees_losses_and_kept_counts(tiny_vit):
    seen = []
    SparseInverter(tiny_vit, _config(), callback=seen.append, progress=False).invert([0])
    assert [r["kept"] for r in seen][:8] == [64, 64, 44, 44, 30, 30, 15, 15]


def test_teacher_weights_are_restored(tiny_vit):
    tiny_vit.train()
    SparseInverter(tiny_vit, _config(iterations=2, schedule="1:0.5"), progress=False).invert([0])
    assert tiny_vit.training and all(p.requires_grad for p in tiny_vit.parameters())


@pytest.mark.parametrize("labels, error, match", [
    ([10], ValueError, "outside"), ([-1], ValueError, "outside"), ([], ValueError, "no labels"),
    (torch.tensor([0.5]), TypeError, "integer"),
])
def test_bad_labels_fail_before_work(tiny_vit, labels, error, match):
    with pytest.raises(error, match=match):
        SparseInverter(tiny_vit, _config(), progress=False).invert(labels)


def test_labels_on_another_device_fail(tiny_vit):
    with pytest.raises(ValueError, match="move them"):
        SparseInverter(tiny_vit, _config(), progress=False).invert(torch.zeros(2, dtype=torch.long, device="meta"))


def test_bad_models_and_sizes_fail_early(tiny_vit):
    with pytest.raises(UnsupportedModelError):
        SparseInverter(torch.nn.Linear(3, 3), _config())
    with pytest.raises(ValueError, match="accepts"):
        SparseInverter(tiny_vit, _config(image_size=(48, 48)))
    with pytest.raises(ValueError, match="keep 0"):
        SparseInverter(tiny_vit, _config(schedule="1:0.9,2:0.9,3:0.9"))


def test_masked_images_fill_exactly_the_stopped_patches():
    mask = torch.zeros(1, 2, 2, dtype=torch.bool)
    mask[0, 0, 1] = mask[0, 1, 0] = True
    images = torch.rand(1, 3, 8, 8)
    batch = InvertedBatch(images=images, patch_mask=mask, labels=torch.tensor([0]),
                          kept_indices=torch.tensor([[1, 2]]), mean=(0.5,) * 3, std=(0.25,) * 3)
    for fill in (0.0, 0.3):
        expected = torch.full_like(images, fill)
        expected[..., :4, 4:] = images[..., :4, 4:]  # kept patch (0, 1)
        expected[..., 4:, :4] = images[..., 4:, :4]  # kept patch (1, 0)
        assert torch.equal(batch.masked_images(fill=fill), expected)


def _count_host_reads(monkeypatch):
    """Count reads of tensor values on the host made by smi_plugin's code (on a GPU each one waits
    for the device). torch's own Adam reads its step counter, a CPU tensor: no device sync."""
    counts = {"n": 0}
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("smi_plugin"):
                counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


@pytest.mark.parametrize("overrides", [
    {}, {"base_method": "psaq"}, {"augment": "pixel", "tie_channels": True, "input_stats_weight": 1.0},
    {"selection": "random", "l2_weight": 1e-3}, {"selection": "rebirth"},
], ids=["default", "psaq", "pixel", "random", "rebirth"])
def test_no_host_sync_between_log_points(tiny_vit, monkeypatch, overrides):
    """Iterations that do not log read nothing on the host: more iterations, same number of reads."""
    def reads(iterations):
        config = _config(iterations=iterations, log_every=1000, **overrides)
        inverter = SparseInverter(tiny_vit, config, progress=False)
        labels = torch.tensor([0, 1])
        with monkeypatch.context() as patch:
            counts = _count_host_reads(patch)
            inverter.invert(labels)
        return counts["n"]

    assert reads(10) == reads(30)


def test_loss_parts_are_floats_only_in_the_history(tiny_vit):
    inverter = SparseInverter(tiny_vit, _config(base_method="psaq", competition_weight=0.5),
                              competitor=make_vit("vit_tiny_patch16_224", seed=1, depth=1, img_size=32,
                                                  patch_size=4, embed_dim=48, num_heads=3), progress=False)
    state = inverter.state_at_stage([0, 1], seed=0, stage=0)
    with inverter.session():
        _, _, parts = inverter.step(state, 0)
    assert set(parts) == {"ce", "tv_l2", "patch_entropy", "competition_js"}
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in parts.values())
    record = inverter.invert([0]).history[-1]
    assert all(isinstance(record[k], float) for k in parts) and isinstance(record["kept"], int)


# The CUDA variants run where a GPU is present (benchmarks/gpu_run.sh runs them on a lent one).
CPU_AND_GPU = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.fixture
def deterministic_algorithms(monkeypatch):
    """torch's deterministic algorithms for one test: without them a GPU's backward sums its scatter-adds
    (the gradient of gathering the kept patches) in any order, so runs differ in the last bits."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic workspace
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.slow(seconds=90)
@pytest.mark.parametrize("device", CPU_AND_GPU)
def test_compiled_step_gives_the_eager_images_and_is_reproducible(device, request):
    """compile_step: same stopping decisions and images as eager within float tolerance (compiled
    kernels round differently), and bit-identical images run to run; on a GPU, with CUDA graphs and
    torch's deterministic algorithms, the documented way to bit-identical runs there."""
    if device == "cuda":
        request.getfixturevalue("deterministic_algorithms")
    model = make_vit("vit_tiny_patch16_224", depth=1, img_size=32, patch_size=4, embed_dim=24, num_heads=2).to(device)
    # One stage: a dense graph, then a sparse one with the priors on the retained pixels.
    config = _config(iterations=6, schedule="2:0.5", tv_l1_weight=0.1, l2_weight=1e-3)
    eager = SparseInverter(model, config, progress=False).invert([0, 1, 2, 3])
    compiled_inverter = SparseInverter(model, config.replace(compile_step=True), progress=False)
    compiled = compiled_inverter.invert([0, 1, 2, 3])
    again = compiled_inverter.invert([0, 1, 2, 3])
    assert torch.equal(compiled.patch_mask, eager.patch_mask)
    assert torch.allclose(compiled.images, eager.images, atol=1e-3)
    assert torch.equal(compiled.images, again.images)
    assert compiled.provenance["config"]["compile_step"] is True


def test_compiled_step_refuses_a_base_method_with_side_hooks(tiny_vit):
    with pytest.raises(ValueError, match="compile_step"):
        SparseInverter(tiny_vit, _config(base_method="psaq", compile_step=True), progress=False)


@pytest.mark.parametrize("device", CPU_AND_GPU)
def test_bfloat16_precision_runs_the_teacher_in_bfloat16_and_keeps_the_pixels_float32(tiny_vit, device, request):
    """precision="bfloat16": the teacher's matmuls run in bfloat16 (a hook sees the qkv output's dtype), the
    pixels, Adam state, logits and images stay float32, the logits are float32's within bfloat16 rounding,
    and one seed gives the same bits twice (on a GPU under torch's deterministic algorithms)."""
    if device == "cuda":
        request.getfixturevalue("deterministic_algorithms")
    tiny_vit = tiny_vit.to(device)
    seen = []
    handle = tiny_vit.blocks[0].attn.qkv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    try:
        steps = {}
        for precision in ("float32", "bfloat16"):
            inverter = SparseInverter(tiny_vit, _config(precision=precision), progress=False)
            state = inverter.state_at_stage([0, 1, 2], seed=0, stage=0)
            with inverter.session():
                _, logits, _ = inverter.step(state, 0)
            steps[precision] = (logits, state)
    finally:
        handle.remove()
    assert seen == [torch.float32, torch.bfloat16]
    (full, _), (half, state) = steps["float32"], steps["bfloat16"]
    assert half.dtype == state.param.dtype == state.optimizer.state[state.param]["exp_avg"].dtype == torch.float32
    error = (half - full).abs().max() / full.abs().max()
    assert 0 < error < 0.05  # rounded (not float32), but only at bfloat16's 8-bit mantissa
    inverter = SparseInverter(tiny_vit, _config(precision="bfloat16"), progress=False)
    first, second = inverter.invert([0, 1, 2]), inverter.invert([0, 1, 2])
    assert first.images.dtype == torch.float32 and torch.equal(first.images, second.images)
    assert torch.equal(first.patch_mask, second.patch_mask)


def test_bfloat16_precision_refuses_a_teacher_that_is_not_float32(tiny_vit):
    model = make_vit("vit_tiny_patch16_224", depth=1, img_size=32, patch_size=4, embed_dim=24, num_heads=2).double()
    with pytest.raises(ValueError, match="precision='bfloat16'.*float64"):
        SparseInverter(model, _config(precision="bfloat16"), progress=False)


def test_state_at_stage_has_the_stage_kept_count_and_steps(tiny_vit):
    inverter = SparseInverter(tiny_vit, _config(), progress=False)
    counts = [inverter.state_at_stage([0, 1, 2], seed=stage, stage=stage).kept.shape[1]
              for stage in range(len(inverter.stages) + 1)]
    assert counts == inverter.kept_counts == [64, 44, 30, 15]
    state = inverter.state_at_stage(torch.tensor([0, 1]), seed=0, stage=3)
    before = state.canvas.clone()
    with inverter.session():
        inverter.step(state, 7)
    state.commit()
    moved = (state.canvas != before).any(-1)
    assert moved.sum(1).tolist() == [15, 15] and torch.equal(moved.nonzero()[:, 1].view(2, -1), state.kept)
    with pytest.raises(ValueError, match="stage 4"):
        inverter.state_at_stage([0], seed=0, stage=4)


def test_check_labels_is_public():
    assert check_labels([1, 2], 3, "cpu").tolist() == [1, 2]
    with pytest.raises(ValueError, match="outside"):
        check_labels([3], 3, "cpu")


def test_soft_targets_follow_the_head_similarity_and_keep_the_label_on_top(tiny_vit):
    from smi_plugin.losses import class_similarity, dirichlet_targets

    weight = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0]])
    similarity = class_similarity(weight)
    # Class 0 is closest to class 1 (cosine 0.99) and furthest from class 2 (cosine -1): scaled to [0, 1].
    assert similarity[0, 0] == 1 and similarity[0, 2] == 0 and 0.99 < similarity[0, 1] < 1
    labels = torch.tensor([0, 1, 2] * 50)
    targets = dirichlet_targets(labels, similarity, 1.0, torch.Generator().manual_seed(0))
    assert torch.allclose(targets.sum(1), torch.ones(150)) and bool((targets.argmax(1) == labels).all())
    # Class 2 resembles no other class: its draws put almost nothing on the others on average.
    assert targets[labels == 0][:, 1].mean() > targets[labels == 0][:, 2].mean()
    again = dirichlet_targets(labels, similarity, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(targets, again)

    config = InversionConfig(iterations=30, batch_size=4, schedule="10:0.5", soft_targets=1.0, seed=1)
    inverter = SparseInverter(tiny_vit, config, progress=False)
    state = inverter.start(torch.tensor([0, 1, 2, 3]), seed=5)
    assert state.targets.shape == (4, tiny_vit.num_classes)
    batch = inverter.invert([0, 1, 2, 3])
    assert batch.labels.tolist() == [0, 1, 2, 3] and torch.isfinite(batch.images).all()


def test_patch_noise_starts_every_image_from_its_seeded_smooth_draw(tiny_vit):
    """initial_noise="patch": the canvas is initial_noise's draw for the batch's seed, in patches, and a
    whole inversion runs from it and records the choice in its provenance."""
    inverter = SparseInverter(tiny_vit, _config(initial_noise="patch", tie_channels=True), progress=False)
    state = inverter.start(torch.tensor([0, 1, 2]), seed=5)
    expected = initial_noise("patch", 3, 1, inverter.grid, torch.Generator().manual_seed(5))
    assert torch.equal(state.canvas, images_to_patches(expected, inverter.grid.patch_size))
    batch = inverter.invert([0, 1, 2])
    assert torch.isfinite(batch.images).all() and batch.provenance["config"]["initial_noise"] == "patch"


def test_frequency_decay_steps_in_smooth_cosines_and_still_freezes_stopped_pixels(tiny_vit):
    """frequency_decay > 0: Adam runs in each patch's scaled cosine basis, so the pixels' change over a
    few steps is smoother inside the patches than plain Adam's from the same start; stopped patches
    stay bit-identical as ever."""
    def change_roughness(decay):
        inverter = SparseInverter(tiny_vit, _config(frequency_decay=decay, schedule="dense"), progress=False)
        state = inverter.start(torch.tensor([0, 1, 2, 3]), seed=0)
        start = state.param.detach().clone()
        for iteration in range(3):
            inverter.step(state, iteration)
        change = (state.param.detach() - start).view(4, -1, 3, 4, 4)
        horizontal = (change[..., 1:] - change[..., :-1]).pow(2).mean()
        return (horizontal / change.pow(2).mean()).item()

    assert change_roughness(2.0) < 0.5 * change_roughness(0.0)
    batch = SparseInverter(tiny_vit, _config(frequency_decay=2.0), progress=False).invert([0, 1, 2, 3],
                                                                                          snapshots=True)
    (_, stopped_at_2, mask_2), (_, _, mask_4) = batch.snapshots[:2]
    stopped = (mask_2 & ~mask_4).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).expand_as(batch.images)
    assert stopped.any() and torch.equal(stopped_at_2[stopped], batch.images[stopped])
