"""Method inputs: the image patches, cubes, views and rings the models of METHODS.md M1-M4 read.

Every function here is pure: numpy arrays in the CT's own (z, y, x) index grid plus the voxel
spacing in, frozen dataclasses of numpy arrays out. "Axial" means the plane of the CT slices (a
fixed z index), whatever the patient orientation of the series: for the usual axial abdominal and
chest CT it is the axial plane, for a tilted or coronal reconstruction it is that reconstruction's
slice plane. Rows are the y index, columns the x index, as in ``CTVolume.array``.

Whenever a crop reaches beyond the volume, the missing pixels are filled with
:data:`PAD_HU` (-1024 HU, air) and the result says so (``padded``): a crop is never silently
shifted or shrunk to stay inside the volume.

Spacings are passed as ``spacing_zyx`` in mm, i.e. ``CTVolume.spacing_xyz[::-1]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from skimage.transform import resize

from inference.vectors import vector3

PAD_HU = -1024.0
"""Value of pixels outside the volume in every crop (air)."""

VIEW_NAMES: tuple[str, ...] = (
    "axial",
    "coronal",
    "sagittal",
    "diagonal_z_main",
    "diagonal_z_anti",
    "diagonal_y_main",
    "diagonal_y_anti",
    "diagonal_x_main",
    "diagonal_x_anti",
)
"""The 9 planar views of M2, in the order :func:`m2_views` returns them.

With the cube indexed ``[z, y, x]`` and ``n`` voxels per side (``i`` running over ``0..n-1``):

- ``axial``, ``coronal``, ``sagittal``: the planes z, y, x = centre (the exact centre plane: the mean
  of the two central voxel planes, because ``n`` is even). Axial is ``[y, x]``, coronal ``[z, x]``,
  sagittal ``[z, y]``.
- The 6 diagonal planes each contain one pair of opposite (parallel) cube edges and cut the two
  cube faces perpendicular to those edges along a face diagonal; they all pass through the centre:

  - ``diagonal_z_main`` ``cube[:, i, i]``: the z-edges at (y, x) = (0, 0) and (n-1, n-1);
  - ``diagonal_z_anti`` ``cube[:, i, n-1-i]``: the z-edges at (0, n-1) and (n-1, 0);
  - ``diagonal_y_main`` ``cube[i, :, i]``: the y-edges at (z, x) = (0, 0) and (n-1, n-1);
  - ``diagonal_y_anti`` ``cube[i, :, n-1-i]``: the y-edges at (0, n-1) and (n-1, 0);
  - ``diagonal_x_main`` ``cube[i, i, :]``: the x-edges at (z, y) = (0, 0) and (n-1, n-1);
  - ``diagonal_x_anti`` ``cube[n-1-i, i, :]``: the x-edges at (n-1, 0) and (0, n-1).

  Diagonal views are ``[edge axis, i]`` for the z and y edges (rows run along the edge) and
  ``[i, x]`` for the x edges (rows run along the diagonal). Their pixels along ``i`` are sqrt(2) x
  the cube spacing apart; resizing to a square view stretches them, as in the method.
"""


@dataclass(frozen=True)
class ZScore:
    """Intensity normalisation ``(x - mean) / std`` with statistics from a model package.

    The statistics belong to the training set and are never recomputed on the incoming study.
    """

    mean: float
    std: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.std)):
            raise ValueError('Arguments "mean" and "std" of ZScore must be finite.')
        if self.std <= 0:
            raise ValueError(f'Argument "std" of ZScore must be positive, got {self.std}.')

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Return ``(image - mean) / std`` as float32."""
        return ((np.asarray(image, dtype=np.float64) - self.mean) / self.std).astype(np.float32)


@dataclass(frozen=True, eq=False)
class M1Input:
    """M1 (KRAS, 2D ResNet): the ROI of the largest slice, resized and normalised.

    Attributes
    ----------
    image : numpy.ndarray
        float32, ``size``; the resized crop, z-scored when a :class:`ZScore` was given.
    crop_hu : numpy.ndarray
        The crop before resizing (HU), padded with :data:`PAD_HU` outside the volume.
    slice_index : int
        z index of the slice with the largest tumour cross-section.
    box : tuple of int
        ``(row_start, row_stop, col_start, col_stop)`` of the crop in the slice (half-open; may
        reach outside ``0..rows`` / ``0..cols`` when padded).
    padded : bool
        Part of the crop lies outside the volume.
    """

    image: np.ndarray
    crop_hu: np.ndarray
    slice_index: int
    box: tuple[int, int, int, int]
    padded: bool


