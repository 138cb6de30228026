"""Read the few header elements the node needs from an encoded DICOM object, without pixel data.

This runs on the C-STORE hot path: large values (pixel data, contour data) are deferred, never
decoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from inference.structures import referenced_instance_uids, referenced_series_uids
from pacs_agent.errors import InputError

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
RT_STRUCTURE_SET = "1.2.840.10008.5.1.4.1.1.481.3"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_TRUE_COLOR_SC = "1.2.840.10008.5.1.4.1.1.7.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"

STORAGE_SOP_CLASSES: dict[str, str] = {
    CT_IMAGE: "CT Image Storage",
    ENHANCED_CT_IMAGE: "Enhanced CT Image Storage",
    RT_STRUCTURE_SET: "RT Structure Set Storage",
    SEGMENTATION: "Segmentation Storage",
    SECONDARY_CAPTURE: "Secondary Capture Image Storage",
    MULTIFRAME_TRUE_COLOR_SC: "Multi-frame True Color Secondary Capture Image Storage",
    COMPREHENSIVE_3D_SR: "Comprehensive 3D SR Storage",
}
IMAGE_SOP_CLASSES = frozenset({CT_IMAGE, ENHANCED_CT_IMAGE, SEGMENTATION, SECONDARY_CAPTURE, MULTIFRAME_TRUE_COLOR_SC})
SEGMENTATION_SOP_CLASSES = frozenset({SEGMENTATION, RT_STRUCTURE_SET})

_DEFER = 2048  # bytes: values larger than this are not read


class HeaderError(InputError):
    """The received bytes are not a DICOM object the node can index."""


@dataclass(frozen=True)
class InstanceHeader:
    """What the node records about a received instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None
    series_description: str | None
    frame_of_reference_uid: str | None
    patient_id: str | None
    issuer_of_patient_id: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    study_date: str | None
    accession_number: str | None
    referenced_series_uids: tuple[str, ...]
    has_pixel_data: bool
    referenced_instance_uids: tuple[str, ...] = ()
    """Images a SEG / RTSTRUCT was drawn on (empty for images)."""
    protocol_name: str | None = None
    image_comments: str | None = None
    contrast_bolus_agent: str | None = None
    contrast_start_time: str | None = None
    acquisition_time: str | None = None
    body_part_examined: str | None = None
    study_description: str | None = None
    image_position: str | None = None
    """Image Position (Patient), three backslash-separated numbers (None when absent or malformed)."""
    image_orientation: str | None = None
    """Image Orientation (Patient) as six backslash-separated numbers (None when absent or malformed)."""


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip() or None


def _vector(ds: Dataset, keyword: str, size: int) -> str | None:
    """A numeric multi-valued attribute as backslash-separated text; None when absent or not ``size`` finite numbers."""
    try:
        value = ds.get(keyword)
        if value is None:
            return None
        numbers = [float(v) for v in (value if isinstance(value, MultiValue | list | tuple) else [value])]
    except Exception:  # a value that breaks its VR: no geometry, not a refusal
        return None
    if len(numbers) != size or not all(math.isfinite(v) for v in numbers):
        return None
    return "\\".join(repr(v) for v in numbers)


def read_header(data: bytes) -> InstanceHeader:
    """Parse the header of an encoded DICOM file (preamble + file meta + dataset).

    Raises
    ------
    HeaderError
        The bytes are not DICOM, are truncated, or lack a UID the node needs.
    """
    try:
        ds = dcmread(BytesIO(data), defer_size=_DEFER, force=False)
        meta = ds.file_meta
        missing = [
            k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not _text(ds, k)
        ]
        if missing:
            raise HeaderError(f"required attribute(s) missing or empty: {', '.join(missing)}")
        has_pixels = "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
        references = referenced_series_uids(ds)
        images = referenced_instance_uids(ds) if str(ds.SOPClassUID) in SEGMENTATION_SOP_CLASSES else ()
        return InstanceHeader(
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            transfer_syntax_uid=str(meta.get("TransferSyntaxUID", "")),
            modality=_text(ds, "Modality"),
            series_description=(_text(ds, "SeriesDescription") or "")[:64] or None,
            frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
            patient_id=_text(ds, "PatientID"),
            issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
            patient_birth_date=_text(ds, "PatientBirthDate"),
            patient_sex=_text(ds, "PatientSex"),
            study_date=_text(ds, "StudyDate"),
            accession_number=_text(ds, "AccessionNumber"),
            referenced_series_uids=references,
            has_pixel_data=has_pixels,
            referenced_instance_uids=images,
            protocol_name=(_text(ds, "ProtocolName") or "")[:64] or None,
            image_comments=(_text(ds, "ImageComments") or "")[:256] or None,
            contrast_bolus_agent=(_text(ds, "ContrastBolusAgent") or "")[:64] or None,
            contrast_start_time=_text(ds, "ContrastBolusStartTime"),
            acquisition_time=_text(ds, "AcquisitionTime") or _text(ds, "SeriesTime"),
            body_part_examined=(_text(ds, "BodyPartExamined") or "")[:16] or None,
            study_description=(_text(ds, "StudyDescription") or "")[:64] or None,
            image_position=_vector(ds, "ImagePositionPatient", 3),
            image_orientation=_vector(ds, "ImageOrientationPatient", 6),
        )
    except HeaderError:
        raise
    except InvalidDicomError as exc:
        raise HeaderError(f"not a DICOM file: {exc}") from None
    except Exception as exc:  # pydicom raises many kinds on malformed input
        raise HeaderError(f"cannot decode the dataset: {type(exc).__name__}: {exc}") from None
