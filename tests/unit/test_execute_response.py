"""The response job's worker helpers (pacs_agent.jobs.execute_response): model lookup, inputs, summary."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from inference.response.signature import ResponseSignature
from pacs_agent.db import Database
from pacs_agent.errors import InputError
from pacs_agent.jobs.execute_response import (
    ResponseModelError,
    find_response_model,
    load_response_model,
    resolve_pair_inputs,
    run_response_job,
)
from pacs_agent.jobs.queue import ClaimedJob
from tests.unit.response_helpers import DEMO_PACKAGE

FOLLOW_UP_INPUTS = {"ct_series_instance_uid": "1.2.3.1", "segmentation_sop_instance_uid": "1.2.3.2"}
BASELINE_INPUTS = {
    "baseline_study_instance_uid": "1.2.4",
    "baseline_ct_series_instance_uid": "1.2.4.1",
    "baseline_segmentation_sop_instance_uid": "1.2.4.2",
}


def job(inputs: dict[str, str], method: str = "response") -> ClaimedJob:
    return ClaimedJob(
        id=7, study_id=1, study_instance_uid="1.2.3", method=method, inputs=dict(inputs), attempt=1, max_attempts=3
    )


def copy_package(target: Path, version: str | None = None) -> Path:
    shutil.copytree(DEMO_PACKAGE, target)
    if version is not None:
        manifest = target / "model.toml"
        manifest.write_text(manifest.read_text().replace('version = "0.1.0"', f'version = "{version}"', 1))
    return target


def test_no_package_means_no_model(tmp_path: Path) -> None:
    assert find_response_model([tmp_path / "missing", tmp_path]) is None
    assert load_response_model([tmp_path]) is None


def test_the_committed_demo_package_is_found_and_loads() -> None:
    assert find_response_model([DEMO_PACKAGE.parent]) == DEMO_PACKAGE
    signature = load_response_model([DEMO_PACKAGE.parent])
    assert isinstance(signature, ResponseSignature)
    assert signature.algorithm.is_demo and signature.threshold == 0.5
    assert sum(f.stat().st_size for f in DEMO_PACKAGE.iterdir()) < 1_000_000


def test_first_directory_wins_then_the_highest_version(tmp_path: Path) -> None:
    site, other = tmp_path / "site", tmp_path / "other"
    copy_package(site / "a", "0.9.1")
    copy_package(site / "b", "0.10.0")
    copy_package(other / "c", "5.0.0")
    assert find_response_model([site, other]) == site / "b"
    assert find_response_model([other, site]) == other / "c"


def test_a_tampered_package_is_refused_with_the_reason(tmp_path: Path) -> None:
    package = copy_package(tmp_path / "models" / "response-demo")
    weights = package / "classifier.skops"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ResponseModelError, match="is refused") as raised:
        load_response_model([tmp_path / "models"])
    assert isinstance(raised.value, InputError)  # the job fails at once, the worker survives


def test_a_job_without_baseline_inputs_is_an_input_error(sqlite_db: Database, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="baseline_ct_series_instance_uid"):
        resolve_pair_inputs(sqlite_db, tmp_path, job(FOLLOW_UP_INPUTS))


def test_inputs_not_stored_name_the_time_point(sqlite_db: Database, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^follow-up: CT series 1\.2\.3\.1 has no stored instances"):
        resolve_pair_inputs(sqlite_db, tmp_path, job(FOLLOW_UP_INPUTS | BASELINE_INPUTS))


def test_only_response_jobs_run_here(sqlite_db: Database) -> None:
    with pytest.raises(InputError, match="not 'radiomics'"):
        run_response_job(job(FOLLOW_UP_INPUTS, "radiomics"), None, sqlite_db)  # type: ignore[arg-type]
