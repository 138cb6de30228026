"""Load one CT series into a geometry-exact HU volume.

Slices are sorted along the slice normal (row x column direction cosines) by their Image Position
(Patient), never by Instance Number. Every check that fails raises a :class:`VolumeError` whose
message an imaging IT person can act on; messages name series by UID, never the patient.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from inference.errors import InputError
from inference.vectors import vector3

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"

ORIENTATION_TOLERANCE = 1e-4
"""Largest difference between direction cosines of two slices still called the same orientation."""
DUPLICATE_TOLERANCE_MM = 1e-3
GAP_FACTOR = 1.5
"""A step between neighbouring slices larger than this times the median step is a missing slice."""
SPACING_RTOL = 0.02
SPACING_ATOL_MM = 0.01
SHEAR_TOLERANCE_MM = 0.01
SHEAR_TOLERANCE_RATIO = 1e-3
"""In-plane drift of the slice positions allowed per mm of stack height (rounded cosines)."""
MIN_SLICES = 3


class VolumeError(InputError):
    """A CT series cannot be turned into a volume (geometry, modality, pixel data)."""


@dataclass(frozen=True, eq=False)
class CTVolume:
    """One CT series as a HU volume with its exact geometry.

    ``image`` and ``array`` share the same buffer: ``array`` is a read-only (z, y, x) view of
    ``image``. Index ``k`` of ``sop_instance_uids`` / ``positions_mm`` is slice ``array[k]``.
    ``headers`` are the headers (no pixel data) of the instances the volume was built from, in
    the order the files were given: what a result's evidence and copied attributes need, so
    nothing reads the files again (empty for a volume made without DICOM).
    """

    image: sitk.Image
    array: np.ndarray
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]
    positions_mm: tuple[tuple[float, float, float], ...]
    headers: tuple[pydicom.Dataset, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (z, y, x)."""
        z, y, x = self.array.shape
        return int(z), int(y), int(x)

    @property
    def spacing_xyz(self) -> tuple[float, float, float]:
        """Voxel spacing (x, y, z) in mm, SimpleITK order."""
        sx, sy, sz = self.image.GetSpacing()
        return float(sx), float(sy), float(sz)

    @property
    def direction(self) -> np.ndarray:
        """3x3 direction matrix; columns are the x, y, z axes in patient coordinates."""
        return np.asarray(self.image.GetDirection(), dtype=float).reshape(3, 3)

    @property
    def origin(self) -> np.ndarray:
        """Patient position (mm) of voxel (0, 0, 0)."""
        return np.asarray(self.image.GetOrigin(), dtype=float)

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm3."""
        return float(np.prod(self.spacing_xyz))

    def index_to_mm(self, xyz_index: np.ndarray) -> np.ndarray:
        """Map continuous (x, y, z) voxel indices, shape (n, 3), to patient coordinates (mm)."""
        idx = np.asarray(xyz_index, dtype=float).reshape(-1, 3)
        return self.origin + (idx * np.asarray(self.spacing_xyz)) @ self.direction.T

    def mm_to_index(self, points_mm: np.ndarray) -> np.ndarray:
        """Map patient coordinates (mm), shape (n, 3), to continuous (x, y, z) voxel indices."""
        pts = np.asarray(points_mm, dtype=float).reshape(-1, 3)
        return ((pts - self.origin) @ np.linalg.inv(self.direction).T) / np.asarray(self.spacing_xyz)


class _ImageBuffer:
    """Exposes a SimpleITK image's buffer to numpy and keeps the image alive while a view exists.

    ``sitk.GetArrayViewFromImage`` alone does not hold a reference to the image: a view of a
    temporary image (``load_ct_series(p).array``) would point at freed memory.
    """

    def __init__(self, image: sitk.Image, *, writable: bool = False) -> None:
        self.image = image
        interface = dict(sitk.GetArrayViewFromImage(image).__array_interface__)
        data, _ = interface["data"]
        interface["data"] = (data, not writable)  # (address, read-only flag)
        self.__array_interface__ = interface


def array_view(image: sitk.Image) -> np.ndarray:
    """Read-only (z, y, x) numpy view of ``image`` that keeps ``image`` alive.

    Parameters
    ----------
    image
        A SimpleITK image; do not change its pixels while views exist.

    Returns
    -------
    numpy.ndarray
        Shares memory with ``image``; ``view.base`` holds a reference to it.
    """
    return np.asarray(_ImageBuffer(image))


def volume_from_image(
    image: sitk.Image,
    *,
    study_instance_uid: str = "",
    series_instance_uid: str = "",
    frame_of_reference_uid: str = "",
    sop_instance_uids: Sequence[str] | None = None,
) -> CTVolume:
    """Wrap a 3D SimpleITK image (HU) as a :class:`CTVolume` without any DICOM.

    For phantoms, NRRD/NIfTI test data and resampled volumes. Slice positions are derived from the
    image geometry; ``sop_instance_uids`` default to empty strings.

    Parameters
    ----------
    image
        3D scalar image in HU; it is cast to float32 when it is not float32 or int16.
    study_instance_uid, series_instance_uid, frame_of_reference_uid
        Identifiers to carry along.
    sop_instance_uids
        One UID per slice (z index), or None.

    Returns
    -------
    CTVolume
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("volume_from_image needs a 3D scalar image")
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkInt16):
        image = sitk.Cast(image, sitk.sitkFloat32)
    nz = image.GetSize()[2]
    uids = tuple(sop_instance_uids) if sop_instance_uids is not None else ("",) * nz
    if len(uids) != nz:
        raise ValueError(f"{len(uids)} SOP Instance UIDs for {nz} slices")
    positions = tuple(vector3(image.TransformIndexToPhysicalPoint((0, 0, k))) for k in range(nz))
    return CTVolume(
        image=image,
        array=array_view(image),
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        sop_instance_uids=uids,
        positions_mm=positions,
    )


