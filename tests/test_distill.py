import argparse
import json
import math

import pytest
import torch

from smi_plugin import InversionConfig, SparseInverter, load_teacher
from smi_plugin.batch import InvertedBatch, balanced_labels
from smi_plugin.data import load_split
from smi_plugin.distill import (
    CheckpointMismatchError,
    DistillConfig,
    KDTrainer,
    augment_batch,
    build_optimizer,
    failed,
    kd_loss,
    learning_rate,
    linear_probe_student,
    sample_batch,
)
from smi_plugin.evaluation import evaluate_accuracy
from smi_plugin.images import model_normalization
from smi_plugin.zoo.saved import read_card


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


@pytest.fixture(scope="module")
def digits():
    teacher = load_teacher("digits-vit")
    mean, std = model_normalization(teacher)
    test = load_split("digits", "test")
    config = InversionConfig(iterations=30, batch_size=40, schedule="10:0.3", tie_channels=True)
    pool = SparseInverter(teacher, config, progress=False).invert(balanced_labels(40, 10))
    return teacher, test, mean, std, pool


def tiny_student(seed: int = 0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                             num_classes=10)


@pytest.mark.slow
def test_short_gradient_linear_probe_lowers_kd_loss_and_beats_chance(digits, tmp_path):
    teacher, test, mean, std, pool = digits
    student = linear_probe_student(teacher, 10)  # same backbone, fresh head
    config = DistillConfig(mode="linear-probe", probe_head="gradient", steps=60, batch_size=20, eval_every=60, lr=0.1)
    history = KDTrainer(teacher, student, config, test, mean, std, out_dir=tmp_path, progress=False).fit([pool])
    losses = [loss for _, loss in history["kd_loss"]]
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert history["eval"][-1][1] > 0.3  # chance is 0.1
    assert (tmp_path / "learning_curve.png").is_file() and (tmp_path / "history.json").is_file()
    head_only = [n for n, p in student.named_parameters() if p.requires_grad]
    assert head_only and all(n.startswith("head") for n in head_only)


@pytest.mark.slow
def test_least_squares_linear_probe_solves_only_the_head_once_per_sample_and_beats_chance(digits):
    teacher, test, mean, std, pool = digits
    config = DistillConfig(mode="linear-probe", steps=2, batch_size=20, eval_every=2)
    student = linear_probe_student(teacher, 10)  # same backbone, fresh head
    trainer = KDTrainer(teacher, student, config, test, mean, std, progress=False)
    history = trainer.fit([pool])
    assert history["eval"][-1][1] > 0.5  # chance is 0.1; the teacher's own body, so a solved head is good at once
    changed = {name for name, value in student.state_dict().items() if not torch.equal(value, teacher.state_dict()[name])}
    assert changed == {"head.weight", "head.bias"} and not any(p.requires_grad for p in student.parameters())
    assert trainer.head_solver.gram[-1, -1] == 2 * len(pool)  # each sample and its mirror, once


@pytest.mark.slow
def test_least_squares_head_absorbs_each_finished_online_sample_once(digits):
    teacher, _, mean, std, _ = digits
    config = DistillConfig(source="online", steps=10, pool_size=16, batch_size=4, inversion_steps=2, eval_every=100)
    trainer = KDTrainer(teacher, linear_probe_student(teacher, 10), config, None, mean, std,
                        inverter=_online(teacher), progress=False)
    trainer.fit()
    assert trainer.source.pool.finished == 16 and trainer.head_solver.gram[-1, -1] == 2 * 16  # unfinished ones: not yet