@dataclass(frozen=True, eq=False)
class M2Input:
    """M2 (EGFR + KRAS, 9-view CNN): the 1 mm cube at the mask centroid and its 9 planar views.

    Attributes
    ----------
    cube : numpy.ndarray
        float32 ``(n, n, n)`` HU on a 1 mm (``spacing_mm``) grid aligned with the CT index axes,
        whose geometric centre is the mask centroid; :data:`PAD_HU` outside the volume.
    cube_mask : numpy.ndarray
        bool ``(n, n, n)``, the mask resampled to the cube by nearest neighbour.
    views : dict of str to numpy.ndarray
        The 9 views named in :data:`VIEW_NAMES`, each float32 ``view_size``, z-scored when a
        :class:`ZScore` was given.
    centroid_index : tuple of float
        Mask centroid as continuous (z, y, x) indices of the CT.
    padded : bool
        Part of the cube lies outside the volume.
    """

    cube: np.ndarray
    cube_mask: np.ndarray
    views: dict[str, np.ndarray]
    centroid_index: tuple[float, float, float]
    padded: bool


@dataclass(frozen=True, eq=False)
class M3Slice:
    """One M3 (RAS multi-label) slice crop of one lesion.

    Attributes
    ----------
    image : numpy.ndarray
        float32 ``size`` in [0, 255]: the crop windowed (centre 40, width 400 HU by default) and
        resized.
    mask : numpy.ndarray
        bool ``size``: the opened slice mask on the same crop, resized by nearest neighbour.
    slice_index : int
        z index of the slice.
    area_px : int
        Lesion area on this slice (pixels, before opening).
    box : tuple of int
        ``(row_start, row_stop, col_start, col_stop)`` of the crop (half-open, may reach outside).
    padded : bool
        Part of the crop lies outside the volume.
    opened : bool
        False when the opening would have removed the whole slice mask, so the mask as drawn was
        kept.
    """

    image: np.ndarray
    mask: np.ndarray
    slice_index: int
    area_px: int
    box: tuple[int, int, int, int]
    padded: bool
    opened: bool


@dataclass(frozen=True, eq=False)
class M4Input:
    """M4 (Deep-RadScore): the deep-ROI patch and the tumour and peritumoral masks.

    Attributes
    ----------
    patch_hu : numpy.ndarray
        float32 ``patch_size`` HU patch of the largest slice centred on the tumour centroid of
        that slice; :data:`PAD_HU` outside the volume.
    patch_mask : numpy.ndarray
        bool, the tumour on the same patch.
    ring_mask : numpy.ndarray
        bool, the full-volume peritumoral ring: voxels outside the tumour within ``ring_mm`` of
        it (Euclidean distance in mm between voxel centres, 3D). Limited to the volume.
    slice_index : int
        z index of the largest slice.
    centre : tuple of int
        (row, col) of the patch centre (the rounded 2D centroid).
    box : tuple of int
        ``(row_start, row_stop, col_start, col_stop)`` of the patch (half-open, may reach outside).
    padded : bool
        Part of the patch lies outside the volume.
    """

    patch_hu: np.ndarray
    patch_mask: np.ndarray
    ring_mask: np.ndarray
    slice_index: int
    centre: tuple[int, int]
    box: tuple[int, int, int, int]
    padded: bool


# --------------------------------------------------------------------------------------------- shared