@dataclass(frozen=True)
class _Slice:
    """One 2D frame with its geometry, from a single-frame instance or an enhanced CT frame."""

    sop_instance_uid: str
    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    size: tuple[int, int]
    slope: float
    intercept: float
    frame: int | None  # None: single-frame instance; else 0-based frame index
    dataset: pydicom.Dataset


PHASE_KEYWORDS = ("TemporalPositionIndex", "AcquisitionNumber", "ContentTime")
"""Attributes that tell the phases of a multi-phase series apart, tried in this order."""
SINGLE_PHASE = "single"
"""Key of the only group :func:`split_phases` returns for a series without repeated positions."""


def split_phases(paths: Sequence[Path]) -> dict[str, list[Path]]:
    """Split the files of a series whose slice positions repeat into one group per phase.

    A multi-phase series (e.g. arterial and portal-venous acquisitions stored in one series)
    holds every slice position more than once; the copies differ in Temporal Position Index,
    Acquisition Number or Content Time. The first of these attributes (in that order) that gives
    every position at most once per group, with as many groups as the most repeated position
    has copies, defines the phases.

    Parameters
    ----------
    paths
        Single-frame CT files of one series, in any order (headers only are read).

    Returns
    -------
    dict of str to list of Path
        Keys like ``"AcquisitionNumber=2"``, in ascending order of the value; each list keeps
        the order of ``paths``. One group ``{SINGLE_PHASE: paths}`` when no position repeats, or
        when nothing tells the copies apart (:func:`load_ct_series` then reports the duplicates).

    Raises
    ------
    VolumeError
        A file is not readable as DICOM.
    """
    paths = [Path(p) for p in paths]
    datasets = [_read(p, headers_only=True) for p in paths]
    return {key: [paths[i] for i in members] for key, members in _phase_groups(datasets).items()}


