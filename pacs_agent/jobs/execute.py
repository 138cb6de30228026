"""Run one claimed job: inputs from the spool -> pipeline -> DICOM results -> outbox.

Imported only by the worker process: it pulls in ``inference`` (numpy, SimpleITK, pyradiomics,
and torch for the CNN methods) and ``dicom_sr``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from pydicom import Dataset

from dicom_sr.sc.lesions import build_lesion_capture, build_summary_capture
from dicom_sr.sr.lesions import build_measurement_report
from inference.methods import UnknownMethodError, method_spec
from inference.pipelines import PIPELINES
from inference.pipelines.model_methods import installed_package
from inference.pipelines.study import StudyLoader
from inference.results import PipelineOutput, StudyResult
from inference.structures import StructureSelection
from pacs_agent.config import Settings
from pacs_agent.db import Database
from pacs_agent.errors import InputError
from pacs_agent.jobs.execute_response import run_response_job
from pacs_agent.jobs.files import record_results, record_source_warnings, resolve_inputs
from pacs_agent.jobs.queue import ClaimedJob

logger = logging.getLogger(__name__)


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


def run_job(
    job: ClaimedJob, settings: Settings, db: Database, loader: StudyLoader | None = None
) -> tuple[StudyResult, list[int]]:
    """Execute ``job`` and record its result objects (Result rows + outbox), not its final state.

    Returns the pipeline result and the ids of the Result rows written. ``loader`` is the worker's
    study loader: the study (both, for a pair) is read once and handed to each method of it; None:
    a loader for this job only.

    Raises
    ------
    InputError
        Unknown method, inputs the pipeline rejects (bad geometry, empty mask, ...), or a model
        method without a usable model package in ``Settings.model_dirs``.
    """
    try:
        spec = method_spec(job.method)
    except UnknownMethodError as exc:
        raise InputError(str(exc)) from None
    loader = StudyLoader() if loader is None else loader
    if spec.pair:  # a baseline + follow-up pair (M5)
        return run_response_job(job, settings, db, loader)
    pipeline = PIPELINES[spec.name]
    options: dict[str, object] = {}
    if spec.package_required:  # verified and loaded once per worker process, then cached
        options["model"] = installed_package(job.method, settings.model_dirs)
    chosen = job.inputs.get("structures")
    # routing's choice of tumour / organ structures (jobs scheduled before 0.2 have none)
    structures = StructureSelection.from_dict(chosen) if chosen else None
    inputs = resolve_inputs(db, settings.storage.spool_dir, job)
    study = loader.load(inputs.ct_paths, inputs.segmentation_path, structures)
    output = pipeline(inputs.ct_paths, inputs.segmentation_path, structures=structures, study=study, **options)
    ct_headers, segmentation = study.ct_headers, study.segmentation_dataset
    record_source_warnings(db, job, [ct_headers[0], segmentation])  # patient / study attributes: one header
    objects = build_result_objects(output, ct_headers, segmentation, datetime.now())
    return output.result, record_results(db, settings, job, output, objects)
