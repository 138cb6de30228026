"""Lesions: 3D connected components of a segment mask, with size, position and outline.

"Axial" here means the acquisition plane of the CT (the plane of its slices), which is axial for
the usual abdominal and chest series.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist
from skimage.measure import approximate_polygon, find_contours

from inference.imaging.masks import LabelMask, SegmentationError
from inference.imaging.volume import CTVolume

CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True, eq=False)
class Lesion:
    """One 3D connected component (26-connectivity) of a segment.

    ``index`` is 1 for the largest lesion of the segment; ``tracking_id`` is
    ``"<label> lesion <index>"``. ``mask`` is a bool array on the full CT grid; ``bbox`` the
    (z, y, x) slices that bound it. ``key_slice_index`` is the z index of the largest
    cross-section; ``longest_axial_diameter_mm`` the longest in-plane diameter over all slices.
    """

    tracking_id: str
    index: int
    mask: np.ndarray
    volume_ml: float
    centroid_mm: tuple[float, float, float]
    bbox: tuple[slice, slice, slice]
    longest_axial_diameter_mm: float
    key_slice_index: int
    voxel_count: int = 0


def find_lesions(label_mask: LabelMask, volume: CTVolume, *, min_volume_ml: float = 0.05) -> list[Lesion]:
    """Split a segment into lesions (3D connected components, 26-connectivity).

    Parameters
    ----------
    label_mask
        A usable segment (``label_mask.ok``) on the grid of ``volume``.
    volume
        The CT volume (geometry for volumes, diameters and coordinates).
    min_volume_ml
        Components smaller than this (mL) are dropped as noise.

    Returns
    -------
    list[Lesion]
        Ordered by volume, largest first; equal volumes by centroid (z, y, x index), so the
        order and the tracking ids are stable. Empty when no component reaches ``min_volume_ml``.

    Raises
    ------
    SegmentationError
        ``label_mask`` carries a problem (skip such masks and report them instead).
    ValueError
        The mask is not on the grid of ``volume``.
    """
    if not label_mask.ok:
        raise SegmentationError(str(label_mask.problem))
    mask = np.asarray(label_mask.mask, dtype=bool)
    if mask.shape != volume.shape:
        raise ValueError(f"mask shape {mask.shape} is not the volume shape {volume.shape}")
    # Work inside the segment's bounding box: a 600-slice CT is 157 M voxels, the lesions a few
    # thousand; labelling the whole grid costs seconds and gigabytes for nothing.
    extent = ndimage.find_objects(mask.view(np.uint8))
    if not extent or extent[0] is None:
        return []
    region = extent[0]
    offset = np.array([axis.start for axis in region], dtype=float)
    labels, n = ndimage.label(mask[region], structure=CONNECTIVITY_26)
    if n == 0:
        return []
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    centres = [tuple(np.add(c, offset)) for c in ndimage.center_of_mass(labels > 0, labels, range(1, n + 1))]
    voxel_ml = volume.voxel_volume_mm3 / 1000.0
    keep = [i for i in range(n) if counts[i] * voxel_ml >= min_volume_ml]
    keep.sort(key=lambda i: (-int(counts[i]), tuple(float(c) for c in centres[i])))
    boxes = ndimage.find_objects(labels)
    sx, sy, _ = volume.spacing_xyz
    lesions = []
    for rank, i in enumerate(keep, start=1):
        local_box = boxes[i]
        assert local_box is not None
        (kz, ky, kx), (rz, ry, rx) = local_box, region
        box = (
            slice(kz.start + rz.start, kz.stop + rz.start),
            slice(ky.start + ry.start, ky.stop + ry.start),
            slice(kx.start + rx.start, kx.stop + rx.start),
        )
        local = labels[local_box] == i + 1
        component = np.zeros(mask.shape, dtype=bool)
        component[box] = local
        areas = local.sum(axis=(1, 2))
        cz, cy, cx = centres[i]
        centroid = volume.index_to_mm(np.array([cx, cy, cz]))[0]
        diameter = max(_longest_diameter(local[k], sx, sy) for k in np.flatnonzero(areas))
        lesions.append(
            Lesion(
                tracking_id=f"{label_mask.source.label} lesion {rank}",
                index=rank,
                mask=component,
                volume_ml=float(counts[i] * voxel_ml),
                centroid_mm=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
                bbox=box,
                longest_axial_diameter_mm=diameter,
                key_slice_index=int(box[0].start + np.argmax(areas)),
                voxel_count=int(counts[i]),
            )
        )
    return lesions


def _slice_contours(plane: np.ndarray) -> list[np.ndarray]:
    """Closed boundary polylines (row, col) of a 2D bool mask, at the pixel edges (level 0.5)."""
    padded = np.pad(plane.astype(np.float32), 1)
    return [c - 1.0 for c in find_contours(padded, 0.5)]


def _longest_diameter(plane: np.ndarray, sx: float, sy: float) -> float:
    """Largest distance (mm) between two boundary points of a 2D mask (edge to edge)."""
    points = np.concatenate(_slice_contours(plane)) * np.array([sy, sx])
    if len(points) > 3:
        with contextlib.suppress(QhullError):  # collinear points (a one-pixel-wide line): keep them all
            points = points[ConvexHull(points).vertices]
    return float(pdist(points).max()) if len(points) > 1 else 0.0


def outline_mm(lesion: Lesion, volume: CTVolume) -> tuple[tuple[tuple[float, float, float], ...], ...]:
    """Boundary of a lesion as closed polygons in patient coordinates (mm), slice by slice.

    Parameters
    ----------
    lesion
        A lesion from :func:`find_lesions` on ``volume``.
    volume
        The CT volume it lies in.

    Returns
    -------
    tuple
        One polygon per boundary per slice, ordered by slice then by boundary; each polygon is
        closed (first point repeated at the end) and runs along the pixel edges of the mask.
        Boundaries of holes are polygons too, so the region is their even-odd combination.
    """
    polygons = []
    zs, ys, xs = lesion.bbox
    local = lesion.mask[lesion.bbox]
    for k in range(local.shape[0]):
        if not local[k].any():
            continue
        for contour in _slice_contours(local[k]):
            contour = approximate_polygon(contour, tolerance=0.01)
            rows, cols = contour[:, 0] + ys.start, contour[:, 1] + xs.start
            idx = np.column_stack([cols, rows, np.full(len(rows), zs.start + k, dtype=float)])
            mm = np.round(volume.index_to_mm(idx), 4)
            polygons.append(tuple((float(p[0]), float(p[1]), float(p[2])) for p in mm))
    return tuple(polygons)


OUTLINE_TOLERANCE_PX = 0.25
"""Largest distance (pixels) between the simplified key-slice outline and the exact mask boundary."""


def _shoelace_area(contour: np.ndarray) -> float:
    rows, cols = contour[:, 0], contour[:, 1]
    return 0.5 * abs(float(np.dot(rows, np.roll(cols, 1)) - np.dot(cols, np.roll(rows, 1))))


def key_outline_px(mask: np.ndarray, tolerance: float = OUTLINE_TOLERANCE_PX) -> tuple[tuple[float, float], ...]:
    """Outline of the largest part of a key-slice mask, in DICOM SCOORD pixel coordinates.

    The boundary of the largest 8-connected part (holes ignored) is traced along the pixel edges
    (``skimage.measure.find_contours`` at level 0.5 on the zero-padded mask) and simplified with
    the Douglas-Peucker algorithm (``approximate_polygon``), so a lesion of a few hundred boundary
    pixels becomes a few dozen points. This is what the SR's TID 1410 planar ROI (the copy of the
    lesion a viewer such as OHIF draws) holds.

    Parameters
    ----------
    mask
        The lesion on its key slice, (rows, columns), bool.
    tolerance
        Douglas-Peucker tolerance in pixels.

    Returns
    -------
    tuple[tuple[float, float], ...]
        ``(column, row)`` points of a closed polygon (first point = last) with (0, 0) the top-left
        corner of the top-left pixel (PS3.3 C.18.6.1.1), so the centre of pixel ``(r, c)`` is
        ``(c + 0.5, r + 0.5)``; values are multiples of 0.5, exact in the SR's 32-bit Graphic Data.
        Empty for an empty mask.

    Raises
    ------
    ValueError
        ``mask`` is not 2D or ``tolerance`` is negative.
    """
    plane = np.asarray(mask, dtype=bool)
    if plane.ndim != 2:
        raise ValueError(f"the key-slice mask must be 2D, not of shape {plane.shape}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, not {tolerance}")
    if not plane.any():
        return ()
    labels, _ = ndimage.label(plane, structure=np.ones((3, 3), dtype=bool))
    largest = labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    padded = np.pad(largest.astype(np.float32), 1)
    contours = find_contours(padded, 0.5, fully_connected="high")
    outer = max(contours, key=_shoelace_area)  # the outer boundary encloses the holes' boundaries
    simplified = approximate_polygon(outer, tolerance=tolerance)
    points = simplified[:, ::-1] - 0.5  # (row, col) of the padded grid -> (column, row), corner origin
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    return tuple((float(x), float(y)) for x, y in points)
