import pytest
import torch

from smi_plugin import InversionConfig, SparseInverter
from smi_plugin.calibration import KeptCountBatchSampler, SparseInvertedCalibrationDataset
from smi_plugin.batch import balanced_labels
from smi_plugin.images import normalize


def _batch(tiny_vit, labels=(0, 1, 2, 3), schedule="2:0.5"):
    return SparseInverter(tiny_vit, InversionConfig(iterations=4, schedule=schedule), progress=False).invert(list(labels))


def test_from_batches_normalizes_with_recorded_stats(tiny_vit):
    batch = _batch(tiny_vit)
    data = SparseInvertedCalibrationDataset.from_batches([batch])
    assert len(data) == 4 and data.source == "sparse-inverted"
    assert torch.allclose(data[1]["pixel_values"], normalize(batch.images, batch.mean, batch.std)[1])
    assert torch.equal(data[1]["patch_mask"], batch.patch_mask[1]) and data[1]["label"] == 1
    assert data.dense().patch_mask.all() and torch.equal(data.dense().pixel_values, data.pixel_values)


def test_batches_group_equal_kept_counts_and_shard(tiny_vit):
    sparse = SparseInvertedCalibrationDataset.from_batches([_batch(tiny_vit)])
    mixed = SparseInvertedCalibrationDataset.from_tensors(
        torch.cat([sparse.pixel_values, sparse.pixel_values]), torch.cat([sparse.patch_mask, sparse.dense().patch_mask]),
        torch.arange(8))
    batches = list(mixed.batches(batch_size=3))
    assert sorted(len(b["label"]) for b in batches) == [1, 1, 3, 3]
    for b in batches:
        counts = b["patch_mask"].flatten(1).sum(1)
        assert bool((counts == counts[0]).all())
    shards = [sum(KeptCountBatchSampler(mixed, 3, num_replicas=2, rank=r), []) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(8)) and not set(shards[0]) & set(shards[1])


def test_baselines_share_the_interface(tiny_vit):
    noise = SparseInvertedCalibrationDataset.gaussian(tiny_vit, 5, seed=1)
    assert noise.pixel_values.shape == (5, 3, 32, 32) and noise.patch_mask.all()
    real = SparseInvertedCalibrationDataset.from_images(tiny_vit, torch.rand(2, 3, 32, 32), (0.5,) * 3, (0.25,) * 3)
    assert real.kept_fraction == 1.0
    assert balanced_labels(5, 3) == [0, 1, 2, 0, 1]


def test_bad_input_is_refused(tiny_vit):
    with pytest.raises(ValueError, match="empty"):
        SparseInvertedCalibrationDataset.from_tensors(torch.zeros(0, 3, 32, 32), torch.zeros(0, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="no patch"):
        SparseInvertedCalibrationDataset.from_tensors(torch.zeros(1, 3, 32, 32), torch.zeros(1, 8, 8, dtype=torch.bool))
    wrong_grid = SparseInvertedCalibrationDataset.from_tensors(torch.zeros(2, 3, 32, 32), torch.ones(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="patch grid"):
        wrong_grid.check_model(tiny_vit)
    with pytest.raises(ValueError, match="no inverted batches"):
        SparseInvertedCalibrationDataset.from_batches([])