def _check_inputs(ct: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ct = np.asarray(ct)
    mask = np.asarray(mask, dtype=bool)
    if ct.ndim != 3:
        raise ValueError(f"the CT must be a (z, y, x) array, got {ct.ndim} dimensions")
    if mask.shape != ct.shape:
        raise ValueError(f"mask shape {mask.shape} is not the CT shape {ct.shape}")
    if not mask.any():
        raise ValueError("the mask is empty")
    return ct, mask


def mask_centroid(mask: np.ndarray) -> tuple[float, float, float]:
    """Centre of mass (z, y, x index) of a non-empty bool mask, computed inside its bounding box.

    ``scipy.ndimage.center_of_mass`` of the whole grid allocates float64 arrays of the grid's size
    (1.2 GB for a 600-slice CT); the box of a lesion is a few thousand voxels.
    """
    box = ndimage.find_objects(np.asarray(mask, dtype=bool).view(np.uint8))[0]
    if box is None:
        raise ValueError("the mask is empty")
    local = ndimage.center_of_mass(mask[box])
    return vector3(c + axis.start for c, axis in zip(local, box, strict=True))


def _check_spacing(spacing_zyx: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in spacing_zyx)
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing_zyx must be three positive numbers (mm), got {spacing_zyx!r}")
    return values


def _check_size(size: Sequence[int], what: str) -> tuple[int, int]:
    values = tuple(int(v) for v in size)
    if len(values) != 2 or min(values) < 1:
        raise ValueError(f"{what} must be two positive integers, got {size!r}")
    return values


def largest_slice(mask: np.ndarray) -> int:
    """Index (z) of the slice with the largest mask cross-section.

    Parameters
    ----------
    mask
        bool (z, y, x) mask, not empty.

    Returns
    -------
    int
        The first such slice on a tie; the same slice as ``Lesion.key_slice_index`` for the mask
        of a lesion.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3 or not mask.any():
        raise ValueError("largest_slice needs a non-empty (z, y, x) mask")
    return int(np.argmax(mask.sum(axis=(1, 2))))


def crop2d(image: np.ndarray, box: tuple[int, int, int, int], *, fill: float = PAD_HU) -> tuple[np.ndarray, bool]:
    """Cut ``box`` out of a 2D image, filling what lies outside the image with ``fill``.

    Parameters
    ----------
    image
        2D array (rows, cols).
    box
        ``(row_start, row_stop, col_start, col_stop)``, half-open; any integers with
        start < stop, also beyond the image.
    fill
        Value of pixels outside the image.

    Returns
    -------
    tuple of (numpy.ndarray, bool)
        The crop, float32 of shape ``(row_stop - row_start, col_stop - col_start)``, and whether
        any pixel was filled.
    """
    r0, r1, c0, c1 = (int(v) for v in box)
    if r1 <= r0 or c1 <= c0:
        raise ValueError(f"empty crop box {box}")
    rows, cols = image.shape
    out = np.full((r1 - r0, c1 - c0), fill, dtype=np.float32)
    sr0, sr1, sc0, sc1 = max(r0, 0), min(r1, rows), max(c0, 0), min(c1, cols)
    if sr0 < sr1 and sc0 < sc1:
        out[sr0 - r0 : sr1 - r0, sc0 - c0 : sc1 - c0] = image[sr0:sr1, sc0:sc1]
    padded = r0 < 0 or c0 < 0 or r1 > rows or c1 > cols
    return out, padded


def _resize(image: np.ndarray, size: tuple[int, int], order: int) -> np.ndarray:
    """Resize a 2D float image with a spline of ``order``; no anti-aliasing blur, values clipped."""
    if image.shape == size:
        return image.astype(np.float32)
    out = resize(
        image.astype(np.float64), size, order=order, mode="edge", anti_aliasing=False, preserve_range=True, clip=True
    )
    return out.astype(np.float32)


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape == size:
        return mask.copy()
    out = resize(mask.astype(np.float32), size, order=0, mode="edge", anti_aliasing=False, preserve_range=True)
    return out > 0.5


def _bbox2d(mask2d: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask2d)
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


# ----------------------------------------------------------------------------------------------- M1

M1_ROI_SETS: dict[str, tuple[int, tuple[int, int]]] = {
    "ROI": (0, (60, 60)),
    "A1": (5, (70, 70)),
    "A2": (10, (80, 80)),
    "A3": (15, (90, 90)),
}
"""He et al. 2020's axial input sets: name -> (margin in pixels on each side, resized (rows, cols)).

The paper enlarges the minimum bounding rectangle "in both height and width, with an interval of 10
pixels": A1 = ROI + 10 pixels in all (5 per side, resized to 70 x 70), A2 = ROI + 20 pixels
(10 per side, 80 x 80; the paper's best, AUC 0.93), A3 = ROI + 30 pixels (15 per side, 90 x 90);
the ROI alone is resized to 60 x 60. ``margin_px`` everywhere in pacs-agent is the margin on
*each* side.
"""

M1_DEFAULT_ROI_SET = "A2"

M1_LEGACY_MARGIN_PX = 20
"""Margin (per side) of an M1 package whose ``[input]`` has no ``margin_px``: packages written before
the A2 default (10) crop as they were trained, with 20 pixels per side."""


def m1_roi_set(name: str) -> tuple[int, tuple[int, int]]:
    """``(margin_px per side, (rows, cols))`` of one of the paper's input sets (:data:`M1_ROI_SETS`).

    Raises
    ------
    ValueError
        An unknown set name.
    """
    try:
        return M1_ROI_SETS[name]
    except KeyError:
        raise ValueError(f"roi_set must be one of {', '.join(M1_ROI_SETS)}, got {name!r}") from None


def m1_input(
    ct: np.ndarray,
    mask: np.ndarray,
    zscore: ZScore | None,
    *,
    margin_px: int = 10,
    size: Sequence[int] = (80, 80),
    order: int = 3,
    square: bool = False,
) -> M1Input:
    """M1 input: the bounding rectangle (+ margin) of the ROI on its largest axial slice, resized.

    Parameters
    ----------
    ct
        (z, y, x) HU volume.
    mask
        bool (z, y, x) tumour mask on the same grid (one lesion, or the segment).
    zscore
        Normalisation statistics from the model package; None leaves HU (for inspection only).
    margin_px
        Pixels added on *each* side of the minimum axis-aligned bounding rectangle. Default 10: the
        paper's A2 set ("ROI and 20-pixel": the rectangle grows by 20 pixels in height and in
        width); A1 / A3 are 5 / 15 (:data:`M1_ROI_SETS`).
    size
        Output (rows, cols) (paper: 80 x 80 for A2).
    order
        Spline order of the resize (3: cubic, the paper's "non-linear interpolation").
    square
        Widen the shorter side of the rectangle (symmetrically, one extra pixel at the end when
        the difference is odd) so the resize keeps the aspect ratio. False (the paper): the
        rectangle is stretched to ``size``.

    Returns
    -------
    M1Input
    """
    ct, mask = _check_inputs(ct, mask)
    size = _check_size(size, "size")
    if margin_px < 0:
        raise ValueError(f"margin_px must not be negative, got {margin_px}")
    k = largest_slice(mask)
    r0, r1, c0, c1 = _bbox2d(mask[k])
    r0, r1, c0, c1 = r0 - margin_px, r1 + margin_px, c0 - margin_px, c1 + margin_px
    if square:
        height, width = r1 - r0, c1 - c0
        if height < width:
            r0 -= (width - height) // 2
            r1 = r0 + width
        elif width < height:
            c0 -= (height - width) // 2
            c1 = c0 + height
    crop, padded = crop2d(ct[k], (r0, r1, c0, c1))
    image = _resize(crop, size, order)
    if zscore is not None:
        image = zscore.apply(image)
    return M1Input(image=image, crop_hu=crop, slice_index=k, box=(r0, r1, c0, c1), padded=padded)


# ----------------------------------------------------------------------------------------------- M2


def m2_cube(
    ct: np.ndarray,
    mask: np.ndarray,
    spacing_zyx: Sequence[float],
    *,
    cube_mm: float = 64.0,
    spacing_mm: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], bool]:
    """Resample the CT (B-spline) and the mask (nearest) to an isotropic cube at the mask centroid.

    The cube's axes are the CT index axes; it has ``n = round(cube_mm / spacing_mm)`` voxels a
    side whose centres lie at ``centroid + (i - (n - 1) / 2) * spacing_mm``, so the geometric
    centre of the cube is the centroid of the mask (mm, from ``spacing_zyx``). Voxels outside the
    CT are :data:`PAD_HU`.

    Parameters
    ----------
    ct, mask
        (z, y, x) HU volume and bool mask on the same grid.
    spacing_zyx
        Voxel spacing (mm) along z, y, x.
    cube_mm, spacing_mm
        Cube edge and output spacing (paper: 64 mm at 1 mm).

    Returns
    -------
    tuple
        ``(cube, cube_mask, centroid_index, padded)``.
    """
    ct, mask = _check_inputs(ct, mask)
    spacing = _check_spacing(spacing_zyx)
    if cube_mm <= 0 or spacing_mm <= 0:
        raise ValueError("cube_mm and spacing_mm must be positive")
    n = round(cube_mm / spacing_mm)
    if n < 2:
        raise ValueError(f"the cube must have at least 2 voxels a side, got {n}")
    centroid = mask_centroid(mask)
    centre_mm = np.asarray(centroid) * np.asarray(spacing)  # (z, y, x) in the index-aligned frame
    half = (n - 1) / 2 * spacing_mm
    lo_mm, hi_mm = centre_mm - half, centre_mm + half
    lo_idx, hi_idx = lo_mm / np.asarray(spacing), hi_mm / np.asarray(spacing)
    # the volume reaches half a voxel beyond the outer voxel centres (SimpleITK's "inside" test)
    padded = bool(np.any(lo_idx < -0.5) or np.any(hi_idx > np.asarray(ct.shape) - 0.5))
    # B-spline coefficients span the whole input: crop it first, with a margin wide enough that the
    # (exponentially decaying) pre-filter does not feel the cut (0.268^12 ~ 1e-7).
    margin = 12
    start = np.maximum(np.floor(lo_idx).astype(int) - margin, 0)
    stop = np.minimum(np.ceil(hi_idx).astype(int) + margin + 1, np.asarray(ct.shape))
    if np.any(stop <= start):  # the cube misses the volume entirely (cannot happen for a mask inside)
        raise ValueError("the cube lies outside the volume")
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
    reference = sitk.Image([n, n, n], sitk.sitkFloat32)
    reference.SetSpacing((spacing_mm,) * 3)
    reference.SetOrigin(tuple(float(v) for v in lo_mm[::-1]))

    def source(array: np.ndarray, pixel: int) -> sitk.Image:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array[box]))
        image = sitk.Cast(image, pixel)
        image.SetSpacing(tuple(spacing[::-1]))
        image.SetOrigin(tuple(float(s * sp) for s, sp in zip(start[::-1], spacing[::-1], strict=True)))
        return image

    cube_image = sitk.Resample(
        source(ct, sitk.sitkFloat32), reference, sitk.Transform(), sitk.sitkBSpline, PAD_HU, sitk.sitkFloat32
    )
    mask_image = sitk.Resample(
        source(mask.astype(np.uint8), sitk.sitkUInt8),
        reference,
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        0,
        sitk.sitkUInt8,
    )
    cube = sitk.GetArrayFromImage(cube_image).astype(np.float32)
    cube_mask = sitk.GetArrayFromImage(mask_image) > 0
    return cube, cube_mask, centroid, padded


def cube_views(cube: np.ndarray) -> dict[str, np.ndarray]:
    """The 9 planar views of a cube (3 orthogonal + 6 diagonal), as defined in :data:`VIEW_NAMES`.

    Parameters
    ----------
    cube
        (n, n, n) array indexed [z, y, x], n even.

    Returns
    -------
    dict of str to numpy.ndarray
        float32 (n, n) views in the order of :data:`VIEW_NAMES`.
    """
    cube = np.asarray(cube, dtype=np.float32)
    n = cube.shape[0]
    if cube.shape != (n, n, n) or n % 2:
        raise ValueError(f"cube_views needs an (n, n, n) cube with n even, got {cube.shape}")
    c, i, anti = n // 2, np.arange(n), np.arange(n)[::-1]
    views = {
        "axial": (cube[c - 1] + cube[c]) / 2,
        "coronal": (cube[:, c - 1, :] + cube[:, c, :]) / 2,
        "sagittal": (cube[:, :, c - 1] + cube[:, :, c]) / 2,
        "diagonal_z_main": cube[:, i, i],
        "diagonal_z_anti": cube[:, i, anti],
        "diagonal_y_main": cube[i, :, i].T,
        "diagonal_y_anti": cube[i, :, anti].T,
        "diagonal_x_main": cube[i, i, :],
        "diagonal_x_anti": cube[anti, i, :],
    }
    return {name: np.ascontiguousarray(views[name], dtype=np.float32) for name in VIEW_NAMES}


def m2_input(
    ct: np.ndarray,
    mask: np.ndarray,
    spacing_zyx: Sequence[float],
    zscore: ZScore | None,
    *,
    cube_mm: float = 64.0,
    spacing_mm: float = 1.0,
    view_size: Sequence[int] = (299, 299),
    order: int = 3,
) -> M2Input:
    """M2 input: 1 mm isotropic cube (64 mm) at the mask centroid and its 9 planar views.

    Parameters
    ----------
    ct, mask
        (z, y, x) HU volume and bool nodule mask on the same grid.
    spacing_zyx
        Voxel spacing (mm) along z, y, x.
    zscore
        Normalisation statistics from the model package, applied to every view; None keeps HU.
    cube_mm, spacing_mm
        Cube edge and isotropic spacing (paper: 64 mm, 1 mm).
    view_size
        (rows, cols) of each view after resizing (paper: 299 x 299).
    order
        Spline order of the view resize.

    Returns
    -------
    M2Input
    """
    size = _check_size(view_size, "view_size")
    cube, cube_mask, centroid, padded = m2_cube(ct, mask, spacing_zyx, cube_mm=cube_mm, spacing_mm=spacing_mm)
    views = {}
    for name, view in cube_views(cube).items():
        view = _resize(view, size, order)
        views[name] = zscore.apply(view) if zscore is not None else view
    return M2Input(cube=cube, cube_mask=cube_mask, views=views, centroid_index=centroid, padded=padded)


# ----------------------------------------------------------------------------------------------- M3


def window(hu: np.ndarray, *, centre: float = 40.0, width: float = 400.0) -> np.ndarray:
    """Linear window to [0, 255]: ``centre - width / 2`` -> 0, ``centre + width / 2`` -> 255, clipped.

    Parameters
    ----------
    hu
        Array in HU.
    centre, width
        Window centre and width in HU (width > 0).

    Returns
    -------
    numpy.ndarray
        float32 in [0, 255].
    """
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = centre - width / 2
    return np.clip((np.asarray(hu, dtype=np.float64) - low) * (255.0 / width), 0.0, 255.0).astype(np.float32)


def m3_input(
    ct: np.ndarray,
    mask: np.ndarray,
    spacing_zyx: Sequence[float],
    *,
    area_fraction: float = 0.4,
    opening_radius_px: int = 1,
    border_mm: float = 10.0,
    window_centre: float = 40.0,
    window_width: float = 400.0,
    size: Sequence[int] = (128, 128),
    order: int = 1,
) -> tuple[M3Slice, ...]:
    """M3 input: one windowed crop per axial slice of a lesion whose area exceeds 0.4 x its mean.

    The mean slice area is taken over the slices the lesion touches. Each selected slice mask is
    opened (2D erosion then dilation with a disk of ``opening_radius_px``); the crop is the
    opened mask's bounding rectangle plus ``border_mm`` on each side, converted to pixels with
    the row / column spacing (rounded up), windowed, then resized.

    Parameters
    ----------
    ct, mask
        (z, y, x) HU volume and the bool mask of one lesion on the same grid.
    spacing_zyx
        Voxel spacing (mm) along z, y, x.
    area_fraction
        Keep slices with area > ``area_fraction`` x mean area (paper: 0.4).
    opening_radius_px
        Radius of the disk of the opening; 0 skips it.
    border_mm
        Border around the opened mask (paper: 1 cm).
    window_centre, window_width
        Window in HU mapped to [0, 255] (paper: 40 / 400).
    size
        Output (rows, cols) (paper: 128 x 128).
    order
        Spline order of the resize (1: bilinear).

    Returns
    -------
    tuple of M3Slice
        Ordered by slice index.
    """
    ct, mask = _check_inputs(ct, mask)
    spacing = _check_spacing(spacing_zyx)
    size = _check_size(size, "size")
    if opening_radius_px < 0 or border_mm < 0 or area_fraction < 0:
        raise ValueError("opening_radius_px, border_mm and area_fraction must not be negative")
    areas = mask.sum(axis=(1, 2))
    mean_area = float(areas[areas > 0].mean())
    border_rows, border_cols = math.ceil(border_mm / spacing[1]), math.ceil(border_mm / spacing[2])
    footprint = _disk(opening_radius_px)
    out = []
    for k in np.flatnonzero(areas > area_fraction * mean_area):
        slice_mask = mask[k]
        opened = ndimage.binary_opening(slice_mask, structure=footprint) if opening_radius_px else slice_mask
        kept = bool(opened.any())
        if not kept:
            opened = slice_mask
        r0, r1, c0, c1 = _bbox2d(opened)
        box = (r0 - border_rows, r1 + border_rows, c0 - border_cols, c1 + border_cols)
        crop, padded = crop2d(ct[k], box)
        crop_mask, _ = crop2d(opened.astype(np.float32), box, fill=0.0)
        image = _resize(window(crop, centre=window_centre, width=window_width), size, order)
        out.append(
            M3Slice(
                image=image,
                mask=_resize_mask(crop_mask > 0.5, size),
                slice_index=int(k),
                area_px=int(areas[k]),
                box=box,
                padded=padded,
                opened=kept,
            )
        )
    return tuple(out)


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (x * x + y * y) <= radius * radius


# ----------------------------------------------------------------------------------------------- M4


def peritumoral_ring(mask: np.ndarray, spacing_zyx: Sequence[float], *, ring_mm: float = 3.0) -> np.ndarray:
    """Voxels outside ``mask`` within ``ring_mm`` of it: a dilation in mm minus the tumour.

    Distances are 3D Euclidean between voxel centres with the voxel spacing, so the ring is
    ``ring_mm`` thick in every direction regardless of anisotropy (a slice thicker than
    ``ring_mm`` adds no ring above or below). The ring stops at the volume's edge.

    Parameters
    ----------
    mask
        bool (z, y, x) tumour mask, not empty.
    spacing_zyx
        Voxel spacing (mm) along z, y, x.
    ring_mm
        Ring thickness (paper: 3 mm).

    Returns
    -------
    numpy.ndarray
        bool (z, y, x), disjoint from ``mask``.
    """
    mask = np.asarray(mask, dtype=bool)
    spacing = _check_spacing(spacing_zyx)
    if mask.ndim != 3 or not mask.any():
        raise ValueError("peritumoral_ring needs a non-empty (z, y, x) mask")
    if ring_mm <= 0:
        raise ValueError(f"ring_mm must be positive, got {ring_mm}")
    reach = [math.floor(ring_mm / s) + 1 for s in spacing]
    nonzero = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    box = tuple(
        slice(max(int(idx[0]) - r, 0), min(int(idx[-1]) + r + 1, n))
        for idx, r, n in zip(nonzero, reach, mask.shape, strict=True)
    )
    local = mask[box]
    distance = ndimage.distance_transform_edt(~local, sampling=spacing)
    ring = np.zeros(mask.shape, dtype=bool)
    ring[box] = (distance <= ring_mm + 1e-9) & ~local
    return ring


def m4_input(
    ct: np.ndarray,
    mask: np.ndarray,
    spacing_zyx: Sequence[float],
    *,
    patch_size: Sequence[int] = (160, 160),
    ring_mm: float = 3.0,
) -> M4Input:
    """M4 input: a patch at the tumour centroid of the largest slice, and the 3 mm peritumoral ring.

    Parameters
    ----------
    ct, mask
        (z, y, x) HU volume and bool tumour mask on the same grid.
    spacing_zyx
        Voxel spacing (mm) along z, y, x.
    patch_size
        (rows, cols) of the patch in CT pixels (paper: 160 x 160); no resizing.
    ring_mm
        Thickness of the peritumoral ring (paper: 3 mm).

    Returns
    -------
    M4Input
        The patch spans ``centre - size // 2`` to ``centre - size // 2 + size`` on each axis,
        where ``centre`` is the rounded 2D centroid of the tumour on the largest slice.
    """
    ct, mask = _check_inputs(ct, mask)
    spacing = _check_spacing(spacing_zyx)
    rows, cols = _check_size(patch_size, "patch_size")
    k = largest_slice(mask)
    cy, cx = ndimage.center_of_mass(mask[k])
    centre = (round(float(cy)), round(float(cx)))
    box = (centre[0] - rows // 2, centre[0] - rows // 2 + rows, centre[1] - cols // 2, centre[1] - cols // 2 + cols)
    patch, padded = crop2d(ct[k], box)
    patch_mask, _ = crop2d(mask[k].astype(np.float32), box, fill=0.0)
    return M4Input(
        patch_hu=patch,
        patch_mask=patch_mask > 0.5,
        ring_mask=peritumoral_ring(mask, spacing, ring_mm=ring_mm),
        slice_index=k,
        centre=centre,
        box=box,
        padded=padded,
    )
