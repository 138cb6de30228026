"""Run one response (M5) job: both studies' inputs -> ``run_response`` -> response SR + SC -> outbox.

The pairing (:mod:`pacs_agent.routing.pairing`) schedules the job on the **follow-up** study with the
inputs ``ct_series_instance_uid`` and ``segmentation_sop_instance_uid`` (follow-up) and
``baseline_study_instance_uid``, ``baseline_ct_series_instance_uid`` and
``baseline_segmentation_sop_instance_uid``. Both time points are resolved from the spool like any
job's inputs (:func:`pacs_agent.jobs.files.resolve_inputs`), the pair is compared by
:func:`inference.pipelines.response.run_response`, and the results - one TID 1500 SR and one
Secondary Capture page, both in the follow-up study - are recorded and queued for every
destination exactly as for the single-study methods (:func:`pacs_agent.jobs.files.record_results`).

The response model (a ``response`` model package, :mod:`inference.response.signature`) is looked up
in :attr:`pacs_agent.config.Settings.model_dirs`, in order: ``[models] dir`` (default
``<state_dir>/models``), then, when ``[models] use_demo`` is true, the committed demo packages in
``config/models`` (``config/models/response-demo``, DEMO - NOT FOR CLINICAL USE). In the first
directory holding a ``response`` package the highest version wins. Without any, the job still
reports the features, deltas and comparators and says "no response model installed - score not
computed". A package that is present but fails verification fails the job with the reason.

Imported by the worker only (through :func:`pacs_agent.jobs.execute.run_job`).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pydicom import Dataset

from dicom_sr.sc.response import build_response_capture, key_lesions
from dicom_sr.sr.response import RESULT_KIND, build_response_report, lesion_result
from inference.pipelines.model_methods import ModelUnavailableError, find_package
from inference.pipelines.response import METHOD, run_response
from inference.pipelines.study import LoadedStudy, StudyLoader, key_image
from inference.response import LesionMeasurement, ResponseResult
from inference.response.signature import ResponseSignature, load_signature
from inference.results import KeyImage, PipelineOutput, StudyResult
from inference.structures import StructureSelection
from pacs_agent.config import Settings
from pacs_agent.db import Database
from pacs_agent.errors import InputError, ModelPackageError
from pacs_agent.jobs.files import JobInputs, record_results, record_source_warnings, resolve_inputs
from pacs_agent.jobs.queue import ClaimedJob

__all__ = [
    "BASELINE_INPUTS",
    "PairInputs",
    "ResponseModelError",
    "build_response_objects",
    "find_response_model",
    "load_response_model",
    "resolve_pair_inputs",
    "run_response_job",
    "study_summary",
]

logger = logging.getLogger(__name__)

BASELINE_INPUTS = {
    "ct_series_instance_uid": "baseline_ct_series_instance_uid",
    "segmentation_sop_instance_uid": "baseline_segmentation_sop_instance_uid",
}
"""Job input keys of a single-study job -> the keys of the baseline's in a response job."""


class ResponseModelError(InputError):
    """The installed response model package is refused (checksum, manifest, classifier).

    An :class:`~pacs_agent.errors.InputError`: the job fails at once with the reason; repairing or
    removing the package is an operator's task.
    """


@dataclass(frozen=True)
class PairInputs:
    """Spool paths of both time points of a response job."""

    baseline: JobInputs
    follow_up: JobInputs


def resolve_pair_inputs(db: Database, spool_dir: Path, job: ClaimedJob) -> PairInputs:
    """Find the files of the follow-up's and the baseline's CT series and segmentations.

    Parameters
    ----------
    db
        The node's database.
    spool_dir
        Spool directory (``[storage]``).
    job
        A claimed ``response`` job (inputs as scheduled by the pairing).

    Returns
    -------
    PairInputs

    Raises
    ------
    InputError
        A baseline input key is missing, or an input is no longer stored / its file is gone
        (the message says which time point).
    """
    missing = [key for key in BASELINE_INPUTS.values() if not job.inputs.get(key)]
    if missing:
        raise InputError(f"the response job has no {', '.join(missing)}: it was not scheduled by the pairing")
    try:
        follow_up = resolve_inputs(db, spool_dir, job)
    except InputError as exc:
        raise InputError(f"follow-up: {exc}") from exc
    baseline_job = replace(job, inputs={key: job.inputs[value] for key, value in BASELINE_INPUTS.items()})
    try:
        baseline = resolve_inputs(db, spool_dir, baseline_job)
    except InputError as exc:
        raise InputError(f"baseline: {exc}") from exc
    return PairInputs(baseline=baseline, follow_up=follow_up)


