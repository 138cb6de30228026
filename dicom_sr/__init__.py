"""DICOM result objects: Result dataclasses -> TID 1500 Structured Reports, deterministic UIDs.

``dicom_sr`` knows DICOM objects, not networking or models: it imports only pydicom, highdicom and
the ``inference.results`` dataclasses.
"""

from dicom_sr.codes import feature_concept, ucum
from dicom_sr.sr import build_measurement_report, write_dataset
from dicom_sr.text import render_sr_text
from dicom_sr.uids import ResultUIDs, derive_uid, result_uids

__all__ = [
    "ResultUIDs",
    "build_measurement_report",
    "derive_uid",
    "feature_concept",
    "render_sr_text",
    "result_uids",
    "ucum",
    "write_dataset",
]
