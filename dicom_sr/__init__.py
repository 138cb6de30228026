"""DICOM result objects: Result dataclasses -> TID 1500 Structured Reports and Secondary Captures.

``dicom_sr`` knows DICOM objects, not networking or models: it imports only pydicom, highdicom,
numpy, Pillow and the ``inference.results`` dataclasses.
"""

from dicom_sr.codes import feature_concept, ucum
from dicom_sr.sc.lesions import build_lesion_capture, build_summary_capture
from dicom_sr.source import SourceFix, source_fixes, valid_source
from dicom_sr.sr.lesions import build_measurement_report, write_dataset
from dicom_sr.sr.reader import read_measurement_report, read_predictions
from dicom_sr.sr.templates import Prediction
from dicom_sr.sr.text import render_sr_text
from dicom_sr.uids import ResultUIDs, derive_uid, result_uids

__all__ = [
    "Prediction",
    "ResultUIDs",
    "SourceFix",
    "build_lesion_capture",
    "build_measurement_report",
    "build_summary_capture",
    "derive_uid",
    "feature_concept",
    "read_measurement_report",
    "read_predictions",
    "render_sr_text",
    "result_uids",
    "source_fixes",
    "ucum",
    "valid_source",
    "write_dataset",
]
