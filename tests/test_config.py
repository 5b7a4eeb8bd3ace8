import json

import pytest

from smi_plugin import InversionConfig, StoppingSchedule


def test_paper_preset_is_the_published_run():
    config = InversionConfig.preset("paper")
    assert (config.iterations, config.lr, config.betas, config.tv_l2_weight) == (4000, 0.25, (0.5, 0.99), 1e-4)
    assert config.schedule == StoppingSchedule.paper()


def test_default_schedule_scales_the_paper_stages_to_the_run():
    # 300 of the paper's 4000 iterations: stages at 50/100/200/300 * 300/4000 = 3.75/7.5/15/22.5
    assert InversionConfig().schedule == StoppingSchedule({4: 0.3, 8: 0.3, 15: 0.3, 22: 0.3})
    assert InversionConfig(iterations=4000).schedule == StoppingSchedule.paper()


def test_schedule_text_names_the_first_stages_of_the_scaled_paper():
    assert InversionConfig(iterations=400, schedule="paper-scaled:2").schedule == StoppingSchedule({5: 0.3, 10: 0.3})
    assert InversionConfig(iterations=400, schedule="Paper-Scaled").schedule == StoppingSchedule.paper_scaled(400)
    assert InversionConfig(iterations=400, schedule=" paper-scaled : 2 ").schedule == StoppingSchedule({5: 0.3, 10: 0.3})
    for text in ("paper-scaled:two", "paper-scaled:", "paper-scaled:5", "paper-scaled:0"):
        with pytest.raises(ValueError, match=f"schedule '{text}'.*'paper-scaled:N'"):
            InversionConfig(schedule=text)


def test_presets_override_and_refuse_unknown_names():
    config = InversionConfig.preset("data-like", iterations=40)
    assert (config.iterations, config.augment, config.tie_channels) == (40, "pixel", True)
    with pytest.raises(ValueError, match="unknown inversion preset"):
        InversionConfig.preset("fastest")


def test_round_trips_through_json():
    config = InversionConfig(iterations=123, schedule="10:0.5", seed=7, mean=(0.1, 0.2, 0.3),
                             std=(0.4, 0.5, 0.6), base_method="psaq", tie_channels=True)
    restored = InversionConfig.from_json(config.to_json())
    assert restored == config
    assert json.loads(config.to_json())["schedule"] == "10:0.5"


@pytest.mark.parametrize("field, value", [
    ("iterations", 0), ("batch_size", -1), ("lr", 0.0), ("betas", (0.5, 1.0)), ("lr_schedule", "step"),
    ("base_method", "nope"), ("tv_l2_weight", -1.0), ("input_stats_weight", -0.5), ("jitter", 1.5),
    ("std", (0.0, 1.0, 1.0)), ("precision", "float16"), ("initial_noise", "uniform"), ("frequency_decay", -1.0),
])
def test_invalid_fields_are_named(field, value):
    kwargs = {field: value}
    if field == "std":
        kwargs["mean"] = (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=field):
        InversionConfig(**kwargs)


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="unknown InversionConfig keys"):
        InversionConfig.from_dict({"iterations": 5, "learning_rate": 0.1})
