import pytest
import torch
from conftest import make_vit

from smi_plugin import InversionConfig, SparseInverter
from smi_plugin.selection import (
    SELECTION_POLICIES,
    SMISelection,
    Stage,
    register_selection_policy,
)


def _config(**overrides):
    base = dict(iterations=12, batch_size=4, schedule="2:0.3,4:0.3,6:0.5", log_every=1)
    return InversionConfig(**{**base, **overrides})


def _pixels(mask):
    """(B, gh, gw) patch mask -> (B, 3, H, W) pixel mask of the tiny ViT (4x4 patches)."""
    return mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).expand(-1, 3, -1, -1)


def test_registry_holds_the_policies_and_the_config_field_round_trips():
    assert {"smi", "random", "dense", "rebirth"} <= set(SELECTION_POLICIES)
    config = _config(selection="rebirth", rebirth_divisions=3)
    again = InversionConfig.from_json(config.to_json())
    assert again == config and again.selection == "rebirth" and again.rebirth_divisions == 3
    assert InversionConfig().selection == "smi"
    with pytest.raises(ValueError, match="selection"):
        _config(selection="nope")


def test_a_registered_policy_becomes_a_valid_choice(tiny_vit):
    @register_selection_policy("keep-first")
    class KeepFirst(SMISelection):
        needs_scores = False

        def select(self, scores, kept, keep, generator):
            return torch.arange(keep, device=kept.device).expand(kept.shape[0], -1)

    try:
        batch = SparseInverter(tiny_vit, _config(selection="keep-first"), progress=False).invert([0, 1])
        assert batch.kept_indices.tolist() == [list(range(15))] * 2
    finally:
        del SELECTION_POLICIES["keep-first"]


@pytest.mark.parametrize("selection", ["smi", "random", "rebirth"])
def test_stopped_or_detached_pixels_never_change_again(tiny_vit, selection):
    inverter = SparseInverter(tiny_vit, _config(selection=selection, l2_weight=1e-3), progress=False)
    batch = inverter.invert([0, 1, 2], snapshots=True)
    shots = batch.snapshots
    final, final_mask = shots[-1][1], shots[-1][2]
    for (it, images, mask), (_, _, next_mask) in zip(shots, shots[1:]):
        removed = _pixels(mask & ~next_mask)
        assert removed.any()
        assert torch.equal(images[removed], final[removed]), f"{selection}: pixels removed at {it} changed"
    keep = _pixels(final_mask)
    assert not torch.equal(shots[0][1][keep], final[keep])  # the retained ones did move


def test_stages_run_on_the_schedule_for_smi_and_random(tiny_vit):
    for selection in ("smi", "random"):
        inverter = SparseInverter(tiny_vit, _config(selection=selection), progress=False)
        assert inverter.stages == (Stage(2, 44), Stage(4, 30), Stage(6, 15))
        assert inverter.invert([0]).patch_mask.sum().item() == 15


def test_random_selection_is_seeded_reproducible_and_ignores_attention(tiny_vit):
    config = _config(selection="random")
    first = SparseInverter(tiny_vit, config, progress=False).invert([0, 1, 2])
    again = SparseInverter(tiny_vit, config, progress=False).invert([0, 1, 2])
    other = SparseInverter(tiny_vit, config.replace(seed=7), progress=False).invert([0, 1, 2])
    smi = SparseInverter(tiny_vit, _config(), progress=False).invert([0, 1, 2])
    assert torch.equal(first.patch_mask, again.patch_mask) and torch.equal(first.images, again.images)
    assert not torch.equal(first.patch_mask, other.patch_mask)
    assert not torch.equal(first.patch_mask, smi.patch_mask)


def test_dense_selection_keeps_every_patch_whatever_the_schedule(tiny_vit):
    lengths = []
    handle = tiny_vit.blocks[0].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    batch = SparseInverter(tiny_vit, _config(selection="dense"), progress=False).invert([0, 1])
    handle.remove()
    assert batch.patch_mask.all() and set(lengths) == {65}
    assert batch.provenance["kept_counts"] == [64]


def test_rebirth_emits_disjoint_samples_covering_the_grid(tiny_vit):
    inverter = SparseInverter(tiny_vit, _config(selection="rebirth", batch_size=2), progress=False)
    assert [s.iteration for s in inverter.stages] == [3, 6, 9]  # 4 divisions of 12, not the schedule's stages
    assert [s.keep for s in inverter.stages] == [48, 32, 16] and all(s.emit for s in inverter.stages)
    labels = [3, 1, 4]  # two chunks: trajectories 0, 1 and 2
    lengths = []
    handle = tiny_vit.blocks[0].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    batch = inverter.invert(labels)
    handle.remove()
    assert sorted(set(lengths)) == [17, 33, 49, 65]  # detached patches are never forwarded again
    assert len(batch) == 4 * len(labels)
    trajectory, emitted_at = batch.provenance["trajectory"], batch.provenance["emitted_at"]
    assert sorted(set(emitted_at)) == [3, 6, 9, 12]
    for t, label in enumerate(labels):
        rows = [i for i, r in enumerate(trajectory) if r == t]
        assert len(rows) == 4 and all(batch.labels[i].item() == label for i in rows)
        masks = batch.patch_mask[rows]
        assert masks.sum(0).eq(1).all(), "the samples of one trajectory must be disjoint and cover the grid"
        assert masks.flatten(1).sum(1).tolist() == [16, 16, 16, 16]
        # Detached pixels are frozen: each sample's patches equal the final image's.
        last = max(rows, key=lambda i: emitted_at[i])
        for i in rows:
            keep = _pixels(batch.patch_mask[i:i + 1])[0]
            assert torch.equal(batch.images[i][keep], batch.images[last][keep])


def test_rebirth_detaches_the_most_attended_patches():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    policy = SELECTION_POLICIES["rebirth"](_config())
    survivors = policy.select(scores, torch.arange(4).unsqueeze(0), 2, torch.Generator())
    assert survivors.tolist() == [[0, 2]]  # 0.9 and 0.7 leave as a finished sample


@pytest.mark.parametrize("schedule", ["dense", "2:0.3,4:0.3,6:0.5"])
def test_rebirth_uses_evenly_spaced_divisions_whatever_the_schedule(tiny_vit, schedule):
    inverter = SparseInverter(tiny_vit, _config(selection="rebirth", schedule=schedule, rebirth_divisions=3),
                              progress=False)
    assert inverter.stages == (Stage(4, 43, True), Stage(8, 22, True))
    batch = inverter.invert([0])
    assert batch.patch_mask.flatten(1).sum(1).tolist() == [21, 21, 22]
    assert batch.patch_mask.sum(0).eq(1).all()


def test_rebirth_rejects_more_samples_than_patches():
    model = make_vit("vit_tiny_patch16_224", depth=1, img_size=32, embed_dim=24, num_heads=2)  # 2x2 grid
    with pytest.raises(ValueError, match="too many"):
        SparseInverter(model, InversionConfig(iterations=12, schedule="dense", selection="rebirth",
                                              rebirth_divisions=5), progress=False)
