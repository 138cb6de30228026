"""CT Image Storage instances of a phantom series, in any of the supported transfer syntaxes."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from inference.phantom.anatomy import PhantomGeometry

#: Transfer syntaxes the phantom can write CT slices in. JPEG Lossless (Process 14, 1.2.840.10008.1.2.4.70)
#: and the lossy ones are missing: pydicom has no encoder for the former, and lossy ones would not
#: round-trip exactly.
NATIVE_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
)
COMPRESSED_TRANSFER_SYNTAXES: tuple[UID, ...] = (RLELossless, JPEGLSLossless, JPEG2000Lossless)
SUPPORTED_TRANSFER_SYNTAXES: tuple[UID, ...] = NATIVE_TRANSFER_SYNTAXES + COMPRESSED_TRANSFER_SYNTAXES

SERIES_DESCRIPTION = "ABDOMEN PORTAL VENOUS 70s"
MANUFACTURER = "pacs-agent"
MODEL_NAME = "pacs-agent phantom"
SOFTWARE_VERSION = "1"
RESCALE_INTERCEPT = -1024.0


@dataclass(frozen=True)
class SeriesInfo:
    """Patient, study and series attributes shared by every instance of a phantom study."""

    patient_name: str
    patient_id: str
    patient_birth_date: datetime.date
    patient_sex: str
    study_instance_uid: str
    study_date: datetime.date
    study_time: datetime.time
    study_id: str
    accession_number: str
    frame_of_reference_uid: str

    @property
    def patient_age(self) -> str:
        """PatientAge (``065Y``) at the study date."""
        born, seen = self.patient_birth_date, self.study_date
        years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
        return f"{years:03d}Y"


def add_patient_and_study(ds: Dataset, info: SeriesInfo) -> None:
    """Patient, General Study and Patient Study modules."""
    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = info.patient_birth_date.strftime("%Y%m%d")
    ds.PatientSex = info.patient_sex
    ds.PatientAge = info.patient_age
    ds.StudyInstanceUID = info.study_instance_uid
    ds.StudyDate = info.study_date.strftime("%Y%m%d")
    ds.StudyTime = info.study_time.strftime("%H%M%S")
    ds.StudyID = info.study_id
    ds.AccessionNumber = info.accession_number
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT ABDOMEN WITH CONTRAST"


def ct_dataset(
    info: SeriesInfo,
    geometry: PhantomGeometry,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    k: int,
    instance_number: int,
    stored: np.ndarray,
    signed: bool,
) -> Dataset:
    """One CT Image Storage instance (slice index ``k``) with native little-endian pixel data.

    ``stored`` holds the stored values (HU minus the rescale intercept) as uint16, or int16 HU when
    ``signed``.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = info.study_date.strftime("%Y%m%d")
    add_patient_and_study(ds, info)
    acquisition = datetime.datetime.combine(info.study_date, info.study_time) + datetime.timedelta(seconds=70)
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ds.StudyDate
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = acquisition.strftime("%H%M%S")
    ds.Modality = "CT"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.InstitutionName = "PHANTOM HOSPITAL"
    ds.StationName = "PHANTOM"
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.ProtocolName = "ABDOMEN PORTAL VENOUS"
    ds.BodyPartExamined = "ABDOMEN"
    ds.ContrastBolusAgent = "IOPAMIDOL 370"
    ds.ContrastBolusRoute = "IV"
    ds.ContrastBolusVolume = 100.0
    ds.ContrastBolusStartTime = info.study_time.strftime("%H%M%S")
    ds.SliceThickness = geometry.slice_thickness_mm
    ds.KVP = 120.0
    ds.DataCollectionDiameter = 500.0
    ds.ReconstructionDiameter = round(geometry.columns * geometry.pixel_spacing_mm, 3)
    ds.GantryDetectorTilt = 0.0
    ds.TableHeight = 150.0
    ds.RotationDirection = "CW"
    ds.ExposureTime = 500
    ds.XRayTubeCurrent = 250
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "HFS"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = 3
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    ds.FrameOfReferenceUID = info.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    x0, y0, _ = geometry.origin_mm
    z = geometry.slice_z(k)
    ds.ImagePositionPatient = [round(x0, 6), round(y0, 6), round(z, 6)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceLocation = round(z, 6)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = geometry.rows
    ds.Columns = geometry.columns
    ds.PixelSpacing = [geometry.pixel_spacing_mm, geometry.pixel_spacing_mm]
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleIntercept = 0.0 if signed else RESCALE_INTERCEPT
    ds.RescaleSlope = 1.0
    ds.RescaleType = "HU"
    ds.WindowCenter = 40.0
    ds.WindowWidth = 400.0
    ds.WindowCenterWidthExplanation = "ABDOMEN"
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return ds


def to_stored(hu: np.ndarray, signed: bool) -> np.ndarray:
    """Round HU to stored pixel values (uint16 with intercept -1024, 12 bits; or int16 HU)."""
    if signed:
        return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return np.clip(np.rint(hu - RESCALE_INTERCEPT), 0, 4095).astype(np.uint16)


def write_instance(ds: Dataset, path: Path, transfer_syntax: UID) -> None:
    """Write ``ds`` (native Explicit VR Little Endian pixel data) in ``transfer_syntax``.

    Raises
    ------
    ValueError
        If ``transfer_syntax`` is not in :data:`SUPPORTED_TRANSFER_SYNTAXES`.
    """
    if transfer_syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        supported = ", ".join(f"{uid} ({uid.name})" for uid in SUPPORTED_TRANSFER_SYNTAXES)
        raise ValueError(f'transfer syntax "{transfer_syntax}" is not supported; use one of {supported}')
    if transfer_syntax in COMPRESSED_TRANSFER_SYNTAXES:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    elif transfer_syntax == ExplicitVRBigEndian:
        dtype = ">i2" if ds.PixelRepresentation else ">u2"
        native = np.frombuffer(ds.PixelData, dtype=dtype.replace(">", "<"))
        ds.PixelData = native.astype(dtype).tobytes()
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(path, enforce_file_format=True)