@pytest.mark.slow
def test_least_squares_probe_resumes_to_the_uninterrupted_head(digits, tmp_path, monkeypatch):
    teacher, _, mean, std, _ = digits
    config = DistillConfig(source="alternating", steps=6, images_per_round=8, kd_steps_per_round=2, batch_size=4,
                           eval_every=100, checkpoint_every=2)
    reference = linear_probe_student(teacher, 10)
    KDTrainer(teacher, reference, config, None, mean, std, inverter=_online(teacher), progress=False).fit()
    trainer = KDTrainer(teacher, linear_probe_student(teacher, 10), config, None, mean, std, out_dir=tmp_path,
                        inverter=_online(teacher), progress=False)
    _interrupt_at(trainer, monkeypatch, 3)  # in the third round's solve, after the checkpoint of step 4
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    resumed = linear_probe_student(teacher, 10)
    history = KDTrainer(teacher, resumed, config, None, mean, std, out_dir=tmp_path, inverter=_online(teacher),
                        progress=False).fit()
    assert [step for step, _ in history["kd_loss"]] == [1, 2, 3, 4, 5, 6]
    assert torch.allclose(resumed.head.weight, reference.head.weight, atol=1e-6)  # the sums were checkpointed
    assert torch.allclose(resumed.head.bias, reference.head.bias, atol=1e-6)


def _interrupt_at(trainer, monkeypatch, call: int) -> None:
    """Interrupt ``trainer`` in its ``call``-th student update (an optimizer step, or a head solve)."""
    owner = trainer.optimizer if trainer.optimizer is not None else trainer.head_solver
    name = "step" if trainer.optimizer is not None else "solve"
    original, calls = getattr(owner, name), {"n": 0}

    def failing_update(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing_update)