def find_response_model(model_dirs: Sequence[Path]) -> Path | None:
    """The ``response`` package to use: the first directory holding one; there, the highest version.

    Parameters
    ----------
    model_dirs
        Directories of model packages in order of preference (``Settings.model_dirs``).

    Returns
    -------
    pathlib.Path | None
        The package path, or None when no directory holds a ``response`` package.

    Raises
    ------
    ResponseModelError
        The chosen package's manifest cannot be read.
    """
    try:
        return find_package(METHOD, model_dirs)
    except ModelUnavailableError as exc:
        raise ResponseModelError(str(exc)) from exc


def load_response_model(model_dirs: Sequence[Path]) -> ResponseSignature | None:
    """Load and verify the response model of :func:`find_response_model`, or None when there is none.

    Raises
    ------
    ResponseModelError
        The package fails verification (checksum, manifest, classifier).
    """
    path = find_response_model(model_dirs)
    if path is None:
        logger.info("no response model package installed: deltas and comparators only")
        return None
    try:
        return load_signature(path)
    except ModelPackageError as exc:
        raise ResponseModelError(f"response model package {path} is refused: {exc}") from exc


def _study_date(ds: Dataset) -> datetime.date | None:
    try:
        return datetime.datetime.strptime(str(ds.get("StudyDate", "") or "")[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _key_image(study: LoadedStudy, lesion: LesionMeasurement | None) -> KeyImage | None:
    """The key slice and mask of ``lesion``, from the study the pipeline measured it in (nothing is read again).

    A matched lesion's follow-up measurement carries the baseline's tracking UID; it is found by its
    segment number and tracking id, which are its own at each time point.
    """
    if lesion is None:
        return None
    for item in study.lesions:
        if item.source.number == lesion.source.number and item.lesion.tracking_id == lesion.tracking_id:
            return key_image(study.volume, item.lesion)
    logger.warning("key slice of %s not drawn: the lesion was not found again", lesion.tracking_uid)
    return None


def _selection(value: object) -> StructureSelection | None:
    """Routing's choice of structures from the job inputs (jobs scheduled before 0.2 have none)."""
    return StructureSelection.from_dict(value) if isinstance(value, dict) else None


def build_response_objects(
    result: ResponseResult, baseline: LoadedStudy, follow_up: LoadedStudy, when: datetime.datetime
) -> list[Dataset]:
    """The DICOM objects of one pair: the TID 1500 response SR and the Secondary Capture page.

    Parameters
    ----------
    result
        The output of :func:`~inference.pipelines.response.run_response` for these two studies.
    baseline, follow_up
        Both time points as the pipeline loaded them (headers, segmentation, key slices).
    when
        Content date / time of the SC (the page shows it).

    Returns
    -------
    list of pydicom.Dataset
        ``[sr, sc]``, both in the follow-up study.

    Raises
    ------
    InputError
        The result cannot be written as DICOM (e.g. the two studies carry different Patient IDs).
    """
    follow_ct, base_ct = list(follow_up.ct_headers), list(baseline.ct_headers)
    follow_seg, base_seg = follow_up.segmentation_dataset, baseline.segmentation_dataset
    base_lesion, follow_lesion = key_lesions(result)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in follow_ct}
    ref = by_uid.get(follow_lesion.key_slice_sop_instance_uid, follow_ct[0]) if follow_lesion else follow_ct[0]
    try:
        sr = build_response_report(result, follow_ct, follow_seg, base_ct, base_seg)
        sc = build_response_capture(
            result,
            ref,
            content_datetime=when,
            baseline_image=_key_image(baseline, base_lesion),
            follow_up_image=_key_image(follow_up, follow_lesion),
            baseline_date=_study_date(base_ct[0]),
            follow_up_date=_study_date(follow_ct[0]),
        )
    except ValueError as exc:
        raise InputError(f"the response result cannot be written as DICOM: {exc}") from exc
    return [sr, sc]


def study_summary(result: ResponseResult) -> StudyResult:
    """A :class:`StudyResult` summary of a pair for the worker and the Result rows.

    Study, CT series, frame of reference and segmentation are the follow-up's; ``lesions`` are the
    tracked lesions (matched ones as seen at follow-up, new ones, disappeared ones as seen at
    baseline), without features: the values are in the SR.
    """
    tracked = [pair.follow_up for pair in result.pairs] + list(result.new_lesions) + list(result.disappeared_lesions)
    return StudyResult(
        method=result.method,
        study_instance_uid=result.follow_up.study_instance_uid,
        ct_series_instance_uid=result.follow_up.ct_series_instance_uid,
        frame_of_reference_uid=result.follow_up.frame_of_reference_uid,
        segmentation=result.follow_up.segmentation,
        algorithm=result.algorithm,
        lesions=tuple(lesion_result(m) for m in tracked),
        provenance=dict(result.provenance),
    )


def run_response_job(
    job: ClaimedJob, settings: Settings, db: Database, loader: StudyLoader | None = None
) -> tuple[StudyResult, list[int]]:
    """Execute a ``response`` job and record its SR and SC (Result rows + outbox), not its final state.

    Parameters
    ----------
    job
        The claimed job (scheduled on the follow-up study).
    settings
        Node settings (spool, results directory, model directories, destinations).
    db
        The node's database.
    loader
        The worker's study loader (both studies are read once and may be kept for the follow-up's
        other methods); None: a loader for this job only.

    Returns
    -------
    tuple
        A :class:`StudyResult` summary (:func:`study_summary`) and the ids of the Result rows.

    Raises
    ------
    InputError
        Inputs missing from the spool, a CT or segmentation the pipeline rejects, no lesion at
        either time point, a refused model package (:class:`ResponseModelError`). Lesions present at
        one time point only are not an error: the SR reports them as new / disappeared.
    """
    if job.method != METHOD:
        raise InputError(f"run_response_job runs {METHOD!r} jobs, not {job.method!r}")
    inputs = resolve_pair_inputs(db, settings.storage.spool_dir, job)
    signature = load_response_model(settings.model_dirs)
    loader = StudyLoader() if loader is None else loader
    baseline_structures = _selection(job.inputs.get("baseline_structures"))
    followup_structures = _selection(job.inputs.get("structures"))
    baseline = loader.load(
        inputs.baseline.ct_paths, inputs.baseline.segmentation_path, baseline_structures, allow_no_lesion=True
    )
    follow_up = loader.load(
        inputs.follow_up.ct_paths, inputs.follow_up.segmentation_path, followup_structures, allow_no_lesion=True
    )
    result = run_response(
        inputs.baseline.ct_paths,
        inputs.baseline.segmentation_path,
        inputs.follow_up.ct_paths,
        inputs.follow_up.segmentation_path,
        model=signature,
        baseline_structures=baseline_structures,
        followup_structures=followup_structures,
        baseline_study=baseline,
        followup_study=follow_up,
    )
    if result.follow_up.study_instance_uid != job.study_instance_uid:
        raise InputError("the follow-up CT series named by the job belongs to another study")
    record_source_warnings(
        db,
        job,
        [follow_up.ct_headers[0], follow_up.segmentation_dataset, baseline.ct_headers[0]],
    )
    objects = build_response_objects(result, baseline, follow_up, datetime.datetime.now())
    summary = study_summary(result)
    ids = record_results(db, settings, job, PipelineOutput(result=summary, result_kind=RESULT_KIND), objects)
    score = "none" if result.score is None else f"{result.score.probability:.2f} ({result.score.risk_group} risk)"
    logger.info(
        "response job %d: %d matched, %d new, %d disappeared lesion(s); RECIST-like %s; score %s; %d object(s)",
        job.id,
        len(result.pairs),
        len(result.new_lesions),
        len(result.disappeared_lesions),
        result.recist.category,
        score,
        len(ids),
    )
    return summary, ids
