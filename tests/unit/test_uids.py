"""Deterministic result UIDs (dicom_sr.uids)."""

from __future__ import annotations

import re

import pytest
from pydicom.uid import UID

from dicom_sr.uids import ResultUIDs, derive_uid, result_uids

CT_SERIES = "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"
INPUTS = [
    CT_SERIES,
    "1.2.392.200103.20080913.113635.2.2009.6.22.21.43.10.23431.1",
    "1.2.392.200103.20080913.113635.2.2009.6.22.21.43.10.23432.1",
    "1.2.276.0.7230010.3.1.4.0.42154.1458337731.665796",
]


def test_derive_uid_is_deterministic_and_valid() -> None:
    first = derive_uid("a", "b", "c")
    assert first == derive_uid("a", "b", "c")
    assert isinstance(first, UID)
    assert first.is_valid
    assert len(first) <= 64
    assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", first)


def test_derive_uid_depends_on_every_part_and_their_boundaries() -> None:
    base = derive_uid("ab", "c")
    assert derive_uid("a", "bc") != base
    assert derive_uid("abc") != base
    assert derive_uid("c", "ab") != base
    assert derive_uid("ab", "c", "") != base


def test_derive_uid_rejects_bad_parts() -> None:
    with pytest.raises(TypeError, match='"parts"'):
        derive_uid()
    with pytest.raises(TypeError, match='"parts"'):
        derive_uid("a", 1)  # type: ignore[arg-type]


def test_result_uids_same_inputs_same_uids() -> None:
    first = result_uids(INPUTS, "M5", "1.0.0", "SR")
    again = result_uids(list(INPUTS), "M5", "1.0.0", "SR")
    assert isinstance(first, ResultUIDs)
    assert first == again
    assert first.series_instance_uid != first.sop_instance_uid
    assert first.series_instance_uid.is_valid and first.sop_instance_uid.is_valid


def test_result_uids_ignore_order_and_duplicates() -> None:
    first = result_uids(INPUTS, "M5", "1.0.0", "SR")
    assert result_uids(list(reversed(INPUTS)), "M5", "1.0.0", "SR") == first
    assert result_uids([*INPUTS, INPUTS[0]], "M5", "1.0.0", "SR") == first
    assert result_uids(tuple(INPUTS), "M5", "1.0.0", "SR") == first


@pytest.mark.parametrize(
    ("inputs", "method", "version", "kind"),
    [
        (INPUTS, "M5", "1.0.1", "SR"),  # new model version
        (INPUTS, "M1", "1.0.0", "SR"),  # other method
        (INPUTS, "M5", "1.0.0", "SC"),  # other object kind
        (INPUTS[:-1], "M5", "1.0.0", "SR"),  # one input fewer
        ([*INPUTS, "1.2.3.4"], "M5", "1.0.0", "SR"),  # one input more
    ],
)
def test_result_uids_change_with_any_input(inputs: list[str], method: str, version: str, kind: str) -> None:
    base = result_uids(INPUTS, "M5", "1.0.0", "SR")
    changed = result_uids(inputs, method, version, kind)
    assert changed.series_instance_uid != base.series_instance_uid
    assert changed.sop_instance_uid != base.sop_instance_uid


def test_result_uids_validation() -> None:
    with pytest.raises(TypeError, match='"input_uids"'):
        result_uids("1.2.3", "M5", "1.0.0", "SR")
    with pytest.raises(TypeError, match='"input_uids"'):
        result_uids([1, 2], "M5", "1.0.0", "SR")  # type: ignore[list-item]
    with pytest.raises(TypeError, match='"method"'):
        result_uids(INPUTS, None, "1.0.0", "SR")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='"algorithm_version"'):
        result_uids(INPUTS, "M5", "", "SR")
    with pytest.raises(ValueError, match='"input_uids"'):
        result_uids([], "M5", "1.0.0", "SR")