def test_resume_after_interruption_repeats_and_skips_nothing(digits, tmp_path, monkeypatch):
    teacher, _, mean, std, pool = digits
    config = DistillConfig(mode="full", optimizer="adamw", lr=1e-3, steps=6, batch_size=8, eval_every=100,
                           checkpoint_every=3)
    reference = tiny_student()
    KDTrainer(teacher, reference, config, None, mean, std, progress=False).fit([pool])

    trainer = KDTrainer(teacher, tiny_student(), config, None, mean, std, out_dir=tmp_path, progress=False)
    _interrupt_at(trainer, monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit([pool])
    resumed = tiny_student()
    history = KDTrainer(teacher, resumed, config, None, mean, std, out_dir=tmp_path, progress=False).fit([pool])
    assert [step for step, _ in history["kd_loss"]] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


def _online(teacher, pool_size=16):
    config = InversionConfig(iterations=6, batch_size=8, lr=0.1, schedule="2:0.5", tie_channels=True)
    return SparseInverter(teacher, config, progress=False)


@pytest.mark.parametrize("warm_start", [False, True], ids=["from-noise", "warm-start"])
def test_online_pool_is_checkpointed_and_a_resumed_run_equals_an_uninterrupted_one(digits, tmp_path, monkeypatch,
                                                                                   warm_start):
    teacher, _, mean, std, _ = digits
    config = DistillConfig.from_recipe("full", steps=10, pool_size=16, batch_size=4, inversion_steps=2,
                                      mixup=0.5, checkpoint_every=3, eval_every=100, warm_start=warm_start)
    reference = tiny_student()
    uninterrupted = KDTrainer(teacher, reference, config, None, mean, std, inverter=_online(teacher), progress=False)
    uninterrupted.fit()
    # Two slots of 8, 2 iterations per visit, 5 visits each: a stop at age 2 (64 -> 32 patches); at the
    # 4th visit each slot has run its 6 iterations, so its images go to the memory and it restarts (from
    # noise, or warm from mixes of remembered samples).
    online = uninterrupted.source.pool
    assert [slot.age for slot in online.slots.values()] == [4, 4] and online.finished == 16
    assert uninterrupted.images_seen == 32 and len(online.batch()) == 32
    assert online.batch().patch_mask.flatten(1).sum(1).unique().tolist() == [32]
    assert not torch.equal(online.memory.images[:8], online.slots[0].images)  # a new sample, not the old one

    trainer = KDTrainer(teacher, tiny_student(), config, None, mean, std, out_dir=tmp_path,
                        inverter=_online(teacher), progress=False)
    _interrupt_at(trainer, monkeypatch, 10)  # the last checkpoint (step 9) comes after both renewals
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    meta = json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())
    source = torch.load(tmp_path / "checkpoint" / f"source-rank0-step{meta['step']}.pt", weights_only=True)
    assert source["memory"] is not None and not (tmp_path / "checkpoint.pt").exists()  # the pool is plain state
    resumed_student = tiny_student()
    resumed = KDTrainer(teacher, resumed_student, config, None, mean, std, out_dir=tmp_path,
                        inverter=_online(teacher), progress=False)
    history = resumed.fit()
    assert [step for step, _ in history["kd_loss"]] == list(range(1, 11))
    assert torch.equal(resumed.source.pool.batch().images, uninterrupted.source.pool.batch().images)
    for a, b in zip(reference.state_dict().values(), resumed_student.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    other = SparseInverter(teacher, _online(teacher).config.replace(lr=0.2), progress=False)
    refused = KDTrainer(teacher, tiny_student(), config, None, mean, std, out_dir=tmp_path, inverter=other,
                        progress=False)
    # The pool would be inverted otherwise; the error names the one setting that changed, before any work.
    with pytest.raises(CheckpointMismatchError, match=r"\(InversionConfig\.lr 0\.1 -> 0\.2\)"):
        refused.check_resumable()
    with pytest.raises(CheckpointMismatchError, match="InversionConfig.lr"):
        refused.fit()


def test_a_fixed_online_pool_keeps_inverting_the_same_samples(digits):
    teacher, _, mean, std, _ = digits
    config = DistillConfig.from_recipe("full", steps=10, pool_size=16, batch_size=4, renew=False)
    trainer = KDTrainer(teacher, tiny_student(), config, None, mean, std, inverter=_online(teacher), progress=False)
    trainer.fit()
    assert [slot.age for slot in trainer.source.pool.slots.values()] == [10, 10] and trainer.images_seen == 16


def test_without_replay_each_kd_batch_is_the_freshly_inverted_slot(digits, monkeypatch):
    teacher, _, mean, std, _ = digits
    config = DistillConfig.from_recipe("full", steps=3, pool_size=16, batch_size=0, mixup=0.0, flip=False)
    trainer = KDTrainer(teacher, tiny_student(), config, None, mean, std, inverter=_online(teacher), progress=False)
    seen = []
    original = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda x, m: seen.append((x, m)) or original(x, m))
    trainer.fit()
    for step, (x, m) in enumerate(seen):
        slot = trainer.source.pool.slots[step % 2]  # slots 0, 1, 0: slot 0's images changed after step 0
        if step > 0:
            assert torch.equal(x, trainer.source.pool._batch([slot]).normalized()) and torch.equal(m, slot.mask)
    assert [len(x) for x, _ in seen] == [8, 8, 8]
    with pytest.raises(ValueError, match="batch_size"):
        DistillConfig(batch_size=0)  # a fixed pool has nothing but replay