def _phase_groups(datasets: Sequence[pydicom.Dataset]) -> dict[str, list[int]]:
    """Indices of ``datasets`` per phase (see :func:`split_phases`)."""
    everything = {SINGLE_PHASE: list(range(len(datasets)))}
    positions = []
    for ds in datasets:
        if "PerFrameFunctionalGroupsSequence" in ds or "ImagePositionPatient" not in ds:
            return everything  # enhanced CT or missing geometry: the loader reports what is wrong
        try:
            iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=float)
            ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=float)
        except (AttributeError, TypeError, ValueError):
            return everything
        if iop.size != 6 or ipp.size != 3:
            return everything
        positions.append(float(ipp @ np.cross(iop[:3], iop[3:])))
    if not positions:
        return everything
    slots = np.round(np.asarray(positions) / DUPLICATE_TOLERANCE_MM).astype(np.int64)
    _, copies = np.unique(slots, return_counts=True)
    most = int(copies.max())
    if most == 1:
        return everything
    for keyword in PHASE_KEYWORDS:
        values = [str(ds.get(keyword, "") or "").strip() for ds in datasets]
        if "" in values:
            continue
        groups: dict[str, list[int]] = {}
        for i, value in enumerate(values):
            groups.setdefault(value, []).append(i)
        if len(groups) != most:
            continue
        if all(len({int(slots[i]) for i in members}) == len(members) for members in groups.values()):
            return {f"{keyword}={value}": groups[value] for value in sorted(groups, key=_phase_sort_key)}
    return everything


def _phase_sort_key(value: str) -> tuple[int, float, str]:
    try:
        return 0, float(value), value
    except ValueError:
        return 1, 0.0, value


PhaseChooser = Callable[[Mapping[str, Sequence[pydicom.Dataset]]], str]
"""Picks one phase of a multi-phase series from its headers grouped per phase (key -> datasets)."""


def load_ct_series(
    paths: Sequence[Path], *, phase: str | None = None, choose_phase: PhaseChooser | None = None
) -> CTVolume:
    """Load the files of one CT series as a HU volume.

    Parameters
    ----------
    paths
        Files of one series, in any order: single-frame CT Image Storage instances, or Enhanced
        CT Image Storage instance(s) whose frames form one stack.
    phase
        For a multi-phase series, the key of the phase to load (a key of :func:`split_phases`,
        e.g. ``"AcquisitionNumber=2"``); None for a single-phase series.
    choose_phase
        Used when ``phase`` is None and the series has several phases: called once with the
        headers grouped per phase, returns the key to load (each file is read only once).

    Returns
    -------
    CTVolume
        HU as float32, sorted along the slice normal, with exact origin, spacing and direction.
        For an enhanced CT, ``sop_instance_uids`` repeats the instance UID for every frame.

    Raises
    ------
    VolumeError
        Not DICOM, not CT, mixed series / frame of reference / orientation / matrix size, missing
        pixel data or geometry, fewer than 3 slices, several phases and no (or an unknown)
        ``phase``, duplicate positions, missing slices (gap > 1.5 x median spacing), non-uniform
        spacing, sheared stack (gantry tilt).
    """
    if not paths:
        raise VolumeError("no files given for the CT series")
    datasets = [_read(Path(p)) for p in paths]
    series_uid = _one_value(datasets, "SeriesInstanceUID", "Series Instance UID")
    where = f"series {series_uid}"
    phases = _phase_groups(datasets)
    if phase is None and len(phases) > 1 and choose_phase is not None:
        phase = choose_phase({key: [datasets[i] for i in members] for key, members in phases.items()})
    if phase is None and len(phases) > 1:
        raise VolumeError(
            f"{where} holds {len(phases)} phases ({', '.join(phases)}): the same slice positions were "
            "acquired more than once; choose one phase (e.g. the portal-venous one) or send the phases "
            "as separate series"
        )
    if phase is not None:
        if phase not in phases:
            raise VolumeError(f"{where} has no phase {phase!r}; its phases are: {', '.join(phases)}")
        datasets = [datasets[i] for i in phases[phase]]
    for ds in datasets:
        modality = str(ds.get("Modality", ""))
        if modality != "CT":
            raise VolumeError(
                f"{where}: modality is {modality or 'missing'}, not CT (SOP Instance {ds.get('SOPInstanceUID')})"
            )
        if "PixelData" not in ds:
            raise VolumeError(f"{where}: SOP Instance {ds.get('SOPInstanceUID')} has no pixel data")
    study_uid = _one_value(datasets, "StudyInstanceUID", "Study Instance UID")
    for_uid = _one_value(datasets, "FrameOfReferenceUID", "Frame of Reference UID")
    headers = tuple(header_of(ds) for ds in datasets)
    slices = [s for ds in datasets for s in _slices(ds, where)]
    volume = _stack(slices, where, study_uid=study_uid, series_uid=series_uid, for_uid=for_uid)
    return replace(volume, headers=headers)


