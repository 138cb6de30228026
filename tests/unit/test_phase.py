"""Portal-venous phase rules: each rule, each verdict with its reason."""

from __future__ import annotations

import pytest

from pacs_agent.routing.phase import PhaseRules, SeriesPhaseInfo, acquisition_delay_seconds, classify

RULES = PhaseRules()


@pytest.mark.parametrize(
    ("info", "expected", "reason"),
    [
        (SeriesPhaseInfo("ABD PORTAL VENOUS 70s", contrast_bolus_agent="IOHEXOL"), True, "matches 'portal'"),
        (SeriesPhaseInfo("CT ABD", protocol_name="Liver PV", contrast_bolus_agent="X"), True, "ProtocolName"),
        (SeriesPhaseInfo("CT ABD", image_comments="70 s delay", contrast_bolus_agent="X"), True, "ImageComments"),
        (SeriesPhaseInfo("ABD ARTERIAL", contrast_bolus_agent="X"), False, "exclusion pattern 'arterial'"),
        (SeriesPhaseInfo("ABD NON-CONTRAST"), False, "exclusion"),
        (SeriesPhaseInfo("ABD PORTAL VENOUS"), False, "no ContrastBolusAgent"),
        (SeriesPhaseInfo("ABD 5mm", contrast_bolus_agent="X"), False, "no portal-venous pattern"),
        (SeriesPhaseInfo("ABD PVP", contrast_bolus_agent="X"), False, "no portal-venous pattern"),  # \bPV\b
    ],
)
def test_classify(info: SeriesPhaseInfo, expected: bool, reason: str) -> None:
    verdict = classify(info, RULES)
    assert verdict.portal_venous is expected
    assert reason in verdict.reason


def test_delay_window() -> None:
    rules = PhaseRules(delay_window_seconds=(60, 90))
    timed = SeriesPhaseInfo("ABD", contrast_bolus_agent="X", contrast_start_time="101500", acquisition_time="101610")
    assert acquisition_delay_seconds(timed) == 70
    verdict = classify(timed, rules)
    assert verdict.portal_venous and "70 s after contrast start" in verdict.reason
    early = SeriesPhaseInfo(
        "ABD PORTAL", contrast_bolus_agent="X", contrast_start_time="101500", acquisition_time="101530.5"
    )
    verdict = classify(early, rules)
    assert not verdict.portal_venous and "outside 60-90 s" in verdict.reason
    untimed = SeriesPhaseInfo("ABD PORTAL", contrast_bolus_agent="X")
    assert classify(untimed, rules).portal_venous  # window ignored when a time is missing


def test_delay_across_midnight_and_bad_times() -> None:
    assert acquisition_delay_seconds(SeriesPhaseInfo(contrast_start_time="235950", acquisition_time="000100")) == 70
    assert acquisition_delay_seconds(SeriesPhaseInfo(contrast_start_time="garbage", acquisition_time="1")) is None


def test_contrast_requirement_can_be_off() -> None:
    rules = PhaseRules(require_contrast_agent=False)
    assert classify(SeriesPhaseInfo("PORTAL"), rules).portal_venous


def test_bad_rules_are_refused() -> None:
    with pytest.raises(Exception, match=r"unterminated|missing"):
        PhaseRules(portal_venous_patterns=("(",))
    with pytest.raises(ValueError, match="delay window"):
        PhaseRules(delay_window_seconds=(90, 60))