def test_a_warm_start_mixes_a_remembered_sample_of_the_class_with_one_of_another(digits):
    from smi_plugin.online import OnlinePool

    teacher = digits[0]
    pool = OnlinePool(_online(teacher), size=16, seed=0, warm_start=True)
    pool.advance(0, 6)
    assert pool.memory is None and pool.slots[0].age == 6  # nothing remembered yet: the first starts are noise
    pool.advance(0, 1)  # slot 0 is finished: its 8 samples are remembered and it starts again, warm
    memory, state, inverter = pool.memory, pool.slots[0].state, pool.inverter
    labels = state.labels
    starts = inverter.channels.to_pixels(state.canvas, inverter.grid)  # the canvas is the start until a stop
    assert torch.equal(pool.warm_images(labels, seed=3), pool.warm_images(labels, seed=3))  # drawn from the seed
    flat, remembered = starts.flatten(1), memory.images.flatten(1)
    for row, label in enumerate(labels.tolist()):
        # Some pair (own, other) and weight w in [0, 1] give the row exactly: solve w per pair, keep the best.
        best = (float("inf"), None)
        for own in (memory.labels == label).nonzero().flatten().tolist():
            for other in (memory.labels != label).nonzero().flatten().tolist():
                a, b = remembered[own], remembered[other]
                w = float(((flat[row] - b) @ (a - b)) / (a - b).square().sum())
                residual = float((w * a + (1 - w) * b - flat[row]).abs().max())
                best = min(best, (residual, w), key=lambda r: r[0])
        assert best[0] < 1e-5 and -1e-5 <= best[1] <= 1 + 1e-5
    given = pool.warm_images(labels, seed=3)  # the inverter starts exactly from given pixels (gray, as tied)
    started = inverter.start(labels, seed=0, images=given)
    assert torch.allclose(inverter.channels.to_pixels(started.canvas, inverter.grid), given, atol=1e-6)
    with pytest.raises(ValueError, match="warm-start"):  # a checkpoint of a noise-started pool does not resume it
        pool.load_state_dict({**pool.state_dict(), "warm_start": False})


def test_rebirth_samples_join_the_online_memory_as_they_are_emitted(digits):
    from smi_plugin.online import OnlinePool

    teacher = digits[0]
    inverter = SparseInverter(teacher, _online(teacher).config.replace(selection="rebirth", rebirth_divisions=2),
                              progress=False)
    pool = OnlinePool(inverter, size=8, seed=0)
    pool.advance(0, 3)
    assert pool.memory is None and len(pool.batch()) == 8  # the emitting stage is at iteration 3 of 6
    pool.advance(0, 1)
    emitted, current = pool.memory, pool.slots[0]
    assert pool.finished == 8 and len(pool.batch()) == 16
    assert emitted.patch_mask.flatten(1).sum(1).tolist() == [32] * 8  # the 32 most-attended of 64
    assert not (emitted.patch_mask & current.mask).any() and (emitted.patch_mask | current.mask).all()
    first = emitted.images.clone()
    pool.advance(0, 2)
    assert torch.equal(pool.memory.images, first)  # emitted samples are finished: never changed again
    pool.advance(0, 1)  # the slot ran its 6 iterations: its reborn rest joins the memory, the slot restarts
    assert pool.finished == 16 and torch.equal(pool.memory.patch_mask, current.mask)


def test_a_minutes_budget_ends_training_drives_the_schedule_and_resumes(digits, monkeypatch, tmp_path):
    from smi_plugin.distill import trainer as trainer_module

    teacher, _, mean, std, pool = digits
    clock = iter(float(t) for t in range(0, 1000, 15))  # every reading advances a fake clock by 15 s
    monkeypatch.setattr(trainer_module, "monotonic", lambda: next(clock))
    config = DistillConfig.from_recipe("full", source="pool", minutes=1.0, steps=1000, eval_every=1000,
                                       checkpoint_every=2)
    trainer = KDTrainer(teacher, tiny_student(), config, None, mean, std, out_dir=tmp_path, progress=False)
    lrs, train_step = [], trainer.train_step

    def recording_step(x, m):
        loss = train_step(x, m)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        return loss

    monkeypatch.setattr(trainer, "train_step", recording_step)
    _interrupt_at(trainer, monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit([pool])
    # steps 1-3 ran at 0, 15 and 30 s of the 60 s budget; the 4th was interrupted
    assert lrs == pytest.approx([2e-3 * 0.5 * (1 + math.cos(math.pi * t / 60)) for t in (0, 15, 30)])
    state = json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())
    assert (state["step"], state["elapsed"]) == (2, 30.0)  # 15 s a step: the clock is checkpointed
    resumed = KDTrainer(teacher, tiny_student(), config, None, mean, std, out_dir=tmp_path, progress=False)
    resumed.fit([pool])
    # the resumed run gets what is left: 30 s more, two steps, then the budget (not the 1000 steps) ends it
    assert (resumed.step, resumed.elapsed) == (4, 60.0)


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
    with pytest.raises(ValueError, match="mixup"):
        DistillConfig(mixup=1.5)
    with pytest.raises(ValueError, match="inverter"):
        KDTrainer(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), DistillConfig(source="online", mode="full"), None,
                  (0.5,), (0.5,), progress=False)
    assert DistillConfig.from_dict(DistillConfig(mixup=0.5).to_dict()) == DistillConfig(mixup=0.5)
    assert DistillConfig.from_recipe("full").optimizer == "adamw" and DistillConfig.from_recipe("full", lr=1.0).lr == 1.0
    assert DistillConfig.from_recipe("full", steps=5).minutes is None  # a length given replaces the budget
    with pytest.raises(ValueError, match="does not distil"):
        DistillConfig.from_recipe("calibration")


