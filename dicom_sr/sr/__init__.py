"""Structured Reports: TID 1500 measurement reports of a study's lesions and of a response pair.

- :mod:`dicom_sr.sr.lesions`: one study's result (radiomics, M1-M4, comparator) -> Comprehensive 3D SR;
- :mod:`dicom_sr.sr.response`: a baseline + follow-up pair (M5) -> Comprehensive 3D SR;
- :mod:`dicom_sr.sr.templates`: the TID 1411 / 1410 / 1501 groups both use (lesion groups, predictions);
- :mod:`dicom_sr.sr.reader`: an SR -> the result dataclasses again;
- :mod:`dicom_sr.sr.text`: an SR -> plain text (``pacs-agent show``, ``make demo``).

Coded concepts are in :mod:`dicom_sr.codes`; equipment and device observer in :mod:`dicom_sr.common`.
"""

from dicom_sr.sr.lesions import build_measurement_report, write_dataset
from dicom_sr.sr.reader import read_measurement_report, read_predictions
from dicom_sr.sr.response import build_response_report
from dicom_sr.sr.text import render_sr_text

__all__ = [
    "build_measurement_report",
    "build_response_report",
    "read_measurement_report",
    "read_predictions",
    "render_sr_text",
    "write_dataset",
]
