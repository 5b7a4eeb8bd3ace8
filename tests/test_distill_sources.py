"""Each data source on its own: what a step gets, what it finishes, and a state that survives the safe loader."""

import io

import pytest
import torch

from smi_plugin import InversionConfig, SparseInverter
from smi_plugin.batch import balanced_labels
from smi_plugin.distill import AlternatingSource, DistillConfig, OnlineSource, PoolSource, build_source


def _inverter(model, **changes):
    config = InversionConfig(iterations=4, batch_size=4, schedule="2:0.5", log_every=100).replace(**changes)
    return SparseInverter(model, config, progress=False)


def _generator(step):
    return torch.Generator().manual_seed(100 + step)


def _through_safe_loader(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # plain tensors, numbers and dicts only


def test_pool_source_samples_the_pool_and_finishes_it_once(tiny_vit):
    pool = _inverter(tiny_vit).invert(balanced_labels(6, 10))
    source = PoolSource(pool, DistillConfig(batch_size=4, flip=False))
    first = source.next_batch(0, _generator(0))
    assert first.finished is pool and source.next_batch(1, _generator(1)).finished is None
    assert first.pixel_values.shape == (4, 3, 32, 32) and first.patch_mask.shape == (4, 8, 8)
    rows = [(pool.normalized() - x).flatten(1).abs().sum(1).argmin() for x in first.pixel_values]
    assert all(torch.equal(pool.normalized()[r], x) for r, x in zip(rows, first.pixel_values))  # pool rows
    again = PoolSource(pool, DistillConfig(batch_size=4, flip=False)).next_batch(0, _generator(0))
    assert torch.equal(again.pixel_values, first.pixel_values)  # every draw from the generator
    assert PoolSource(pool, DistillConfig(batch_size=64)).next_batch(0, _generator(0)).pixel_values.shape[0] == 6


def test_alternating_source_inverts_a_round_every_kd_steps_per_round(tiny_vit):
    config = DistillConfig(images_per_round=4, kd_steps_per_round=2, batch_size=3, source="alternating")
    source = AlternatingSource(_inverter(tiny_vit), config, seed=5)
    finished = [source.next_batch(step, _generator(step)).finished for step in range(4)]
    assert [f is not None for f in finished] == [True, False, True, False] and source.images_seen == 8
    assert finished[0].labels.tolist() == [0, 1, 2, 3] and finished[2].labels.tolist() == [1, 2, 3, 0]  # rotated
    resumed = AlternatingSource(_inverter(tiny_vit), config, seed=5)
    resumed.load_state_dict(_through_safe_loader(source.state_dict()))
    assert resumed.next_batch(3, _generator(3)).finished is None  # the round is there: nothing inverted again
    assert torch.equal(resumed.pool.pool.images, source.pool.pool.images)
    assert torch.equal(resumed.next_batch(4, _generator(4)).finished.images,
                       source.next_batch(4, _generator(4)).finished.images)  # the next round alike


def test_online_source_resumes_from_a_safe_state_to_the_same_batches(tiny_vit):
    config = DistillConfig(source="online", pool_size=8, batch_size=2, inversion_steps=2, mixup=0.5)
    source = OnlineSource(_inverter(tiny_vit), config, seed=1)
    batches = [source.next_batch(step, _generator(step)) for step in range(4)]  # two slots, each finished once
    assert [b.finished is None for b in batches] == [True, True, True, True] and source.images_seen == 8
    assert batches[0].pixel_values.shape[0] == 4 + 2  # the fresh slot and the replayed rows
    state = _through_safe_loader(source.state_dict())
    resumed = OnlineSource(_inverter(tiny_vit), config, seed=1)
    resumed.load_state_dict(state)
    finished = []
    for step in (4, 5, 6):
        expected, got = source.next_batch(step, _generator(step)), resumed.next_batch(step, _generator(step))
        assert torch.equal(got.pixel_values, expected.pixel_values) and torch.equal(got.patch_mask, expected.patch_mask)
        finished.append(None if got.finished is None else len(got.finished))
    assert finished == [4, 4, None]  # each slot ran its 4 iterations: its samples finished, the slot starts again
    other = OnlineSource(_inverter(tiny_vit), config.replace(pool_size=12), seed=1)
    with pytest.raises(ValueError, match="another size"):
        other.load_state_dict(state)


def test_build_source_names_the_source_and_what_it_needs(tiny_vit):
    pool = _inverter(tiny_vit).invert([0, 1])
    assert isinstance(build_source(DistillConfig(), None, [pool], seed=0), PoolSource)
    with pytest.raises(ValueError, match="inverter=SparseInverter"):
        build_source(DistillConfig(source="online"), None, None, seed=0)
    with pytest.raises(ValueError, match="empty"):
        build_source(DistillConfig(), None, [], seed=0)