def test_cli_flags_are_generated_from_the_config_with_its_defaults():
    from smi_plugin.cli.distill import distill_config, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["distill", "--teacher", "digits-vit", "--mode", "full"])
    # The command's defaults are the library's recipe, its 10-minute budget included.
    assert distill_config(args, seed=0) == DistillConfig.from_recipe("full") and DistillConfig.from_recipe(
        "full").minutes == 10.0
    args = parser.parse_args(["distill", "--mode", "full", "--source", "pool", "--steps", "9"])
    assert distill_config(args, seed=0) == DistillConfig.from_recipe("full", source="pool", steps=9)  # no budget
    args = parser.parse_args(["distill", "--mode", "full", "--steps", "7", "--kd-lr", "0.01", "--mixup", "0.25",
                              "--lr", "0.3"])
    config = distill_config(args, seed=4)
    assert config == DistillConfig.from_recipe("full", steps=7, lr=0.01, mixup=0.25, seed=4)
    assert (config.batch_size, config.temperature, config.optimizer) == (128, 4.0, "adamw")  # the recipe's
    assert args.lr == 0.3  # --lr stays the inversion's


def test_epochs_scale_the_steps_with_the_pool(digits):
    teacher, _, mean, std, pool = digits  # 40 images
    config = DistillConfig(mode="linear-probe", steps=500, epochs=1.5, batch_size=16, eval_every=100)
    history = KDTrainer(teacher, linear_probe_student(teacher, 10), config, None, mean, std,
                        progress=False).fit([pool])
    assert len(history["kd_loss"]) == 4  # ceil(1.5 * 40 / 16) steps, not 500
    assert DistillConfig(epochs=1.5, batch_size=16).total_steps(20) == 2  # ceil(1.875): half the pool, half the steps
    assert DistillConfig(steps=7).total_steps(20) == 7


def test_mixup_mixes_two_pool_images_and_keeps_both_masks():
    pixels = torch.stack([torch.full((3, 32, 32), float(v)) for v in range(8)])
    masks = torch.zeros(8, 8, 8, dtype=torch.bool)
    for i in range(8):
        masks[i, i, :] = True  # image i keeps row i only
    x, m = sample_batch(pixels, masks, 8, torch.Generator().manual_seed(0), flip=False, mixup=1.0)
    values = x[:, 0, 0, 0]
    assert torch.equal(x, values.view(-1, 1, 1, 1).expand_as(x))  # every pixel mixed with one weight
    assert (values >= 0).all() and (values <= 7).all()
    assert (values != values.round()).sum() >= 4  # most inputs are mixes, not pool images
    kept_rows = m.any(dim=2).sum(dim=1)
    assert set(kept_rows.tolist()) <= {1, 2} and (kept_rows == 2).sum() >= 4  # union of the two masks
    # mixup=0 leaves every row a pool image; a share mixes about that share of the rows
    x, _ = augment_batch(pixels, masks, torch.Generator().manual_seed(0), flip=False, mixup=0.0)
    assert torch.equal(x, pixels)
    x, _ = augment_batch(pixels.repeat(50, 1, 1, 1), masks.repeat(50, 1, 1), torch.Generator().manual_seed(0),
                         flip=False, mixup=0.5)
    share = (x[:, 0, 0, 0] != x[:, 0, 0, 0].round()).float().mean().item()
    assert 0.3 < share < 0.6  # mixing two equal images gives a whole number too


