"""The structures of a phantom study (its lesions, optionally organs) as DICOM SEG (highdicom) and RTSTRUCT."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    RTStructureSetStorage,
    generate_uid,
)
from skimage import measure

from inference.phantom.anatomy import PhantomGeometry
from inference.phantom.ct import MANUFACTURER, MODEL_NAME, SOFTWARE_VERSION, SeriesInfo, add_patient_and_study
from inference.phantom.structures import ROI_NAME, SEG_LABEL, StructureMask, lesion_structures

__all__ = [
    "ROI_NAME",
    "SEG_LABEL",
    "lesion_contours",
    "write_rtstruct",
    "write_rtstruct_structures",
    "write_seg",
    "write_seg_structures",
]

ALGORITHM_NAME = "pacs-agent phantom ground truth"
# Study Component Management SOP Class: the conventional ReferencedSOPClassUID of an RT referenced study.
_STUDY_COMPONENT_MANAGEMENT = "1.2.840.10008.3.1.2.3.2"


def write_seg(
    path: Path,
    ct_datasets: Sequence[Dataset],
    label_volume: np.ndarray,
    *,
    per_lesion: bool,
    series_instance_uid: str,
    sop_instance_uid: str,
) -> None:
    """Write a BINARY DICOM SEG of the lesions.

    Parameters
    ----------
    path : Path
        Output file.
    ct_datasets : sequence of Dataset
        The CT instances, in the order of the first axis of ``label_volume``.
    label_volume : numpy.ndarray
        ``(len(ct_datasets), rows, columns)`` array: 0 background, ``i`` lesion ``i`` (1-based).
    per_lesion : bool
        One segment per lesion ("Liver lesion i") instead of one segment "Liver lesions" for all.
    series_instance_uid, sop_instance_uid : str
        UIDs of the new series and instance.

    Raises
    ------
    ValueError
        If ``label_volume`` holds no lesion.
    """
    write_seg_structures(
        path,
        ct_datasets,
        lesion_structures(label_volume, "seg", per_lesion=per_lesion),
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
    )


def write_seg_structures(
    path: Path,
    ct_datasets: Sequence[Dataset],
    structures: Sequence[StructureMask],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
) -> None:
    """Write a BINARY DICOM SEG with one segment per structure, numbered from 1 in order.

    Segments may overlap (an organ and the lesions inside it); each is stored in frames of its own.

    Parameters
    ----------
    path : Path
        Output file.
    ct_datasets : sequence of Dataset
        The CT instances, in the order of the first axis of the structure masks.
    structures : sequence of StructureMask
        The segments, each with a Segmented Property Category and Type.
    series_instance_uid, sop_instance_uid : str
        UIDs of the new series and instance.

    Raises
    ------
    ValueError
        If there is no structure, or a structure has no category or property type.
    """
    if not structures:
        raise ValueError("a SEG needs at least one structure")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence, version=SOFTWARE_VERSION
    )
    descriptions = []
    for number, structure in enumerate(structures, start=1):
        if structure.category is None or structure.property_type is None:
            raise ValueError(f'structure "{structure.name}" has no segmented property category and type')
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=structure.name,
                segmented_property_category=Code(*structure.category),
                segmented_property_type=Code(*structure.property_type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_id=structure.name,
                tracking_uid=generate_uid(entropy_srcs=[sop_instance_uid, "tracking", str(number)]),
                anatomic_regions=[Code(*structure.anatomic_region)] if structure.anatomic_region else None,
            )
        )
    masks = [structure.mask for structure in structures]
    if np.any(np.sum(masks, axis=0, dtype=np.uint16) > 1):
        pixels = np.stack(masks, axis=-1).astype(np.uint8)  # one channel per segment
    else:
        pixels = np.zeros(masks[0].shape, dtype=np.uint8)  # a label map: segment numbers
        for number, mask in enumerate(masks, start=1):
            pixels[mask] = number
    ct = ct_datasets[0]
    seg = hd.seg.Segmentation(
        source_images=list(ct_datasets),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid,
        series_number=100,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=SOFTWARE_VERSION,
        device_serial_number="0",
        content_description=(
            "Ground truth lesions of a synthetic phantom"
            if all(structure.role == "tumour" for structure in structures)
            else "Ground truth lesions and organs of a synthetic phantom"
        ),
        content_label="LESIONS",
        series_description="LIVER LESIONS SEG",
        content_date=ct.StudyDate,
        content_time=ct.StudyTime,
        series_date=ct.StudyDate,
        series_time=ct.StudyTime,
    )
    _make_deterministic(seg, ct.StudyDate, ct.StudyTime)
    seg.save_as(path)


def _make_deterministic(ds: Dataset, date: str, time: str) -> None:
    """Replace the clock times and random UIDs highdicom puts in every instance by derived values.

    highdicom stamps InstanceCreationDate/Time and ContributionDateTime with the current time and draws
    a random DimensionOrganizationUID, so two runs would otherwise differ.
    """
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = date + time
    organisation = generate_uid(entropy_srcs=[ds.SOPInstanceUID, "dimension-organization"])
    for item in [*ds.get("DimensionOrganizationSequence", []), *ds.get("DimensionIndexSequence", [])]:
        item.DimensionOrganizationUID = organisation


def lesion_contours(mask2d: np.ndarray, geometry: PhantomGeometry, k: int) -> list[np.ndarray]:
    """Closed planar contours (``(n, 3)`` arrays, mm) of a 2D mask on slice ``k``.

    The contours follow the 0.5 iso-line between inside and outside pixel centres, so rasterising them by
    pixel-centre inclusion gives back ``mask2d``.
    """
    padded = np.pad(mask2d.astype(np.float32), 1)
    z = geometry.slice_z(k)
    x0, y0, _ = geometry.origin_mm
    out: list[np.ndarray] = []
    for contour in measure.find_contours(padded, 0.5):
        contour = measure.approximate_polygon(contour[:-1], tolerance=0.0)
        if len(contour) > 1 and np.allclose(contour[0], contour[-1]):
            contour = contour[:-1]
        if len(contour) < 3:
            continue
        rows, cols = contour[:, 0] - 1.0, contour[:, 1] - 1.0
        out.append(
            np.column_stack(
                [x0 + cols * geometry.pixel_spacing_mm, y0 + rows * geometry.pixel_spacing_mm, np.full(len(rows), z)]
            )
        )
    return out


def write_rtstruct(
    path: Path,
    info: SeriesInfo,
    geometry: PhantomGeometry,
    ct_datasets: Sequence[Dataset],
    slice_index: Sequence[int],
    label_volume: np.ndarray,
    *,
    per_lesion: bool,
    series_instance_uid: str,
    sop_instance_uid: str,
) -> None:
    """Write an RT Structure Set with CLOSED_PLANAR contours of the lesions (GTV ROIs).

    Parameters
    ----------
    path : Path
        Output file.
    info : SeriesInfo
        Patient and study attributes.
    geometry : PhantomGeometry
        The CT grid.
    ct_datasets : sequence of Dataset
        The CT instances; ``slice_index[i]`` is the slice index ``k`` of ``ct_datasets[i]``.
    slice_index : sequence of int
        Slice index of each CT instance.
    label_volume : numpy.ndarray
        ``(len(ct_datasets), rows, columns)`` array: 0 background, ``i`` lesion ``i`` (1-based).
    per_lesion : bool
        One ROI per lesion ("GTV_Lesion_i") instead of one ROI "GTV_Liver_Lesions".
    series_instance_uid, sop_instance_uid : str
        UIDs of the new series and instance.

    Raises
    ------
    ValueError
        If ``label_volume`` holds no lesion.
    """
    write_rtstruct_structures(
        path,
        info,
        geometry,
        ct_datasets,
        slice_index,
        lesion_structures(label_volume, "rtstruct", per_lesion=per_lesion),
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
    )


def write_rtstruct_structures(
    path: Path,
    info: SeriesInfo,
    geometry: PhantomGeometry,
    ct_datasets: Sequence[Dataset],
    slice_index: Sequence[int],
    structures: Sequence[StructureMask],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
) -> None:
    """Write an RT Structure Set with one ROI per structure (ROI number = position + 1) and its RT ROI Observation.

    Each part of a structure is contoured on its own (CLOSED_PLANAR, holes as separate contours); rasterising
    the contours of a slice by pixel-centre inclusion and the even-odd rule gives back the structure's mask.

    Parameters
    ----------
    path : Path
        Output file.
    info : SeriesInfo
        Patient and study attributes.
    geometry : PhantomGeometry
        The CT grid.
    ct_datasets : sequence of Dataset
        The CT instances; ``slice_index[i]`` is the slice index ``k`` of ``ct_datasets[i]``.
    slice_index : sequence of int
        Slice index of each CT instance.
    structures : sequence of StructureMask
        The ROIs, masks indexed like ``ct_datasets``.
    series_instance_uid, sop_instance_uid : str
        UIDs of the new series and instance.

    Raises
    ------
    ValueError
        If there is no structure.
    """
    if not structures:
        raise ValueError("an RT Structure Set needs at least one structure")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = sop_instance_uid
    add_patient_and_study(ds, info)
    date, time = info.study_date.strftime("%Y%m%d"), info.study_time.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = 200
    ds.SeriesDescription = "LIVER LESIONS RTSTRUCT"
    ds.OperatorsName = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.FrameOfReferenceUID = info.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "LESIONS"
    ds.StructureSetName = "PHANTOM GROUND TRUTH"
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.ApprovalStatus = "UNAPPROVED"

    def image_ref(ct: Dataset) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID = ct.SOPClassUID
        item.ReferencedSOPInstanceUID = ct.SOPInstanceUID
        return item

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = ct_datasets[0].SeriesInstanceUID
    series_ref.ContourImageSequence = DicomSequence([image_ref(ct) for ct in ct_datasets])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = _STUDY_COMPONENT_MANAGEMENT
    study_ref.ReferencedSOPInstanceUID = info.study_instance_uid
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = info.frame_of_reference_uid
    frame_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_ref])

    roi_items, contour_items, observation_items = [], [], []
    for number, structure in enumerate(structures, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = info.frame_of_reference_uid
        roi.ROIName = structure.name
        roi.ROIDescription = structure.description
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi_items.append(roi)

        contours: list[Dataset] = []
        for part in structure.parts:
            for i, ct in enumerate(ct_datasets):
                mask2d = part[i]
                if not mask2d.any():
                    continue
                for points in lesion_contours(mask2d, geometry, slice_index[i]):
                    item = Dataset()
                    item.ContourImageSequence = DicomSequence([image_ref(ct)])
                    item.ContourGeometricType = "CLOSED_PLANAR"
                    item.NumberOfContourPoints = len(points)
                    item.ContourNumber = len(contours) + 1
                    item.ContourData = [float(f"{v:.4f}") for v in points.ravel()]
                    contours.append(item)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = list(structure.colour)
        roi_contour.ContourSequence = DicomSequence(contours)
        contour_items.append(roi_contour)

        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = structure.interpreted_type
        observation.ROIInterpreter = ""
        observation_items.append(observation)
    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.ROIContourSequence = DicomSequence(contour_items)
    ds.RTROIObservationsSequence = DicomSequence(observation_items)
    ds.save_as(path, enforce_file_format=True)
