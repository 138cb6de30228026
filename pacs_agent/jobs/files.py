"""What every job does around its pipeline: find its input files, record its result objects.

Shared by the single-study methods (:mod:`pacs_agent.jobs.execute`) and the response method
(:mod:`pacs_agent.jobs.execute_response`), so neither imports the other's internals.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from sqlalchemy import select

from dicom_sr.source import source_fixes
from dicom_sr.sr.lesions import write_dataset
from inference.results import PipelineOutput
from pacs_agent.audit import record_event
from pacs_agent.config import Settings
from pacs_agent.db import Database
from pacs_agent.db.tables import Instance, Result, Series, Study
from pacs_agent.errors import InputError
from pacs_agent.jobs.queue import ClaimedJob
from pacs_agent.jobs.transient import TRANSIENT_ERRNOS, ResourceUnavailable, transient_errno
from pacs_agent.receive.spool import safe_name
from pacs_agent.send.outbox import enqueue

__all__ = ["JobInputs", "record_results", "record_source_warnings", "resolve_inputs"]


@dataclass(frozen=True)
class JobInputs:
    """Spool paths of the CT series and the segmentation object a job works on."""

    ct_paths: tuple[Path, ...]
    segmentation_path: Path


def resolve_inputs(db: Database, spool_dir: Path, job: ClaimedJob) -> JobInputs:
    """Find the files of the job's CT series and segmentation in the spool.

    Raises
    ------
    InputError
        An input named by the job is no longer recorded or its file is gone from the spool.
    ResourceUnavailable
        The spool itself is not there (an unmounted or empty shared filesystem): the job waits.
    """
    ct_uid = job.inputs.get("ct_series_instance_uid")
    seg_uid = job.inputs.get("segmentation_sop_instance_uid")
    with db.session() as session:
        ct_rows = session.execute(
            select(Instance.path)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.series_instance_uid == ct_uid)
            .order_by(Instance.id)
        ).all()
        seg_path = session.execute(
            select(Instance.path).where(Instance.sop_instance_uid == seg_uid)
        ).scalar_one_or_none()
    if not ct_rows:
        raise InputError(f"CT series {ct_uid} has no stored instances")
    if seg_path is None:
        raise InputError(f"segmentation {seg_uid} is not stored")
    paths = tuple(spool_dir / row[0] for row in ct_rows)
    missing = [p for p in (*paths, spool_dir / seg_path) if not p.exists()]
    if missing and _spool_away(spool_dir):
        raise ResourceUnavailable(
            f"the spool {spool_dir} is not available (missing or empty: is its filesystem mounted?)"
        )
    if missing:
        raise InputError(f"{len(missing)} input file(s) are missing from the spool, e.g. {missing[0]}")
    return JobInputs(ct_paths=paths, segmentation_path=spool_dir / seg_path)


def _spool_away(spool_dir: Path) -> bool:
    """True when the spool directory is missing or empty (its filesystem is gone), not just a file."""
    try:
        return not spool_dir.is_dir() or next(spool_dir.iterdir(), None) is None
    except OSError:
        return True


def _free_mb(directory: Path) -> int:
    """Free space of the filesystem of ``directory`` (or of its nearest existing parent), in MB."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free // (1024 * 1024)


def record_source_warnings(db: Database, job: ClaimedJob, sources: Sequence[Dataset]) -> list[str]:
    """Record, as warnings of the study, every source attribute that had to be made valid for the results.

    The results never copy an invalid value (:mod:`dicom_sr.source`); the operator learns what was
    changed (attribute and rule, never the value) in ``pacs-agent status`` and an ``input_warning``
    event. Returns the warnings that were new.
    """
    fixes = source_fixes(sources)
    if not fixes:
        return []
    with db.session() as session, session.begin():
        study = session.get(Study, job.study_id)
        if study is None:
            return []
        known = json.loads(study.input_warnings or "[]")
        new = [f"source attribute {fix.message}; the results carry a valid value" for fix in fixes]
        new = [warning for warning in new if warning not in known]
        for warning in new:
            record_event(
                session,
                "input_warning",
                level="WARNING",
                study_instance_uid=job.study_instance_uid,
                job_id=job.id,
                detail=warning,
            )
        study.input_warnings = json.dumps([*known, *new])
    return new


def record_results(
    db: Database, settings: Settings, job: ClaimedJob, output: PipelineOutput, objects: Sequence[Dataset]
) -> list[int]:
    """Write ``objects`` atomically under the results directory, record a Result row each and queue them.

    An object whose SOP Instance UID is already recorded (same inputs, method and version) keeps its
    row and is delivered once. Returns the ids of the Result rows.

    Raises
    ------
    ResourceUnavailable
        Free space is under ``[storage] min_free_mb`` (the watermark that keeps room for receiving),
        or the disk filled up / failed while writing: the job waits and writes again later.
    """
    results_dir = settings.storage.results_dir
    watermark = settings.storage.min_free_mb
    free = _free_mb(results_dir)
    if free < watermark:
        raise ResourceUnavailable(f"disk full writing results (free {free} MB < watermark {watermark} MB)")
    result_ids: list[int] = []
    written: list[tuple[Dataset, Path]] = []
    for ds in objects:
        relative = Path(safe_name(job.study_instance_uid)) / f"{safe_name(str(ds.SOPInstanceUID))}.dcm"
        try:
            write_dataset(ds, results_dir / relative)
        except OSError as exc:
            number = transient_errno(exc)  # pydicom re-raises without the number: look at the cause
            if number in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceUnavailable(
                    f"disk full writing results ({errno.errorcode[number]}, free {_free_mb(results_dir)} MB)"
                ) from exc
            if number is not None:
                raise ResourceUnavailable(
                    f"cannot write results ({TRANSIENT_ERRNOS[number]}) under {results_dir}"
                ) from exc
            raise
        written.append((ds, relative))
    with db.session() as session, session.begin():
        for ds, relative in written:
            row = session.execute(
                select(Result).where(Result.sop_instance_uid == str(ds.SOPInstanceUID))
            ).scalar_one_or_none()
            if row is None:
                row = Result(
                    job_id=job.id,
                    study_id=job.study_id,
                    kind="sr" if str(ds.Modality) == "SR" else "sc",
                    method=job.method,
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    series_instance_uid=str(ds.SeriesInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    path=str(relative),
                    algorithm_name=output.result.algorithm.name,
                    algorithm_version=output.result.algorithm.version,
                )
                session.add(row)
                session.flush()
            else:  # same inputs, method and version: the same UID, delivered once
                row.job_id = job.id
                row.path = str(relative)
            enqueue(session, row.id, [d.name for d in settings.destinations])
            result_ids.append(row.id)
    return result_ids