def test_flip_mirrors_image_and_mask_together():
    pixels = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).view(2, 3, 4, 4)
    masks = torch.zeros(2, 2, 2, dtype=torch.bool)
    masks[:, :, 0] = True
    x, m = augment_batch(pixels, masks, torch.Generator().manual_seed(1), flip=True)
    for row in range(2):
        flipped = bool(m[row, 0, 1])
        assert torch.equal(x[row], pixels[row].flip(-1) if flipped else pixels[row])


def test_build_optimizer_trains_only_the_head_in_linear_probe_mode(tiny_vit):
    student = linear_probe_student(tiny_vit, 10)
    optimizer = build_optimizer(student, DistillConfig(mode="linear-probe"))
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in student.get_classifier().parameters()}
    assert isinstance(optimizer, torch.optim.SGD)
    full = build_optimizer(tiny_student(), DistillConfig.from_recipe("full"))
    assert isinstance(full, torch.optim.AdamW) and full.param_groups[0]["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="get_classifier"):
        build_optimizer(torch.nn.Linear(2, 2), DistillConfig(mode="linear-probe"))


def test_learning_rate_schedules():
    assert learning_rate(DistillConfig(lr=0.1), 50, 100) == 0.1
    cosine = DistillConfig(lr=0.1, lr_schedule="cosine")
    assert [learning_rate(cosine, s, 100) for s in (0, 50, 100)] == pytest.approx([0.1, 0.05, 0.0])


def test_pool_is_an_inverted_batch_view(digits):
    teacher, _, mean, std, pool = digits
    trainer = KDTrainer(teacher, linear_probe_student(teacher, 10), DistillConfig(steps=1, eval_every=10), None,
                        mean, std, progress=False)
    trainer.fit([pool.select(range(20)), pool.select(range(20, 40))])
    assert isinstance(trainer.source.pool, InvertedBatch) and len(trainer.source.pool) == trainer.images_seen == 40
    assert torch.allclose(trainer.source.pixels, pool.normalized())


def test_near_chance_is_a_failure():
    assert failed(0.14, 10) and not failed(0.16, 10) and failed(0.7, 2) and not failed(0.76, 2)


@pytest.mark.slow
def test_smi_distill_full_writes_the_contract_and_a_loadable_student(tmp_path, capsys, caplog):
    from smi_plugin.cli import main

    out = tmp_path / "run"
    main(["distill", "--teacher", "digits-vit", "--mode", "full", "--source", "pool", "--num-images", "40",
          "--iterations", "20",
          "--batch-size", "40", "--tie-channels", "--steps", "120", "--seed", "0", "--eval-every", "1000",
          "--eval-images", "90", "--json", str(tmp_path / "kd.json"), "--out", str(out)])
    report = json.loads((tmp_path / "kd.json").read_text())
    assert {"teacher_accuracy", "student_accuracy", "inverted_images", "mode", "failed"} <= set(report)
    # judged on the first 90 held-out digits: the teacher's figure is its accuracy on exactly those
    test = load_split("digits", "test")
    first_90 = test.subset(torch.arange(len(test)) < 90)  # by hand, not ImageSplit.first
    teacher = load_teacher("digits-vit")
    assert report["eval_images"] == 90
    assert report["teacher_accuracy"] == evaluate_accuracy(teacher, first_90, *model_normalization(teacher))
    assert round(report["student_accuracy"] * 90, 4) % 1 == 0
    assert report["mode"] == "full" and report["inverted_images"] == 40
    assert report["student_accuracy"] == report["curve"][-1][1] and report["curve"][-1][0] == 120
    assert report["failed"] == failed(report["student_accuracy"], 10)
    # A from-scratch student this short stays near chance: it must be reported as a failure, loudly.
    assert any("FAILED" in r.getMessage() for r in caplog.records) == report["failed"]
    assert json.loads(capsys.readouterr().out)["failed"] == report["failed"]  # stdout stays JSON
    student = load_teacher(str(out))
    config = json.loads((out / "config.json").read_text())  # timm's Hub form
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 10
    card = read_card(out)
    assert card["eval_images"] == 90 and student.num_classes == 10
    assert abs(card["accuracy"] - report["student_accuracy"]) < 1e-9


def test_competition_loss_counts_only_samples_the_student_still_agrees_on():
    """Hand check: sample 0 (student and teacher both pick class 0) gets the gradient of -JS/B, which a
    descent step follows to a larger divergence; sample 1 (the student already picks another class)
    gets none."""
    from smi_plugin.losses import competition_loss, jensen_shannon

    teacher = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]], requires_grad=True)
    student = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0]])
    loss, mean_js = competition_loss(student, teacher)
    js = jensen_shannon(student, teacher.detach(), per_sample=True)
    assert loss.item() == pytest.approx((1 - js[0].item()) / 2)
    assert mean_js.item() == pytest.approx(js.mean().item())
    loss.backward()
    assert teacher.grad[1].abs().max() == 0 and teacher.grad[0].abs().max() > 0
    stepped = teacher.detach() - 0.5 * teacher.grad
    assert jensen_shannon(student, stepped, per_sample=True)[0] > js[0]


