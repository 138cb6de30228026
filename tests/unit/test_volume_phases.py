"""Multi-phase CT series: split by Temporal Position Index / Acquisition Number / Content Time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.imaging.volume import SINGLE_PHASE, VolumeError, load_ct_series, split_phases
from tests.dicom_factory import Series, write_ct_series

POSITIONS = [(0.0, 0.0, 2.0 * k) for k in range(5)]


def _two_phases(tmp_path: Path, **per_phase: tuple[object, object]) -> Series:
    """Ten files: the five positions twice; ``per_phase[keyword] = (phase-1 value, phase-2 value)``."""
    series = write_ct_series(tmp_path, positions=POSITIONS + POSITIONS)
    for k, path in enumerate(series.paths):
        ds = pydicom.dcmread(path)
        for keyword, values in per_phase.items():
            value = values[k // 5]
            setattr(ds, keyword, value(k) if callable(value) else value)
        ds.save_as(path, enforce_file_format=True)
    return series


def test_split_by_acquisition_number(tmp_path: Path) -> None:
    series = _two_phases(tmp_path, AcquisitionNumber=(3, 12))
    phases = split_phases(series.paths)
    assert list(phases) == ["AcquisitionNumber=3", "AcquisitionNumber=12"]  # numeric order, not text order
    assert phases["AcquisitionNumber=3"] == series.paths[:5]
    assert phases["AcquisitionNumber=12"] == series.paths[5:]


def test_load_refuses_a_multi_phase_series_and_names_the_phases(tmp_path: Path) -> None:
    series = _two_phases(tmp_path, AcquisitionNumber=(1, 2))
    with pytest.raises(VolumeError, match=r"holds 2 phases \(AcquisitionNumber=1, AcquisitionNumber=2\)"):
        load_ct_series(series.paths)


def test_load_one_phase(tmp_path: Path) -> None:
    series = _two_phases(tmp_path, AcquisitionNumber=(1, 2))
    second = load_ct_series(list(reversed(series.paths)), phase="AcquisitionNumber=2")
    np.testing.assert_array_equal(second.array, series.hu[5:])
    first = load_ct_series(series.paths, phase="AcquisitionNumber=1")
    np.testing.assert_array_equal(first.array, series.hu[:5])
    assert second.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in series.datasets[5:])
    with pytest.raises(VolumeError, match=r"no phase 'AcquisitionNumber=7'; its phases are: AcquisitionNumber=1"):
        load_ct_series(series.paths, phase="AcquisitionNumber=7")


def test_temporal_position_index_comes_first(tmp_path: Path) -> None:
    series = _two_phases(tmp_path, TemporalPositionIndex=(1, 2), AcquisitionNumber=(5, 5))
    assert list(split_phases(series.paths)) == ["TemporalPositionIndex=1", "TemporalPositionIndex=2"]


def test_content_time_when_nothing_else_differs(tmp_path: Path) -> None:
    series = _two_phases(tmp_path, AcquisitionNumber=(1, 1), ContentTime=("101500", "102310"))
    assert list(split_phases(series.paths)) == ["ContentTime=101500", "ContentTime=102310"]


def test_per_slice_content_times_do_not_make_phases(tmp_path: Path) -> None:
    # every slice has its own time: grouping by it would give ten "phases" of one slice
    series = _two_phases(tmp_path, ContentTime=(lambda k: f"1015{k:02d}", lambda k: f"1023{k:02d}"))
    assert split_phases(series.paths) == {SINGLE_PHASE: series.paths}
    with pytest.raises(VolumeError, match="share the position"):
        load_ct_series(series.paths)


def test_single_phase_series(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path)
    assert split_phases(series.paths) == {SINGLE_PHASE: series.paths}
    np.testing.assert_array_equal(load_ct_series(series.paths, phase=SINGLE_PHASE).array, series.hu)


def test_split_phases_reads_headers_only_and_reports_unreadable_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    with pytest.raises(VolumeError, match=r"cannot read junk\.dcm"):
        split_phases([junk])
