import pytest

from smi_plugin import StoppingSchedule


def test_paper_schedule_kept_counts_match_the_paper():
    # 196 -> 137 -> 95 -> 66 -> 46 for DeiT at 224 (algorithm.md), i.e. 76.5% sparsity.
    assert StoppingSchedule.paper().kept_counts(196) == [196, 137, 95, 66, 46]
    assert StoppingSchedule.paper().stages == ((50, 0.3), (100, 0.3), (200, 0.3), (300, 0.3))


def test_dense_is_empty():
    dense = StoppingSchedule.dense()
    assert dense.stages == () and dense.is_dense and dense.kept_counts(64) == [64]
    assert StoppingSchedule.parse("dense") == dense and str(dense) == "dense"


def test_parse_round_trips():
    schedule = StoppingSchedule.parse("100:0.3, 50:0.5")
    assert schedule.stages == ((50, 0.5), (100, 0.3))
    assert StoppingSchedule.parse(str(schedule)) == schedule
    assert StoppingSchedule.parse("paper") == StoppingSchedule.paper()


def test_keep_count_is_floor_and_robust_to_float_error():
    assert StoppingSchedule.keep_count(10, 0.3) == 7  # 10 * 0.7 = 7.000000000000001
    assert StoppingSchedule.keep_count(10, 0.7) == 3
    assert StoppingSchedule.keep_count(95, 0.3) == 66  # floor(66.5)


@pytest.mark.parametrize("bad, message", [
    ({50: 1.0}, "50:1.0"), ({50: -0.1}, "50:-0.1"), ({-5: 0.3}, "-5:0.3"), ({0: 0.3}, "0:0.3"),
    ([(50, 0.3), (50, 0.2)], "appears twice"),
])
def test_invalid_schedules_name_the_bad_entry(bad, message):
    with pytest.raises(ValueError, match=message):
        StoppingSchedule(bad)


def test_stage_keeping_nothing_fails_and_late_stage_warns():
    with pytest.raises(ValueError, match="keep 0 of 1"):
        StoppingSchedule({1: 0.5}).kept_counts(1)
    with pytest.warns(UserWarning, match=r"\[300\]"):
        StoppingSchedule({50: 0.3, 300: 0.3}).check_run(iterations=200, num_patches=196)


def test_unparseable_text_explains_the_format():
    with pytest.raises(ValueError, match="ITERATION:RATIO"):
        StoppingSchedule.parse("50-0.3")


def test_paper_scaled_keeps_distinct_increasing_stages():
    assert StoppingSchedule.paper_scaled(4000) == StoppingSchedule.paper()
    assert StoppingSchedule.paper_scaled(400).stages == ((5, 0.3), (10, 0.3), (20, 0.3), (30, 0.3))
    short = StoppingSchedule.paper_scaled(20).stages
    assert [i for i, _ in short] == [1, 2, 3, 4]


def test_paper_scaled_can_keep_only_its_first_stages():
    assert StoppingSchedule.paper_scaled(400, stages=2).stages == ((5, 0.3), (10, 0.3))
    assert StoppingSchedule.paper_scaled(4000, stages=4) == StoppingSchedule.paper()
    # 64 patches: 70% of 64 -> 44, 70% of 44 -> 30 (47% of the grid after two stages; 14 after four).
    assert StoppingSchedule.paper_scaled(200, stages=2).kept_counts(64) == [64, 44, 30]
    assert StoppingSchedule.paper_scaled(200).kept_counts(64)[-1] == 14
    with pytest.raises(ValueError, match="keep 1 to 4"):
        StoppingSchedule.paper_scaled(200, stages=0)