def test_competition_waits_for_its_share_of_the_budget(tiny_vit):
    """The student competes only after ``competition_start`` of the steps."""
    from conftest import FAMILIES, make_vit

    name, overrides = FAMILIES["zoo_shape"]
    student = make_vit(name, seed=1, **overrides)
    inverter = SparseInverter(tiny_vit, InversionConfig(iterations=4, competition_weight=1.0), progress=False)
    trainer = KDTrainer(tiny_vit, student, DistillConfig(source="online", steps=10, competition_start=0.3,
                                                         pool_size=4, batch_size=2),
                        None, (0.5,) * 3, (0.5,) * 3, inverter=inverter, progress=False)
    trainer.total_steps = 10
    seen = []
    for trainer.step in range(10):
        seen.append(trainer.competitor() is not None)
    assert seen == [False] * 3 + [True] * 7


def test_competition_term_alone_pushes_a_sample_toward_disagreement(tiny_vit):
    """With only DeepInversion's competition term, images the student still classifies as the teacher
    does move to where the two disagree: their JS divergence on the images grows."""
    import copy

    from smi_plugin.losses import jensen_shannon
    from smi_plugin.tokens import forward_patches

    student = copy.deepcopy(tiny_vit)  # a student close to the teacher: it agrees on both images at first
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    config = InversionConfig(iterations=60, schedule="dense", ce_weight=0.0, tv_l2_weight=0.0,
                             competition_weight=1.0, lr=0.25, augment="patch", jitter=0.0, flip=False)
    inverter = SparseInverter(tiny_vit, config, progress=False, competitor=student)
    state = inverter.start(torch.tensor([0, 1]), seed=0)

    def divergence() -> float:
        with torch.no_grad():
            patches = inverter.channels.to_model(state.param)
            teacher = forward_patches(tiny_vit, inverter.grid, patches, state.kept, state.positions)
            return jensen_shannon(forward_patches(student, inverter.grid, patches, state.kept), teacher).item()

    before = divergence()
    with inverter.session():
        for iteration in range(60):
            inverter.step(state, iteration)
    assert divergence() > 2 * before  # 0.0019 -> 0.0060 here
