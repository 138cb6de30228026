"""A worker at start removes result files a killed worker left half-written, and only those."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pacs_agent.jobs.worker import STALE_TEMP_SECONDS, remove_stale_result_temps


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_only_old_temp_files_are_removed(tmp_path: Path) -> None:
    study = tmp_path / "results" / "1.2.3"
    study.mkdir(parents=True)
    stale = study / ".sr.dcm.abc123.tmp"
    fresh = study / ".sc.dcm.def456.tmp"  # another worker is writing it now
    result = study / "sr.dcm"
    hidden_old = study / ".notes"  # not a temp file of ours
    for path in (stale, fresh, result, hidden_old):
        path.write_bytes(b"x")
    _age(stale, STALE_TEMP_SECONDS + 60)
    _age(result, STALE_TEMP_SECONDS + 60)
    _age(hidden_old, STALE_TEMP_SECONDS + 60)

    assert remove_stale_result_temps(tmp_path / "results") == 1
    assert not stale.exists()
    assert fresh.exists() and result.exists() and hidden_old.exists()


def test_no_results_folder_yet(tmp_path: Path) -> None:
    assert remove_stale_result_temps(tmp_path / "missing") == 0
