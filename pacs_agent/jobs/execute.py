"""Run one claimed job: inputs from the spool -> pipeline -> DICOM results -> outbox.

Imported only by the worker process: it pulls in ``inference`` (numpy, SimpleITK, pyradiomics,
and torch for the CNN methods) and ``dicom_sr``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import Dataset, dcmread
from sqlalchemy import select

from dicom_sr.sc import build_lesion_capture, build_summary_capture
from dicom_sr.source import source_fixes
from dicom_sr.sr import build_measurement_report, write_dataset
from inference.pipelines import PACKAGED_METHODS, PIPELINES
from inference.pipelines.model_methods import installed_package
from inference.results import PipelineOutput, StudyResult
from inference.structures import StructureSelection
from pacs_agent.audit import record_event
from pacs_agent.config import Settings
from pacs_agent.db import Database
from pacs_agent.errors import InputError
from pacs_agent.jobs.queue import ClaimedJob
from pacs_agent.models import Instance, Result, Series, Study
from pacs_agent.receive.spool import safe_name
from pacs_agent.send.outbox import enqueue

logger = logging.getLogger(__name__)


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
    if missing:
        raise InputError(f"{len(missing)} input file(s) are missing from the spool, e.g. {missing[0]}")
    return JobInputs(ct_paths=paths, segmentation_path=spool_dir / seg_path)


def _evidence(inputs: JobInputs) -> tuple[list[Dataset], Dataset]:
    ct = [dcmread(p, stop_before_pixels=True) for p in inputs.ct_paths]
    segmentation = dcmread(inputs.segmentation_path)
    return ct, segmentation


def build_result_objects(
    output: PipelineOutput, ct_headers: Sequence[Dataset], segmentation: Dataset, when: datetime
) -> list[Dataset]:
    """The DICOM objects of one result: the TID 1500 SR, a summary SC and one SC per lesion."""
    result = output.result
    sr = build_measurement_report(
        result,
        [*ct_headers, segmentation],
        segmentation_dataset=segmentation,
        predictions=result.predictions,
        result_kind=output.result_kind,
    )
    by_uid = {str(ds.SOPInstanceUID): ds for ds in ct_headers}
    objects: list[Dataset] = [
        sr,
        build_summary_capture(
            result,
            ct_headers[0],
            content_datetime=when,
            predictions=result.predictions,
            result_kind=output.result_kind,
        ),
    ]
    for lesion in result.lesions:
        image = output.key_images.get(lesion.tracking_uid)
        if image is None or not image.mask.any():
            continue
        objects.append(
            build_lesion_capture(
                result,
                lesion,
                image.hu,
                image.mask,
                by_uid.get(lesion.key_slice_sop_instance_uid, ct_headers[0]),
                content_datetime=when,
                predictions=result.predictions.get(lesion.tracking_uid, ()),
                heatmap=image.heatmap,
                pixel_spacing=image.pixel_spacing_mm,
                result_kind=output.result_kind,
            )
        )
    return objects


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


def _record(
    db: Database, settings: Settings, job: ClaimedJob, output: PipelineOutput, objects: Sequence[Dataset]
) -> list[int]:
    result_ids: list[int] = []
    written: list[tuple[Dataset, Path]] = []
    for ds in objects:
        relative = Path(safe_name(job.study_instance_uid)) / f"{safe_name(str(ds.SOPInstanceUID))}.dcm"
        write_dataset(ds, settings.storage.results_dir / relative)
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


def run_job(job: ClaimedJob, settings: Settings, db: Database) -> tuple[StudyResult, list[int]]:
    """Execute ``job`` and record its result objects (Result rows + outbox), not its final state.

    Returns the pipeline result and the ids of the Result rows written.

    Raises
    ------
    InputError
        Unknown method, inputs the pipeline rejects (bad geometry, empty mask, ...), or a model
        method without a usable model package in ``Settings.model_dirs``.
    """
    if job.method == "response":  # a pair of studies (M5): baseline + follow-up
        from pacs_agent.jobs.execute_response import run_response_job

        return run_response_job(job, settings, db)
    pipeline = PIPELINES.get(job.method)
    if pipeline is None:
        raise InputError(f"unknown method {job.method!r}; known: {', '.join(sorted(PIPELINES))}")
    options: dict[str, object] = {}
    if job.method in PACKAGED_METHODS:  # verified and loaded once per worker process, then cached
        options["model"] = installed_package(job.method, settings.model_dirs)
    structures = job.inputs.get("structures")
    if structures:  # routing's choice of tumour / organ structures (jobs scheduled before 0.2 have none)
        options["structures"] = StructureSelection.from_dict(structures)
    inputs = resolve_inputs(db, settings.storage.spool_dir, job)
    output = pipeline(inputs.ct_paths, inputs.segmentation_path, **options)
    ct_headers, segmentation = _evidence(inputs)
    record_source_warnings(db, job, [ct_headers[0], segmentation])  # patient / study attributes: one header
    objects = build_result_objects(output, ct_headers, segmentation, datetime.now())
    return output.result, _record(db, settings, job, output, objects)
