import pytest
import torch

from smi_plugin.calibration import SparseInvertedCalibrationDataset
from smi_plugin.config import InversionConfig
from smi_plugin.distill import DistillConfig
from smi_plugin.recipes import RECIPES, Recipe, get_recipe, teacher_inversion_settings


def test_every_recipe_is_valid_frozen_and_says_what_chose_it():
    for name, recipe in RECIPES.items():
        assert recipe.name == name and recipe.chosen_by and recipe.summary
        assert isinstance(recipe.inversion_config(), InversionConfig)  # the fields validate
        if recipe.distillation:
            assert DistillConfig.from_recipe(name).mode == recipe.distillation["mode"]
        with pytest.raises(TypeError):
            recipe.inversion["lr"] = 1.0  # read-only
        with pytest.raises(AttributeError):
            recipe.name = "other"
    assert get_recipe(RECIPES["full"]) is RECIPES["full"]
    with pytest.raises(ValueError, match="unknown recipe 'fast'; use one of"):
        get_recipe("fast")
    with pytest.raises(ValueError, match="not InversionConfig fields"):
        Recipe(name="bad", summary="", inversion={"learning_rate": 0.1})


def test_settings_resolve_teacher_then_recipe_then_caller(tiny_vit):
    tiny_vit.pretrained_cfg = {**tiny_vit.pretrained_cfg, "dataset": "digits"}  # a teacher of gray data
    assert teacher_inversion_settings(tiny_vit) == {"tie_channels": True}
    config = RECIPES["full"].inversion_config(tiny_vit, lr=0.5)
    assert config.tie_channels and config.lr == 0.5 and config.iterations == RECIPES["full"].inversion["iterations"]
    assert RECIPES["full"].inversion_config(tiny_vit, tie_channels=False).tie_channels is False
    tiny_vit.pretrained_cfg = {**tiny_vit.pretrained_cfg, "dataset": None}  # unknown data: every channel
    assert teacher_inversion_settings(tiny_vit) == {}
    assert teacher_inversion_settings(tiny_vit, dataset="fashion-mnist") == {"tie_channels": True}


def test_calibration_inverts_with_its_recipe_in_python_as_in_smi_quantize(tiny_vit):
    from smi_plugin.cli.quantize import CALIBRATION_INVERSION

    data = SparseInvertedCalibrationDataset.from_inverter(tiny_vit, 2, InversionConfig(iterations=2).replace(
        **RECIPES["calibration"].inversion), progress=False)
    assert data.batch.provenance["config"]["selection"] == "random"
    assert CALIBRATION_INVERSION == dict(RECIPES["calibration"].inversion)
    torch.manual_seed(0)
    default = SparseInvertedCalibrationDataset.from_inverter(tiny_vit, 1, progress=False, seed=0)
    assert default.batch.provenance["config"]["selection"] == "random"  # no config: the calibration recipe