def header_of(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` up to its pixel data, as ``dcmread(..., stop_before_pixels=True)`` would return it.

    The element objects are shared, not copied (cheap; the loader clears each file's dataset once
    its pixels are in the volume, which does not touch this copy). A file's dataset stays a
    ``FileDataset`` with its file meta, from which deferred values are read.
    """
    elements = {tag: element for tag, element in ds.items() if tag < _PIXEL_DATA}
    implicit, little = ds.original_encoding
    if isinstance(ds, pydicom.FileDataset):
        header: pydicom.Dataset = pydicom.FileDataset(
            ds.filename or "", elements, ds.preamble, ds.file_meta, implicit is not False, little is not False
        )
    else:
        header = pydicom.Dataset(elements)
    header.set_original_encoding(implicit, little, ds.original_character_set)
    return header


_PIXEL_DATA = pydicom.tag.Tag(0x7FE0, 0x0010)


def _read(path: Path, *, headers_only: bool = False) -> pydicom.Dataset:
    try:
        # Pixel data (and other large values) are read from the file only when decoded.
        return pydicom.dcmread(path, stop_before_pixels=headers_only, defer_size=None if headers_only else "64 KB")
    except (InvalidDicomError, EOFError, OSError) as exc:
        raise VolumeError(f"cannot read {path.name} as a DICOM file: {exc}") from exc


def _one_value(datasets: Sequence[pydicom.Dataset], keyword: str, what: str) -> str:
    values = {str(ds.get(keyword, "")) for ds in datasets}
    if len(values) > 1:
        shown = ", ".join(sorted(values)[:3])
        raise VolumeError(f"the files belong to {len(values)} different {what}s ({shown}); send one series")
    return values.pop()


@overload
def _floats(values: Any, n: Literal[2], what: str, where: str) -> tuple[float, float]: ...
@overload
def _floats(values: Any, n: Literal[3], what: str, where: str) -> tuple[float, float, float]: ...
@overload
def _floats(values: Any, n: int, what: str, where: str) -> tuple[float, ...]: ...
def _floats(values: Any, n: int, what: str, where: str) -> tuple[float, ...]:
    """``n`` numbers from a header value as read (any VR, maybe not a sequence), or a VolumeError."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{where}: {what} is not numeric") from exc
    if len(out) != n:
        raise VolumeError(f"{where}: {what} must have {n} values, has {len(out)}")
    return out


def _slices(ds: pydicom.Dataset, where: str) -> list[_Slice]:
    uid = str(ds.get("SOPInstanceUID", ""))
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
        if missing:
            raise VolumeError(f"{where}: SOP Instance {uid} lacks {', '.join(missing)}")
        if n_frames != 1:
            raise VolumeError(f"{where}: SOP Instance {uid} has {n_frames} frames but no per-frame geometry")
        return [
            _Slice(
                sop_instance_uid=uid,
                position=_floats(ds.ImagePositionPatient, 3, "Image Position (Patient)", where),
                orientation=_floats(ds.ImageOrientationPatient, 6, "Image Orientation (Patient)", where),
                pixel_spacing=_floats(ds.PixelSpacing, 2, "Pixel Spacing", where),
                size=(int(ds.Rows), int(ds.Columns)),
                slope=float(ds.get("RescaleSlope", 1) or 1),
                intercept=float(ds.get("RescaleIntercept", 0) or 0),
                frame=None,
                dataset=ds,
            )
        ]
    # Enhanced CT: geometry and rescale live in shared or per-frame functional groups.
    shared = ds.get("SharedFunctionalGroupsSequence", [pydicom.Dataset()])[0]
    out = []
    for i, per_frame in enumerate(ds.PerFrameFunctionalGroupsSequence):

        def group(keyword: str, pf: pydicom.Dataset = per_frame) -> pydicom.Dataset | None:
            seq = pf.get(keyword) or shared.get(keyword)
            return seq[0] if seq else None

        pos, ori, meas = (
            group("PlanePositionSequence"),
            group("PlaneOrientationSequence"),
            group("PixelMeasuresSequence"),
        )
        if pos is None or ori is None or meas is None:
            raise VolumeError(f"{where}: frame {i + 1} of SOP Instance {uid} lacks plane position/orientation")
        rescale = group("PixelValueTransformationSequence") or pydicom.Dataset()
        out.append(
            _Slice(
                sop_instance_uid=uid,
                position=_floats(pos.ImagePositionPatient, 3, "Image Position (Patient)", where),
                orientation=_floats(ori.ImageOrientationPatient, 6, "Image Orientation (Patient)", where),
                pixel_spacing=_floats(meas.PixelSpacing, 2, "Pixel Spacing", where),
                size=(int(ds.Rows), int(ds.Columns)),
                slope=float(rescale.get("RescaleSlope", 1) or 1),
                intercept=float(rescale.get("RescaleIntercept", 0) or 0),
                frame=i,
                dataset=ds,
            )
        )
    return out


def _stack(slices: list[_Slice], where: str, *, study_uid: str, series_uid: str, for_uid: str) -> CTVolume:
    if len(slices) < MIN_SLICES:
        raise VolumeError(f"{where}: only {len(slices)} slice(s); at least {MIN_SLICES} are needed")
    sizes = {s.size for s in slices}
    if len(sizes) > 1:
        raise VolumeError(f"{where}: slices have different matrix sizes {sorted(sizes)}")
    spacings = {tuple(round(v, 6) for v in s.pixel_spacing) for s in slices}
    if len(spacings) > 1:
        raise VolumeError(f"{where}: slices have different pixel spacings {sorted(spacings)}")

    row_dir, col_dir = _orientation(slices, where)
    normal = np.cross(row_dir, col_dir)
    positions = np.array([s.position for s in slices], dtype=float)
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    positions, distance = positions[order], distance[order]
    slices = [slices[i] for i in order]
    step = _check_steps(distance, where)
    _check_shear(positions, normal, where)

    decoded: dict[int, np.ndarray] = {}  # id(dataset) -> all frames, so a multi-frame decodes once
    frames_left: dict[int, int] = {}
    for s in slices:
        frames_left[id(s.dataset)] = frames_left.get(id(s.dataset), 0) + 1
    # Fill the volume's own float32 buffer (a new SimpleITK image, shared with nobody) slice by
    # slice and let go of each file's pixels as soon as they are in it: a 600-slice CT is 630 MB,
    # and a stack of decoded slices or an int16 copy besides it would double that.
    rows, columns = slices[0].size
    image = sitk.Image([columns, rows, len(slices)], sitk.sitkFloat32)
    array = np.asarray(_ImageBuffer(image, writable=True))
    for k, s in enumerate(slices):
        array[k] = _hu(s, where, decoded)
        frames_left[id(s.dataset)] -= 1
        if not frames_left[id(s.dataset)]:
            decoded.pop(id(s.dataset), None)
            s.dataset.clear()  # geometry is in the _Slice; the dataset is not needed any more
    del array
    row_spacing, col_spacing = slices[0].pixel_spacing
    image.SetSpacing((col_spacing, row_spacing, step))
    image.SetOrigin(tuple(float(v) for v in positions[0]))
    image.SetDirection(tuple(np.column_stack([row_dir, col_dir, normal]).ravel().tolist()))
    logger.debug("loaded CT series %s: %d slices, step %.4f mm", series_uid, len(slices), step)
    return CTVolume(
        image=image,
        array=array_view(image),
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=for_uid,
        sop_instance_uids=tuple(s.sop_instance_uid for s in slices),
        positions_mm=tuple(vector3(p) for p in positions),
    )


def _orientation(slices: Sequence[_Slice], where: str) -> tuple[np.ndarray, np.ndarray]:
    iops = np.array([s.orientation for s in slices], dtype=float)
    if np.abs(iops - iops[0]).max() > ORIENTATION_TOLERANCE:
        distinct = {tuple(np.round(r, 3)) for r in iops}
        raise VolumeError(
            f"{where}: slices have {len(distinct)} different orientations (e.g. a localizer mixed into "
            "the series); send one stack of parallel slices"
        )
    row_dir, col_dir = iops[0, :3], iops[0, 3:]
    unit = all(abs(np.linalg.norm(v) - 1.0) < 0.01 for v in (row_dir, col_dir))
    if not unit or abs(row_dir @ col_dir) > 1e-3:
        raise VolumeError(f"{where}: Image Orientation (Patient) is not two orthogonal unit vectors")
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir - (col_dir @ row_dir) * row_dir
    return row_dir, col_dir / np.linalg.norm(col_dir)


def _check_steps(distance: np.ndarray, where: str) -> float:
    steps = np.diff(distance)
    dup = np.flatnonzero(steps < DUPLICATE_TOLERANCE_MM)
    if dup.size:
        raise VolumeError(
            f"{where}: two or more slices share the position {distance[dup[0]]:.3f} mm along the slice "
            f"normal ({dup.size} duplicate(s)); the series holds duplicate or repeated acquisitions"
        )
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > GAP_FACTOR * median)
    if gaps.size:
        g = gaps[0]
        raise VolumeError(
            f"{where}: missing slices: a gap of {steps[g]:.3f} mm between {distance[g]:.3f} and "
            f"{distance[g + 1]:.3f} mm along the slice normal (median spacing {median:.3f} mm); "
            f"{gaps.size} gap(s) in total"
        )
    deviation = float(np.abs(steps - median).max())
    if deviation > max(SPACING_RTOL * median, SPACING_ATOL_MM):
        raise VolumeError(
            f"{where}: slice spacing is not uniform (from {steps.min():.3f} to {steps.max():.3f} mm, "
            f"median {median:.3f} mm); reconstruct with a constant increment"
        )
    return round(float((distance[-1] - distance[0]) / (len(distance) - 1)), 6)


def _check_shear(positions: np.ndarray, normal: np.ndarray, where: str) -> None:
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    height = float(np.abs(offsets @ normal).max())
    if np.linalg.norm(in_plane, axis=1).max() > max(SHEAR_TOLERANCE_MM, SHEAR_TOLERANCE_RATIO * height):
        raise VolumeError(
            f"{where}: slice positions do not lie along the slice normal (gantry tilt or sheared "
            "stack); resample to an orthogonal grid before sending"
        )


def _hu(s: _Slice, where: str, decoded: dict[int, np.ndarray]) -> np.ndarray:
    try:
        if id(s.dataset) not in decoded:
            frames = s.dataset.pixel_array
            decoded[id(s.dataset)] = frames[np.newaxis] if frames.ndim == 2 else frames
        pixels = decoded[id(s.dataset)][0 if s.frame is None else s.frame]
    except Exception as exc:  # decoders raise many types (RuntimeError, ValueError, NotImplementedError)
        syntax = s.dataset.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(s.dataset, "file_meta") else "?"
        raise VolumeError(
            f"{where}: cannot decode the pixel data of SOP Instance {s.sop_instance_uid} "
            f"(transfer syntax {syntax}): {exc}"
        ) from exc
    if pixels.ndim != 2 or pixels.shape != s.size:
        raise VolumeError(f"{where}: SOP Instance {s.sop_instance_uid} is not a grey-scale image of the stated size")
    return (pixels.astype(np.float32) * np.float32(s.slope) + np.float32(s.intercept)).astype(np.float32)
