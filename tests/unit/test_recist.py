"""RECIST 1.1-like category: every boundary, target selection, volumetric change."""

from __future__ import annotations

import pytest

from inference.response.recist import MeasuredLesion, assess_response, select_targets


def lesion(
    name: str,
    baseline: float,
    follow_up: float | None,
    *,
    organ: str = "liver",
    volume: float = 1.0,
    follow_up_volume: float | None = None,
) -> MeasuredLesion:
    if follow_up_volume is None:
        follow_up_volume = None if follow_up is None else volume
    return MeasuredLesion(name, organ, baseline, volume, follow_up, follow_up_volume)


@pytest.mark.parametrize(
    ("follow_up", "category"),
    [
        (70.0, "PR"),  # exactly -30 %
        (69.0, "PR"),
        (70.1, "SD"),  # -29.9 %
        (100.0, "SD"),
        (119.9, "SD"),  # +19.9 %
        (120.0, "PD"),  # exactly +20 % and +20 mm
        (150.0, "PD"),
    ],
)
def test_percent_thresholds_on_a_100_mm_sum(follow_up: float, category: str) -> None:
    result = assess_response([lesion("a", 60.0, follow_up * 0.6), lesion("b", 40.0, follow_up * 0.4)])
    assert result.baseline_sum_mm == pytest.approx(100.0)
    assert result.percent_change == pytest.approx(follow_up - 100.0)
    assert result.category == category


@pytest.mark.parametrize(
    ("follow_up", "category"),
    [
        (14.9, "SD"),  # +24 % but only +2.9 mm
        (16.9, "SD"),  # +40.8 % but only +4.9 mm
        (17.0, "PD"),  # +41.7 % and exactly +5 mm
    ],
)
def test_pd_also_needs_5_mm_absolute_growth(follow_up: float, category: str) -> None:
    result = assess_response([lesion("a", 12.0, follow_up)])
    assert result.category == category


def test_all_targets_gone_is_complete_response() -> None:
    result = assess_response([lesion("a", 30.0, None), lesion("b", 20.0, 0.0)])
    assert result.category == "CR"
    assert result.follow_up_sum_mm == 0.0
    assert result.percent_change == pytest.approx(-100.0)
    assert result.category_name == "complete response"


def test_disappeared_target_counts_zero() -> None:
    result = assess_response([lesion("a", 30.0, None), lesion("b", 20.0, 20.0)])
    assert result.follow_up_sum_mm == pytest.approx(20.0)
    assert result.category == "PR"  # -60 %


def test_new_lesion_is_progression_whatever_the_sum() -> None:
    result = assess_response([lesion("a", 30.0, None)], new_lesions=1, new_lesion_volume_ml=0.5)
    assert result.category == "PD"
    assert "new lesion" in result.reason
    shrinking = assess_response([lesion("a", 30.0, 10.0)], new_lesions=2)
    assert shrinking.category == "PD"


def test_no_target_lesion_is_not_evaluable() -> None:
    result = assess_response([lesion("a", 9.9, 20.0)])
    assert result.category == "NE"
    assert result.percent_change is None
    assert result.target_ids == ()
    assert assess_response([]).category == "NE"
    assert assess_response([], new_lesions=1).category == "PD"


def test_target_needs_10_mm() -> None:
    assert [t.lesion_id for t in select_targets([lesion("a", 10.0, 5.0), lesion("b", 9.99, 5.0)])] == ["a"]


def test_two_targets_per_organ_five_in_total() -> None:
    lesions = [lesion(f"liver{i}", 50.0 - i, 1.0) for i in range(4)]
    lesions += [lesion(f"lung{i}", 30.0 - i, 1.0, organ="lung") for i in range(3)]
    lesions += [lesion(f"node{i}", 20.0 - i, 1.0, organ="node") for i in range(3)]
    targets = [t.lesion_id for t in select_targets(lesions)]
    assert targets == ["liver0", "liver1", "lung0", "lung1", "node0"]
    result = assess_response(lesions)
    assert result.target_ids == tuple(targets)
    assert result.baseline_sum_mm == pytest.approx(50 + 49 + 30 + 29 + 20)


def test_only_targets_enter_the_sum_but_all_lesions_the_volume() -> None:
    lesions = [
        lesion("a", 40.0, 40.0, volume=10.0, follow_up_volume=5.0),
        lesion("b", 30.0, 30.0, volume=6.0, follow_up_volume=3.0),
        lesion("c", 25.0, 60.0, volume=4.0, follow_up_volume=30.0),  # third liver lesion: not a target
    ]
    result = assess_response(lesions)
    assert result.target_ids == ("a", "b")
    assert result.category == "SD"
    assert result.baseline_volume_ml == pytest.approx(20.0)
    assert result.follow_up_volume_ml == pytest.approx(38.0)
    assert result.volumetric_change_percent == pytest.approx(90.0)


def test_volumetric_change_counts_new_and_disappeared_lesions() -> None:
    result = assess_response(
        [lesion("a", 20.0, None, volume=8.0), lesion("b", 20.0, 20.0, volume=2.0)],
        new_lesions=1,
        new_lesion_volume_ml=1.0,
    )
    assert result.volumetric_change_percent == pytest.approx(-70.0)


def test_invalid_input() -> None:
    with pytest.raises(ValueError, match="negative"):
        assess_response([lesion("a", -1.0, 1.0)])
    with pytest.raises(ValueError, match="negative"):
        assess_response([], new_lesions=-1)
