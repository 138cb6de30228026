"""Synthesise small DICOM CT series and RTSTRUCTs for tests (no PHI, deterministic pixel data)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    RTStructureSetStorage,
    generate_uid,
)
from sqlalchemy import update

from inference.structures import SegmentationSummary, StructureInfo
from pacs_agent.db.tables import Instance
from pacs_agent.receive.header import InstanceHeader


@dataclass
class Series:
    """What ``write_ct_series`` wrote: files in slice order and the expected HU volume."""

    paths: list[Path]
    datasets: list[pydicom.Dataset]
    hu: np.ndarray  # (z, y, x) in geometric order along the slice normal
    study_uid: str
    series_uid: str
    for_uid: str
    origin: tuple[float, float, float]
    spacing_xyz: tuple[float, float, float]
    direction: np.ndarray  # columns: row dir, column dir, normal


def _file_meta(sop_class: str, sop_uid: str, syntax: str = ExplicitVRLittleEndian) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def default_pixels(k: int, rows: int, cols: int) -> np.ndarray:
    """Stored values that differ per slice, row and column (so misordering shows)."""
    j, i = np.mgrid[0:rows, 0:cols]
    return ((k * 97 + j * cols + i) % 3000 + 10).astype(np.uint16)


def write_ct_series(
    directory: Path,
    *,
    n_slices: int = 5,
    rows: int = 16,
    cols: int = 12,
    pixel_spacing: tuple[float, float] = (0.8, 0.7),  # (row spacing, column spacing) as in DICOM
    slice_spacing: float = 2.5,
    origin: Sequence[float] = (-10.0, -20.0, 30.0),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    positions: Sequence[Sequence[float]] | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    instance_numbers: Sequence[int] | None = None,
    modality: str = "CT",
    series_uids: Sequence[str] | None = None,
    study_uid: str | None = None,
    for_uid: str | None = None,
    pixels: Callable[[int, int, int], np.ndarray] = default_pixels,
    orientations: Sequence[Sequence[float]] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    drop: Sequence[str] = (),
) -> Series:
    """Write ``n_slices`` single-frame CT instances; slice k sits at origin + k * spacing * normal.

    ``positions`` / ``orientations`` / ``series_uids`` override per slice; ``drop`` deletes
    attributes (e.g. ``PixelData``) from every instance.
    """
    directory.mkdir(parents=True, exist_ok=True)
    row_dir = np.asarray(orientation[:3], float)
    col_dir = np.asarray(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    if positions is None:
        positions = [np.asarray(origin, float) + k * slice_spacing * normal for k in range(n_slices)]
    n_slices = len(positions)
    study_uid = study_uid or generate_uid()
    for_uid = for_uid or generate_uid()
    default_series = generate_uid()
    paths, datasets, hu = [], [], []
    for k, pos in enumerate(positions):
        sop_uid = generate_uid()
        ds = pydicom.Dataset()
        ds.file_meta = _file_meta(CTImageStorage, sop_uid)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uids[k] if series_uids else default_series
        ds.FrameOfReferenceUID = for_uid
        ds.Modality = modality
        ds.PatientName = "Phantom^Synthetic"
        ds.PatientID = "PHANTOM"
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber = 1
        ds.InstanceNumber = instance_numbers[k] if instance_numbers else k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ori = orientations[k] if orientations else orientation
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in ori]
        ds.PixelSpacing = [f"{v}" for v in pixel_spacing]
        ds.SliceThickness = f"{slice_spacing}"
        ds.RescaleSlope = f"{slope}"
        ds.RescaleIntercept = f"{intercept}"
        ds.RescaleType = "HU"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        stored = pixels(k, rows, cols)
        ds.PixelData = stored.astype(np.uint16).tobytes()
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax)
        for keyword in drop:
            delattr(ds, keyword)
        path = directory / f"ct_{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        datasets.append(ds)
        hu.append(stored.astype(np.float32) * slope + intercept)
    return Series(
        paths=paths,
        datasets=datasets,
        hu=np.stack(hu),
        study_uid=study_uid,
        series_uid=default_series,
        for_uid=for_uid,
        origin=tuple(float(v) for v in positions[0]),  # type: ignore[arg-type]
        spacing_xyz=(pixel_spacing[1], pixel_spacing[0], slice_spacing),
        direction=np.column_stack([row_dir, col_dir, normal]),
    )


def write_rtstruct(
    path: Path,
    series: Series,
    rois: Mapping[str, Sequence[np.ndarray]],
    *,
    geometric_type: str = "CLOSED_PLANAR",
    for_uid: str | None = None,
    referenced_series_uid: str | None = None,
) -> Path:
    """Write an RTSTRUCT with one ROI per name; each contour is an (n, 3) array of mm points."""
    sop_uid = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = _file_meta(RTStructureSetStorage, sop_uid)
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = series.study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    ds.PatientName = "Phantom^Synthetic"
    ds.PatientID = "PHANTOM"
    ds.SeriesNumber = 2
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "test"
    for_uid = for_uid or series.for_uid
    ref_series = pydicom.Dataset()
    ref_series.SeriesInstanceUID = referenced_series_uid or series.series_uid
    ref_series.ContourImageSequence = []
    for ct in series.datasets:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = ct.SOPInstanceUID
        ref_series.ContourImageSequence.append(item)
    ref_study = pydicom.Dataset()
    ref_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref_study.ReferencedSOPInstanceUID = series.study_uid
    ref_study.RTReferencedSeriesSequence = [ref_series]
    ref_for = pydicom.Dataset()
    ref_for.FrameOfReferenceUID = for_uid
    ref_for.RTReferencedStudySequence = [ref_study]
    ds.ReferencedFrameOfReferenceSequence = [ref_for]
    ds.StructureSetROISequence = []
    ds.ROIContourSequence = []
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = pydicom.Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = for_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "MANUAL"
        ds.StructureSetROISequence.append(roi)
        rc = pydicom.Dataset()
        rc.ReferencedROINumber = number
        rc.ROIDisplayColor = [255, 0, 0]
        rc.ContourSequence = []
        for points in contours:
            c = pydicom.Dataset()
            c.ContourGeometricType = geometric_type
            pts = np.asarray(points, float).reshape(-1, 3)
            c.NumberOfContourPoints = len(pts)
            c.ContourData = [f"{v:.4f}" for v in pts.ravel()]
            rc.ContourSequence.append(c)
        ds.ROIContourSequence.append(rc)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_seg(
    series: Series,
    masks: Mapping[str, np.ndarray],
    *,
    fractional: bool = False,
    labelmap: bool = False,
) -> pydicom.Dataset:
    """A highdicom SEG over ``series``; ``masks`` maps a segment label to a (z, y, x) array.

    The array index z is the geometric slice order of ``series`` (as in ``series.hu``).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    descriptions = []
    for number, label in enumerate(masks, start=1):
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label,
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Neoplasm,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
        )
    stack = np.stack([np.asarray(m, dtype=np.float32 if fractional else bool) for m in masks.values()], axis=-1)
    kind = hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else hd.seg.SegmentationTypeValues.BINARY
    if labelmap:  # non-overlapping segments as one label image
        kind = hd.seg.SegmentationTypeValues.LABELMAP
        stack = np.zeros(stack.shape[:-1], np.uint8)
        for number, m in enumerate(masks.values(), start=1):
            stack[np.asarray(m, bool)] = number
    return hd.seg.Segmentation(
        source_images=series.datasets,
        pixel_array=stack,
        segmentation_type=kind,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=3,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="pacs-agent tests",
        manufacturer_model_name="dicom_factory",
        software_versions="0",
        device_serial_number="0",
        omit_empty_frames=False,
    )


GTV_STRUCTURE = StructureInfo(1, "GTV", "rtstruct", interpreted_type="GTV")


def record_summary(
    executor: Any, header: InstanceHeader, structures: tuple[StructureInfo, ...] = (GTV_STRUCTURE,)
) -> None:
    """Store, as the scheduler would after reading the file, what the recorded segmentation ``header`` holds.

    For scheduling tests whose instances have no file in a spool: by default one tumour structure
    (a GTV) without plane geometry, so readiness matches it to its CT by the series it references.
    """
    kind = "rtstruct" if header.sop_class_uid == RTStructureSetStorage else "seg"
    summary = SegmentationSummary(
        sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid,
        kind=kind,
        frame_of_reference_uids=tuple(u for u in (header.frame_of_reference_uid,) if u),
        referenced_series_uids=header.referenced_series_uids,
        referenced_instance_uids=header.referenced_instance_uids,
        structures=structures,
    )
    executor.execute(
        update(Instance)
        .where(Instance.sop_instance_uid == header.sop_instance_uid)
        .values(segmentation_summary=summary.to_json())
    )
