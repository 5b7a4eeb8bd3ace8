import math

import pytest
import torch

from smi_plugin import InversionConfig, SparseInverter, load_teacher
from smi_plugin.batch import balanced_labels
from smi_plugin.data import load_split
from smi_plugin.distill import DistillConfig, KDTrainer, distillation_stream, kd_loss, linear_probe_student
from smi_plugin.images import model_normalization


def test_kd_loss_matches_a_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.2, 3.0, -1.0]])
    temperature = 2.0
    p = [math.exp(v / temperature) for v in t[0].tolist()]
    p = [v / sum(p) for v in p]
    q = [math.exp(v / temperature) for v in s[0].tolist()]
    q = [v / sum(q) for v in q]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) * temperature ** 2
    assert kd_loss(s, t, temperature).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-4)  # float32 rounding times T^2 = 400


def test_stream_gives_distinct_samples_per_shard_and_process(tiny_vit):
    from datasets.distributed import split_dataset_by_node
    from torch.utils.data import DataLoader

    config = InversionConfig(iterations=2, batch_size=2, schedule="1:0.5")
    stream = distillation_stream(tiny_vit, config, labels=list(range(8)), seed=3, num_shards=4, with_logits=True)
    assert stream.num_shards == 4
    ranks = [list(split_dataset_by_node(stream, rank=r, world_size=2)) for r in range(2)]
    keys = [{(row["item"], row["label"]) for row in rows} for rows in ranks]
    assert len(keys[0]) == len(keys[1]) == 4 and not keys[0] & keys[1]
    assert sorted(label for _, label in keys[0] | keys[1]) == list(range(8))
    batch = next(iter(DataLoader(stream.with_format("torch"), batch_size=8)))
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and batch["patch_mask"].shape == (8, 8, 8)
    assert batch["teacher_logits"].shape == (8, 10) and batch["patch_mask"].sum(dim=(1, 2)).tolist() == [32] * 8


@pytest.fixture(scope="module")
def digits():
    teacher = load_teacher("digits-vit")
    mean, std = model_normalization(teacher)
    test = load_split("digits", "test")
    config = InversionConfig(iterations=30, batch_size=40, schedule="10:0.3", tie_channels=True)
    pool = SparseInverter(teacher, config, progress=False).invert(balanced_labels(40, 10))
    return teacher, test, mean, std, pool


@pytest.mark.slow
def test_short_linear_probe_lowers_kd_loss_and_beats_chance(digits, tmp_path):
    teacher, test, mean, std, pool = digits
    student = linear_probe_student(teacher, 10)  # same backbone, fresh head
    config = DistillConfig(mode="linear-probe", steps=60, batch_size=20, eval_every=60, lr=0.1)
    history = KDTrainer(teacher, student, config, test, mean, std, out_dir=tmp_path, progress=False).fit([pool])
    losses = [loss for _, loss in history["kd_loss"]]
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert history["eval"][-1][1] > 0.3  # chance is 0.1
    assert (tmp_path / "learning_curve.png").is_file() and (tmp_path / "history.json").is_file()
    head_only = [n for n, p in student.named_parameters() if p.requires_grad]
    assert head_only and all(n.startswith("head") for n in head_only)


def test_resume_after_interruption_repeats_and_skips_nothing(digits, tmp_path, monkeypatch):
    import timm

    teacher, test, mean, std, pool = digits

    def student():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=1,
                                 num_heads=2, num_classes=10)

    config = DistillConfig(mode="full", optimizer="adamw", lr=1e-3, steps=6, batch_size=8, eval_every=100,
                           checkpoint_every=3)
    reference = student()
    KDTrainer(teacher, reference, config, None, mean, std, progress=False).fit([pool])

    interrupted = student()
    trainer = KDTrainer(teacher, interrupted, config, None, mean, std, out_dir=tmp_path, progress=False)
    original_step = trainer.optimizer.step
    calls = {"n": 0}

    def failing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original_step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit([pool])
    resumed = student()
    history = KDTrainer(teacher, resumed, config, None, mean, std, out_dir=tmp_path, progress=False).fit([pool])
    assert [step for step, _ in history["kd_loss"]] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


def test_competition_term_uses_the_student(tiny_vit):
    from conftest import FAMILIES, make_vit

    name, overrides = FAMILIES["zoo_shape"]
    student = make_vit(name, seed=1, **overrides)
    config = InversionConfig(iterations=3, schedule="dense", competition_weight=1.0, log_every=1)
    batch = SparseInverter(tiny_vit, config, progress=False, competitor=student).invert([0, 1])
    assert all(0 <= r["competition_js"] <= math.log(2) for r in batch.history)
    assert all(p.requires_grad for p in student.parameters())


def test_bad_distill_config_and_setup():
    with pytest.raises(ValueError, match="mode"):
        DistillConfig(mode="half")
    with pytest.raises(ValueError, match="steps"):
        DistillConfig(steps=0)
    with pytest.raises(ValueError, match="epochs must be > 0"):
        DistillConfig(epochs=0)
    with pytest.raises(ValueError, match="set steps instead"):
        DistillConfig(epochs=2, source="alternating")


def test_epochs_scale_the_steps_with_the_pool(digits):
    teacher, _, mean, std, pool = digits  # 40 images
    config = DistillConfig(mode="linear-probe", steps=500, epochs=1.5, batch_size=16, eval_every=100)
    history = KDTrainer(teacher, linear_probe_student(teacher, 10), config, None, mean, std,
                        progress=False).fit([pool])
    assert len(history["kd_loss"]) == 4  # ceil(1.5 * 40 / 16) steps, not 500
    assert DistillConfig(epochs=1.5, batch_size=16).total_steps(20) == 2  # ceil(1.875): half the pool, half the steps
    assert DistillConfig(steps=7).total_steps(20) == 7


def test_mixup_mixes_two_pool_images_and_keeps_both_masks(tiny_vit):
    pixels = torch.stack([torch.full((3, 32, 32), float(v)) for v in range(8)])
    masks = torch.zeros(8, 8, 8, dtype=torch.bool)
    for i in range(8):
        masks[i, i, :] = True  # image i keeps row i only
    config = DistillConfig(mixup=True, flip=False, batch_size=8)
    trainer = KDTrainer(tiny_vit, tiny_vit, config, None, (0.5,) * 3, (0.5,) * 3, progress=False)
    trainer._pool_tensors = (pixels, masks, torch.arange(8))
    x, m = trainer._sample(torch.Generator().manual_seed(0))
    values = x[:, 0, 0, 0]
    assert torch.equal(x, values.view(-1, 1, 1, 1).expand_as(x))  # every pixel mixed with one weight
    assert (values >= 0).all() and (values <= 7).all()
    assert (values != values.round()).sum() >= 4  # most inputs are mixes, not pool images
    kept_rows = m.any(dim=2).sum(dim=1)
    assert set(kept_rows.tolist()) <= {1, 2} and (kept_rows == 2).sum() >= 4  # union of the two masks
