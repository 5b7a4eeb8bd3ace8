import json

import pytest
import torch

from smi_plugin import load_teacher
from smi_plugin.data import load_split
from smi_plugin.evaluation import evaluate_accuracy
from smi_plugin.images import model_normalization
from smi_plugin.zoo import TeacherError, card_path, load_card, weights_path, zoo_names


@pytest.mark.slow(seconds=13)
@pytest.mark.parametrize("name", zoo_names())
def test_shipped_teacher_reproduces_its_card(name):
    card = load_card(name)
    assert weights_path(name).stat().st_size < 5 * 2 ** 20
    teacher = load_teacher(name)
    assert teacher.pretrained_cfg["mean"] == tuple(card["mean"])
    test = load_split(card["dataset"], "test")
    accuracy = evaluate_accuracy(teacher, test, *model_normalization(teacher))
    assert accuracy == pytest.approx(card["heldout_top1"], abs=1e-4)
    # The targets bind the two main teachers; the knowledge-transfer pair (a backbone trained on
    # half the classes, a teacher fine-tuned from it for 3 epochs) only has to be a usable classifier,
    # and the scattered-items teacher sees each item at half the resolution (about 4 patches a side).
    target = {"digits-vit": 0.97, "fashion-mnist-vit": 0.88, "fashion-mnist-scattered-vit": 0.72}.get(name, 0.80)
    if card["trained_classes"] != list(range(card["num_classes"])):  # a backbone: judged on the classes it saw
        seen = test.subset(torch.isin(test.labels, torch.tensor(card["trained_classes"])))
        accuracy = evaluate_accuracy(teacher, seen, *model_normalization(teacher))
    assert accuracy >= target


def test_timm_checkpoint_path_loads_a_users_weights(tmp_path):
    from safetensors.torch import save_file

    teacher = load_teacher("digits-vit")
    path = tmp_path / "mine.safetensors"
    save_file(teacher.state_dict(), str(path))
    shape = {k: v for k, v in load_card("digits-vit")["model_kwargs"].items() if k != "num_classes"}
    mine = load_teacher("vit_tiny_patch16_224", checkpoint_path=str(path), num_classes=10, **shape)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(mine(x), teacher(x))


def test_a_checkpoints_classifier_size_is_read_from_it(tmp_path):
    """A fine-tuned checkpoint of an ImageNet-sized architecture (a ViT, a CNN student) loads without
    --num-classes: the classifier takes the checkpoint's size and the model computes what was saved."""
    import timm
    from safetensors.torch import save_file

    for name, kwargs in (("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 1,
                                                   "num_heads": 2}), ("resnet10t", {})):
        torch.manual_seed(0)
        saved = timm.create_model(name, num_classes=7, **kwargs).eval()
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(path))
        loaded = load_teacher(name, checkpoint_path=str(path), **kwargs)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert loaded.num_classes == 7 and torch.equal(loaded(x), saved(x))


def test_bad_teachers_get_clear_errors(tmp_path):
    with pytest.raises(TeacherError, match="unknown teacher 'nope'"):
        load_teacher("nope")
    with pytest.raises(TeacherError, match="carries its own weights"):
        load_teacher("digits-vit", pretrained=True)
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file(load_teacher("digits-vit").state_dict(), str(path))
    with pytest.raises(TeacherError, match="does not match"):
        load_teacher("vit_tiny_patch16_224", checkpoint_path=str(path), num_classes=7, img_size=32, patch_size=4,
                     embed_dim=96, depth=4, num_heads=3)
    with pytest.raises(TeacherError, match="not found"):
        load_teacher("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "missing.pth"))


def test_cards_record_the_recipe():
    for name in zoo_names():
        card = load_card(name)
        assert {"architecture", "recipe", "mean", "std", "heldout_top1"} <= set(card)
        config = json.loads(card_path(name).read_text())  # a timm Hub folder, the card under smi_plugin
        assert config["smi_plugin"]["recipe"] == card["recipe"] and config["pretrained_cfg"]["mean"] == card["mean"]
        assert card["recipe"]["seed"] == 0


USER_VIT = {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}


def test_users_normalization_lands_in_pretrained_cfg_and_pth_checkpoints_load(tmp_path):
    import timm

    from smi_plugin.images import model_normalization

    model = timm.create_model("vit_tiny_patch16_224", num_classes=5, **USER_VIT)
    # A timm train.py / DDP style checkpoint: wrapped in "state_dict", keys prefixed by "module.".
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "ckpt.pth")
    mine = load_teacher("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "ckpt.pth"), num_classes=5,
                        mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), **USER_VIT)
    assert model_normalization(mine) == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(mine(x), model.eval()(x))
    with pytest.raises(TeacherError, match="both --mean and --std"):
        load_teacher("vit_tiny_patch16_224", mean=(0.5, 0.5, 0.5))
    with pytest.raises(TeacherError, match="must be positive"):
        load_teacher("vit_tiny_patch16_224", mean=(0.5,) * 3, std=(0.0, 1.0, 1.0))
    with pytest.raises(TeacherError, match="fixed architecture"):
        load_teacher("digits-vit", num_classes=3)


def test_broken_checkpoints_are_named_for_what_they_are(tmp_path):
    import random

    import timm
    from safetensors.torch import save_file

    noise = random.Random(0).randbytes(200)  # fixed noise: os.urandom's first byte was sometimes pickle's PROTO
    (tmp_path / "noise.safetensors").write_bytes(noise)
    with pytest.raises(TeacherError, match="not a valid safetensors file"):
        load_teacher("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "noise.safetensors"))
    (tmp_path / "noise.pth").write_bytes(noise)
    with pytest.raises(TeacherError, match="not a torch checkpoint") as err:
        load_teacher("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "noise.pth"))
    assert "weights_only=False" not in str(err.value)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(TeacherError, match="not a state dict of tensors"):
        load_teacher("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "list.pth"))
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=10, **USER_VIT).state_dict(),
              str(tmp_path / "small.safetensors"))
    with pytest.raises(TeacherError) as err:
        load_teacher("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "small.safetensors"))
    message = str(err.value)
    assert "pos_embed: checkpoint (1, 65, 96) vs model (1, 197, 192)" in message
    assert "--model-kwargs img_size=32 patch_size=4 embed_dim=96 depth=4" in message and "--num-classes 10" in message
