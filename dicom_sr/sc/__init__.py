"""Secondary Captures: pages a radiologist reads in any viewer.

- :mod:`dicom_sr.sc.lesions`: one study's result -> a summary page and one page per lesion;
- :mod:`dicom_sr.sc.response`: a baseline + follow-up pair (M5) -> one page;
- :mod:`dicom_sr.sc.render`: the pixels of those pages (numpy + Pillow, no DICOM).
"""

from dicom_sr.sc.lesions import build_lesion_capture, build_summary_capture
from dicom_sr.sc.response import build_response_capture

__all__ = ["build_lesion_capture", "build_response_capture", "build_summary_capture"]
