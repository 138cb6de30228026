"""Segmentations (DICOM SEG, RTSTRUCT) -> one boolean mask per segment / ROI on the CT grid.

Per-segment problems (empty, off the volume, open contours) do not fail the whole object: the
segment comes back as a :class:`LabelMask` whose ``problem`` says what is wrong and whose mask
is all False; callers skip it and report it. :func:`load_segmentation` raises only when the
object as a whole cannot be used (other series or frame of reference, unsupported type, grid
mismatch) or when every segment has a problem.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from skimage.draw import polygon as fill_polygon

from inference.errors import InputError
from inference.imaging.volume import CTVolume, split_phases
from inference.results import SegmentationKind, SegmentationSource
from inference.structures import StructureSelection, no_tumour_message, select_structures
from inference.structures import referenced_instance_uids as header_instance_uids
from inference.structures import referenced_series_uids as header_series_uids

logger = logging.getLogger(__name__)

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"

SLICE_TOLERANCE = 0.1
"""A SEG frame must lie within this fraction of a voxel of a CT slice / pixel grid."""
PLANAR_TOLERANCE = 0.1
"""The points of one RTSTRUCT contour may spread this fraction of the slice spacing off-plane."""


class SegmentationError(InputError):
    """A SEG / RTSTRUCT cannot be used with the CT volume it was paired with."""


class EmptySegmentationError(SegmentationError):
    """Every requested segment / ROI is merely empty on this CT (nothing drawn): e.g. every lesion gone."""


@dataclass(frozen=True, eq=False)
class LabelMask:
    """One segment (SEG) or ROI (RTSTRUCT) rasterised on the CT grid.

    ``mask`` is a bool (z, y, x) array with the shape of ``CTVolume.array``. When ``problem`` is
    set the segment could not be used (the message says why) and ``mask`` is all False; ``empty``
    says that the only problem is that nothing was drawn on this CT (no voxel, no closed contour),
    e.g. every lesion gone at follow-up, as opposed to a segment that is broken.
    """

    source: SegmentationSource
    mask: np.ndarray
    problem: str | None = None
    empty: bool = False

    @property
    def ok(self) -> bool:
        """True when the mask is usable."""
        return self.problem is None


def referenced_series_uids(ds: pydicom.Dataset) -> set[str]:
    """Series Instance UIDs a SEG or RTSTRUCT refers to, from its header only (empty when none)."""
    return set(header_series_uids(ds))


def referenced_instance_uids(ds: pydicom.Dataset) -> set[str]:
    """SOP Instance UIDs of the images a SEG or RTSTRUCT was drawn on, from its header."""
    return set(header_instance_uids(ds))


def segmentation_phase(ct_paths: Sequence[Path], segmentation: pydicom.Dataset) -> str | None:
    """The phase of a multi-phase CT series that ``segmentation`` was drawn on, or None.

    None when the series has a single phase. Otherwise the phase (a key of
    :func:`inference.imaging.volume.split_phases`) holding the most of the images the
    segmentation references.

    Raises
    ------
    SegmentationError
        The series has several phases and the segmentation references images of none of them.
    """
    phases = split_phases(ct_paths)
    if len(phases) <= 1:
        return None
    return phase_of_segmentation(
        {key: [pydicom.dcmread(p, stop_before_pixels=True) for p in paths] for key, paths in phases.items()},
        segmentation,
    )


def phase_of_segmentation(phases: Mapping[str, Sequence[pydicom.Dataset]], segmentation: pydicom.Dataset) -> str:
    """Of the phases of a series (key -> headers), the one holding most of the images ``segmentation`` references.

    A :data:`inference.imaging.volume.PhaseChooser` for ``load_ct_series(..., choose_phase=...)``.

    Raises
    ------
    SegmentationError
        The segmentation references images of none of the phases.
    """
    referenced = referenced_instance_uids(segmentation)
    overlap = {
        key: len(referenced & {str(ds.get("SOPInstanceUID", "")) for ds in datasets})
        for key, datasets in phases.items()
    }
    best = max(overlap, key=lambda key: overlap[key])
    if overlap[best] == 0:
        raise SegmentationError(
            f"the CT series holds {len(phases)} phases ({', '.join(phases)}) and the segmentation "
            "references images of none of them; send the phases as separate series"
        )
    return best


def load_segmentation(
    path: Path | pydicom.Dataset,
    volume: CTVolume,
    *,
    fractional_threshold: float = 0.5,
    numbers: Collection[int] | None = None,
) -> list[LabelMask]:
    """Rasterise the segments of a SEG, or the ROIs of an RTSTRUCT, on the grid of ``volume``.

    Parameters
    ----------
    path
        File of the SEG / RTSTRUCT (or the dataset itself).
    volume
        The CT the segmentation was drawn on.
    fractional_threshold
        FRACTIONAL SEG: a pixel belongs to the segment when value / Maximum Fractional Value
        >= this threshold. In (0, 1].
    numbers
        Only these segment / ROI numbers (e.g. the tumours chosen by
        :mod:`inference.structures`); None: all of them.

    Returns
    -------
    list[LabelMask]
        One per segment / ROI, ordered by segment / ROI number; check ``problem`` on each.

    Raises
    ------
    SegmentationError
        Not a SEG / RTSTRUCT; in another frame of reference (or, without one, refers to another
        series); SEG grid does not match the CT grid; none of the requested segments; every
        requested segment has a problem.
    """
    if not 0.0 < fractional_threshold <= 1.0:
        raise ValueError("fractional_threshold must be in (0, 1]")
    ds = path if isinstance(path, pydicom.Dataset) else read_segmentation(Path(path))
    sop_class = str(ds.get("SOPClassUID", ""))
    what = f"{ds.get('Modality', 'segmentation')} {ds.get('SOPInstanceUID')}"
    try:
        wanted = None if numbers is None else frozenset(int(n) for n in numbers)
        if sop_class in (SEG_STORAGE, LABEL_MAP_SEG_STORAGE):
            masks = _load_seg(ds, volume, fractional_threshold, wanted)
        elif sop_class == RTSTRUCT_STORAGE:
            masks = _load_rtstruct(ds, volume, wanted)
        else:
            raise SegmentationError(
                f"SOP Instance {ds.get('SOPInstanceUID')} is {ds.get('Modality', 'unknown modality')} "
                f"(SOP Class {sop_class}), not a DICOM SEG or RTSTRUCT"
            )
    except InputError:
        raise
    except (AttributeError, KeyError, IndexError, TypeError, ValueError, NotImplementedError) as exc:
        # highdicom / pydicom on a malformed object (missing module, truncated frames, wrong VR):
        # bad input, not a crash - the job fails at once with the reason instead of being retried.
        raise SegmentationError(
            f"{what} is malformed and cannot be decoded ({type(exc).__name__}: {exc}); "
            "export it again from the segmentation software"
        ) from exc
    if not masks:
        if numbers is not None:
            raise SegmentationError(f"{what} holds none of the segments {sorted(numbers)}")
        raise SegmentationError(f"{what} contains no segments")
    for m in masks:
        if m.problem:
            logger.warning("%s: %s", what, m.problem)
    if all(not m.ok for m in masks):
        error = EmptySegmentationError if all(m.empty for m in masks) else SegmentationError
        raise error(f"{what}: no usable segment: " + "; ".join(str(m.problem) for m in masks))
    return masks


def default_structures(ds: pydicom.Dataset) -> tuple[StructureSelection, str | None]:
    """Tumours and organs of ``ds`` by the default rules, and the reason when it holds no tumour.

    For callers without the node's routing (command-line tools, tests, research scripts).

    Raises
    ------
    SegmentationError
        The object's structures cannot be decoded.
    """
    try:
        selection, verdicts = select_structures(ds)
    except ValueError as exc:
        raise SegmentationError(f"segmentation {ds.get('SOPInstanceUID')}: {exc}") from exc
    return selection, None if selection.tumours else no_tumour_message(verdicts)


def read_segmentation(path: Path) -> pydicom.Dataset:
    """Read a SEG / RTSTRUCT file, or raise :class:`SegmentationError` saying why it cannot be read."""
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError) as exc:
        raise SegmentationError(f"cannot read {path.name} as a DICOM file: {exc}") from exc


def check_references(ds: pydicom.Dataset, volume: CTVolume, for_uids: set[str]) -> None:
    """Raise unless the segmentation can lie on the volume: same frame of reference.

    The frame of reference decides; a Series Instance UID that names another series (a
    re-exported or anonymised copy of the CT) is only logged, since the slice geometry decides
    where each contour / frame lands. Without any frame of reference the series must match.
    """
    what = f"{ds.get('Modality', 'segmentation')} {ds.get('SOPInstanceUID')}"
    for_uids = {u for u in for_uids if u}
    if for_uids and volume.frame_of_reference_uid not in for_uids:
        raise SegmentationError(
            f"{what} is in frame of reference {', '.join(sorted(for_uids))}, but CT series "
            f"{volume.series_instance_uid} is in {volume.frame_of_reference_uid}: it was not drawn on this CT"
        )
    series = referenced_series_uids(ds)
    if series and volume.series_instance_uid not in series:
        if not for_uids:
            raise SegmentationError(
                f"{what} refers to series {', '.join(sorted(series))}, not to CT series {volume.series_instance_uid}"
            )
        logger.warning(
            "%s refers to series %s, not to CT series %s; placed by its frame of reference and slice geometry",
            what,
            ", ".join(sorted(series)),
            volume.series_instance_uid,
        )


def make_source(ds: pydicom.Dataset, kind: SegmentationKind, number: int, label: str) -> SegmentationSource:
    """SegmentationSource for one segment / ROI of ``ds``."""
    return SegmentationSource(
        kind=kind,
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        number=number,
        label=label,
    )


def _load_seg(
    ds: pydicom.Dataset, volume: CTVolume, threshold: float, wanted: frozenset[int] | None
) -> list[LabelMask]:
    check_references(ds, volume, {str(ds.get("FrameOfReferenceUID", ""))})
    what = f"SEG {ds.SOPInstanceUID}"
    seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    seg_type = str(ds.SegmentationType)
    max_fraction = float(ds.get("MaximumFractionalValue", 1) or 1)
    shared = ds.get("SharedFunctionalGroupsSequence", [pydicom.Dataset()])[0]
    _check_seg_grid(shared, ds.PerFrameFunctionalGroupsSequence[0], volume, what)
    labels = {
        int(s.SegmentNumber): str(s.get("SegmentLabel", f"segment {s.SegmentNumber}"))
        for s in ds.SegmentSequence
        if int(s.SegmentNumber) > 0  # LABELMAP SEGs describe the background as segment 0
        and (wanted is None or int(s.SegmentNumber) in wanted)
    }
    if not labels:
        return []
    masks = {n: np.zeros(volume.shape, dtype=bool) for n in labels}
    problems: dict[int, str] = {}
    sop_index = {uid: k for k, uid in enumerate(volume.sop_instance_uids) if uid}
    nz, ny, nx = volume.shape
    for i, frame_groups in enumerate(ds.PerFrameFunctionalGroupsSequence):
        if seg_type == "LABELMAP":
            stored = seg.get_stored_frame(i, as_index=True)
            per_segment = {n: stored == n for n in labels}
        else:
            ident = frame_groups.get("SegmentIdentificationSequence") or shared.get("SegmentIdentificationSequence")
            n = int(ident[0].ReferencedSegmentNumber)
            if n not in masks:  # a segment not asked for (e.g. an organ): its frames are not decoded
                continue
            stored = seg.get_stored_frame(i, as_index=True)
            if seg_type == "FRACTIONAL":
                per_segment = {n: stored.astype(np.float32) / max_fraction >= threshold}
            else:
                per_segment = {n: stored > 0}
        per_segment = {n: m for n, m in per_segment.items() if m.any() and n in masks}
        if not per_segment:
            continue
        k, y0, x0 = _frame_place(frame_groups, shared, volume, sop_index, what, i)
        for n, frame_mask in per_segment.items():
            rows, cols = np.nonzero(frame_mask)
            rows, cols = rows + y0, cols + x0
            inside = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
            if not 0 <= k < nz or not inside.all():
                problems.setdefault(n, f"segment {n} ({labels[n]}) has pixels outside the CT volume")
                continue
            masks[n][k, rows, cols] = True
    out = []
    for n in sorted(labels):
        problem = problems.get(n)
        empty = problem is None and not masks[n].any()
        if empty:
            problem = f"segment {n} ({labels[n]}) is empty on this CT"
        mask = masks[n] if problem is None else np.zeros(volume.shape, dtype=bool)
        out.append(LabelMask(make_source(ds, "seg", n, labels[n]), mask, problem, empty))
    return out


def _check_seg_grid(shared: pydicom.Dataset, first: pydicom.Dataset, volume: CTVolume, what: str) -> None:
    orient = shared.get("PlaneOrientationSequence") or first.get("PlaneOrientationSequence")
    measures = shared.get("PixelMeasuresSequence") or first.get("PixelMeasuresSequence")
    direction = volume.direction
    if orient:
        iop = np.asarray([float(v) for v in orient[0].ImageOrientationPatient])
        if np.abs(iop - np.concatenate([direction[:, 0], direction[:, 1]])).max() > 1e-3:
            raise SegmentationError(
                f"{what}: its frames are not oriented like the slices of CT series "
                f"{volume.series_instance_uid}; resampling a SEG to the CT grid is not supported"
            )
    if measures and "PixelSpacing" in measures[0]:
        row_sp, col_sp = (float(v) for v in measures[0].PixelSpacing)
        sx, sy, _ = volume.spacing_xyz
        if abs(row_sp - sy) > 1e-3 * sy or abs(col_sp - sx) > 1e-3 * sx:
            raise SegmentationError(
                f"{what}: pixel spacing {row_sp:g} x {col_sp:g} mm differs from the CT's {sy:g} x {sx:g} mm; "
                "resampling a SEG to the CT grid is not supported"
            )


def _frame_place(
    groups: pydicom.Dataset,
    shared: pydicom.Dataset,
    volume: CTVolume,
    sop_index: dict[str, int],
    what: str,
    i: int,
) -> tuple[int, int, int]:
    """(slice index, row offset, column offset) of SEG frame ``i`` on the CT grid."""
    position = groups.get("PlanePositionSequence") or shared.get("PlanePositionSequence")
    if position:
        idx = volume.mm_to_index(np.asarray([float(v) for v in position[0].ImagePositionPatient]))[0]
        rounded = np.round(idx)
        if np.abs(idx - rounded).max() > SLICE_TOLERANCE:
            raise SegmentationError(
                f"{what}: frame {i + 1} lies between CT voxels (index {idx.round(2).tolist()}); "
                f"it does not match the grid of CT series {volume.series_instance_uid}"
            )
        return int(rounded[2]), int(rounded[1]), int(rounded[0])
    for derivation in groups.get("DerivationImageSequence", []):
        for src in derivation.get("SourceImageSequence", []):
            k = sop_index.get(str(src.ReferencedSOPInstanceUID))
            if k is not None:
                return k, 0, 0
    raise SegmentationError(f"{what}: frame {i + 1} has neither a plane position nor a source image on this CT")


def _load_rtstruct(ds: pydicom.Dataset, volume: CTVolume, wanted: frozenset[int] | None) -> list[LabelMask]:
    for_uids = {str(f.get("FrameOfReferenceUID", "")) for f in ds.get("ReferencedFrameOfReferenceSequence", [])}
    check_references(ds, volume, for_uids)
    contours_by_roi = {
        int(item.ReferencedROINumber): list(item.get("ContourSequence", []))
        for item in ds.get("ROIContourSequence", [])
    }
    out = []
    for roi in ds.get("StructureSetROISequence", []):
        number, label = int(roi.ROINumber), str(roi.get("ROIName", f"ROI {roi.ROINumber}"))
        if wanted is not None and number not in wanted:
            continue
        name = f"ROI {number} ({label})"
        roi_for = str(roi.get("ReferencedFrameOfReferenceUID", "") or volume.frame_of_reference_uid)
        empty = False
        if roi_for != volume.frame_of_reference_uid:
            mask = _EMPTY
            problem: str | None = (
                f"{name} is in frame of reference {roi_for}, not the CT's {volume.frame_of_reference_uid}"
            )
        else:
            mask, problem, empty = _rasterise_roi(contours_by_roi.get(number, []), volume, name)
            if problem is None and not mask.any():
                problem, empty = f"{name} is empty on this CT", True
        if problem is not None:
            mask = np.zeros(volume.shape, dtype=bool)
        out.append(LabelMask(make_source(ds, "rtstruct", number, label), mask, problem, empty))
    return sorted(out, key=lambda m: m.source.number)


def _rasterise_roi(contours: list[pydicom.Dataset], volume: CTVolume, name: str) -> tuple[np.ndarray, str | None, bool]:
    """Fill the closed planar contours of one ROI on the CT grid: (mask, problem, nothing drawn).

    Contours in one plane combine by the even-odd rule (holes, islands in holes). A contour off
    the slice planes goes to the nearest slice; contours of different planes that land on the
    same slice (an RTSTRUCT drawn on thinner slices) are combined by union.
    """
    nz, ny, nx = volume.shape
    planes: dict[int, list[tuple[float, np.ndarray]]] = {}  # slice -> [(plane z index, even-odd fill)]
    closed = 0
    for c in contours:
        kind = str(c.get("ContourGeometricType", "CLOSED_PLANAR"))
        if kind == "POINT":
            continue
        if kind != "CLOSED_PLANAR":
            return _EMPTY, f"{name} has a contour of type {kind}; only CLOSED_PLANAR contours describe a region", False
        points = _contour_points(c, name)
        if len(points) < 3:
            continue
        idx = volume.mm_to_index(points)
        z = idx[:, 2]
        if z.max() - z.min() > PLANAR_TOLERANCE:
            return _EMPTY, f"{name} has a contour that is not parallel to the CT slices", False
        k = int(np.round(z.mean()))
        if not 0 <= k < nz:
            at = float(points[0] @ volume.direction[:, 2])
            return _EMPTY, f"{name} has a contour at {at:.2f} mm along the slice normal, outside the CT volume", False
        if idx[:, 0].min() < -0.5 or idx[:, 0].max() > nx - 0.5 or idx[:, 1].min() < -0.5 or idx[:, 1].max() > ny - 0.5:
            return _EMPTY, f"{name} has a contour that extends beyond the CT field of view", False
        rr, cc = fill_polygon(idx[:, 1], idx[:, 0], shape=(ny, nx))
        same_plane = [f for zp, f in planes.setdefault(k, []) if abs(zp - z.mean()) <= PLANAR_TOLERANCE]
        if same_plane:
            same_plane[0][rr, cc] ^= True
        else:
            fill = np.zeros((ny, nx), dtype=bool)
            fill[rr, cc] = True
            planes[k].append((float(z.mean()), fill))
        closed += 1
    if closed == 0:
        return _EMPTY, f"{name} has no closed planar contour", True
    mask = np.zeros(volume.shape, dtype=bool)
    for k, fills in planes.items():
        for _, fill in fills:
            mask[k] |= fill
    return mask, None, False


_EMPTY = np.zeros((0, 0, 0), dtype=bool)


def _contour_points(contour: pydicom.Dataset, name: str) -> np.ndarray:
    """(n, 3) points of a contour; parses the raw DS bytes directly (pydicom's DS objects are slow)."""
    raw = contour.get_item("ContourData")
    try:
        if raw is not None and isinstance(raw.value, bytes):
            values = np.array(raw.value.replace(b"\x00", b"").split(b"\\"), dtype=float)
        else:
            values = np.asarray([float(v) for v in contour.get("ContourData", [])], dtype=float)
    except ValueError as exc:
        raise SegmentationError(f"{name} has a contour whose Contour Data is not numeric") from exc
    if values.size % 3:
        raise SegmentationError(f"{name} has a contour whose Contour Data is not a list of (x, y, z) points")
    return values.reshape(-1, 3)
