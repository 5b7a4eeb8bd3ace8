"""Inversion from the real Fashion-MNIST teacher (shipped in the zoo)."""

import pytest
import torch

from smi_plugin import InversionConfig, SparseInverter, StoppingSchedule, load_teacher
from smi_plugin.batch import balanced_labels


@pytest.mark.slow(seconds=18)
@pytest.mark.parametrize("schedule", ["dense", "paper-scaled"])
def test_inverted_images_are_classified_as_their_targets(schedule):
    teacher = load_teacher("fashion-mnist-vit")
    iterations = 200
    stopping = StoppingSchedule.paper_scaled(iterations) if schedule == "paper-scaled" else StoppingSchedule.dense()
    config = InversionConfig(iterations=iterations, batch_size=40, schedule=stopping, tie_channels=True, seed=3)
    batch = SparseInverter(teacher, config, progress=False).invert(balanced_labels(40, 10))
    with torch.no_grad():
        dense_prediction = teacher(batch.normalized()).argmax(1)  # full images, every patch
    assert (dense_prediction == batch.labels).float().mean() >= 0.95
    expected_kept = 1.0 if schedule == "dense" else 14 / 64
    assert batch.patch_mask.float().mean().item() == pytest.approx(expected_kept)
