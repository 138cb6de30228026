"""Surface curvature of a lesion: Koenderink shape index on its surface mesh, and SI4.

Method (one lesion mask at a time):

1. **Smoothing.** The binary mask is cropped to its bounding box, padded, converted to 0/1 floats and
   smoothed with a Gaussian of ``sigma = max(SMOOTHING_MM, SMOOTHING_VOXELS x largest voxel spacing)``
   millimetres, the same width in mm along every axis (so anisotropic voxels get fewer voxels of
   smoothing along their long axis). Without it the voxel staircase, not the lesion, sets the curvature.
   The smoothing width is the scale of the feature: bumps much smaller than ``sigma`` do not count.
2. **Surface.** ``skimage.measure.marching_cubes`` at level 0.5 of the smoothed mask, with the voxel
   spacing, gives a triangle mesh in mm. (A lesion smaller than the smoothing kernel, whose smoothed
   maximum stays below 0.5, is meshed at half its maximum instead.)
3. **Principal curvatures** at every vertex, from the same smoothed field F (taken as ``-smoothed mask``
   so that F grows outwards): with gradient g and Hessian H from Gaussian-derivative filters interpolated
   at the vertex, the curvature tensor of the level surface is ``P H P / |g|`` with ``P = I - n n^T`` and
   ``n = g / |g|`` the outward normal. Its two tangent eigenvalues are k1 >= k2 (1/mm). This is the
   standard implicit-surface estimator (Goldman 2005, "Curvature formulas for implicit curves and
   surfaces"); it needs no mesh neighbourhood and does not depend on the mesh's triangulation.
4. **Shape index** ``S = (2/pi) * arctan2(k1 + k2, k1 - k2)`` in [-1, 1]. Sign convention: outward
   normals, convex curvature positive, so a sphere (cap) is +1, a cylinder's side (ridge) +0.5, a
   symmetric saddle 0, a groove (rut) -0.5 and a cup (concave dimple) -1. A flat patch (k1 = k2 = 0)
   gets S = 0.
5. **Histogram** of S over 9 equal bins of [-1, 1], each vertex weighted by its share of the mesh area
   (one third of the area of every triangle it belongs to), normalised to sum 1. Bin ``b`` (1-based)
   covers ``[-1 + 2(b-1)/9, -1 + 2b/9)``; the last bin includes +1.
6. **SI4** = the area fraction in bin 4, S in [-1/3, -1/9): saddle-like points that bend inwards more
   than outwards (Koenderink's "saddle rut"), the notches and clefts of a lobulated or infiltrating
   border. A smooth convex lesion (sphere, ellipsoid) has SI4 = 0.

Resolution and position: with the default smoothing (2 mm, or one largest voxel spacing when that is
larger) the SI4 of the same shape voxelised at 0.7 to 1.25 mm spacing, translated by a fraction of a
voxel or rotated, varies by about 0.02 (absolute). On 2-3 mm grids the smoothing widens with the
voxels, fine notches fill in and SI4 can be up to 0.05 lower than on a 1 mm grid: compare SI4 only
between series of similar spacing. A convex lesion (ellipsoid) has SI4 = 0 at every spacing tested
(0.7-5 mm). tests/unit/test_shape_index.py measures all of this.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.measure import marching_cubes

SMOOTHING_MM = 2.0
"""Smallest Gaussian width (mm) used to smooth the mask before meshing."""
SMOOTHING_VOXELS = 1.0
"""The Gaussian is at least this many of the largest voxel spacing wide (removes the voxel staircase)."""
N_BINS = 9
SI4_BIN = 4
"""1-based bin of the 9-bin shape-index histogram whose area fraction is SI4: S in [-1/3, -1/9)."""
LEVEL = 0.5


@dataclass(frozen=True, eq=False)
class ShapeIndexResult:
    """Shape index of one lesion surface.

    Attributes
    ----------
    vertices_mm
        (n, 3) mesh vertices in mm, (z, y, x) axis order of the mask array, relative to the mask's
        voxel (0, 0, 0).
    faces
        (m, 3) vertex indices of the mesh triangles.
    shape_index
        (n,) shape index S of every vertex, in [-1, 1].
    curvatures
        (n, 2) principal curvatures k1 >= k2 (1/mm) of every vertex, convex positive.
    vertex_area_mm2
        (n,) area (mm2) each vertex stands for.
    histogram
        Area-weighted fraction of the surface in each of the 9 bins (sums to 1).
    smoothing_mm
        Width of the Gaussian actually used.
    """

    vertices_mm: np.ndarray
    faces: np.ndarray
    shape_index: np.ndarray
    curvatures: np.ndarray
    vertex_area_mm2: np.ndarray
    histogram: tuple[float, ...]
    smoothing_mm: float

    @property
    def si4(self) -> float:
        """Area fraction of the surface in bin 4, S in [-1/3, -1/9)."""
        return self.histogram[SI4_BIN - 1]

    @property
    def surface_mm2(self) -> float:
        """Area of the mesh (mm2)."""
        return float(self.vertex_area_mm2.sum())


def bin_edges() -> np.ndarray:
    """The 10 edges of the 9 equal shape-index bins over [-1, 1]."""
    return np.linspace(-1.0, 1.0, N_BINS + 1)


def smoothing_width_mm(
    spacing_xyz: Sequence[float], *, smoothing_mm: float = SMOOTHING_MM, smoothing_voxels: float = SMOOTHING_VOXELS
) -> float:
    """Gaussian width (mm) used for a grid: ``max(smoothing_mm, smoothing_voxels x max spacing)``."""
    return max(float(smoothing_mm), float(smoothing_voxels) * max(float(s) for s in spacing_xyz))


def shape_index_surface(
    mask: np.ndarray,
    spacing_xyz: Sequence[float],
    *,
    smoothing_mm: float = SMOOTHING_MM,
    smoothing_voxels: float = SMOOTHING_VOXELS,
) -> ShapeIndexResult:
    """Mesh a lesion mask and compute the shape index of every surface vertex.

    Parameters
    ----------
    mask
        Bool (z, y, x) lesion mask (any array size; it is cropped to its bounding box).
    spacing_xyz
        Voxel spacing (x, y, z) in mm, SimpleITK order (``CTVolume.spacing_xyz``).
    smoothing_mm, smoothing_voxels
        Gaussian width: ``max(smoothing_mm, smoothing_voxels x largest spacing)`` mm.

    Returns
    -------
    ShapeIndexResult

    Raises
    ------
    ValueError
        Empty mask, not 3D, or a non-positive spacing.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D (z, y, x), got {mask.ndim}D")
    if len(spacing_xyz) != 3 or min(spacing_xyz) <= 0:
        raise ValueError(f"spacing_xyz must be 3 positive numbers, got {tuple(spacing_xyz)}")
    if not mask.any():
        raise ValueError("the lesion mask is empty")
    spacing_zyx = np.asarray(spacing_xyz, dtype=float)[::-1]
    sigma = smoothing_width_mm(spacing_xyz, smoothing_mm=smoothing_mm, smoothing_voxels=smoothing_voxels)
    sigma_voxels = sigma / spacing_zyx
    pad = tuple(math.ceil(4.0 * s) + 2 for s in sigma_voxels)
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    local = np.pad(mask[box].astype(np.float64), [(p, p) for p in pad])

    def derivative(order: Sequence[int]) -> np.ndarray:
        return ndimage.gaussian_filter(local, sigma_voxels, order=list(order), mode="constant")

    smoothed = derivative((0, 0, 0))
    peak = float(smoothed.max())
    level = LEVEL if peak > LEVEL else 0.5 * peak
    vertices, faces, _, _ = marching_cubes(smoothed, level, spacing=tuple(spacing_zyx))
    index = (vertices / spacing_zyx).T  # continuous (z, y, x) indices into ``local``

    gradient = np.empty((len(vertices), 3))
    hessian = np.empty((len(vertices), 3, 3))
    for i in range(3):
        order = [0, 0, 0]
        order[i] = 1
        gradient[:, i] = ndimage.map_coordinates(derivative(order), index, order=1) / spacing_zyx[i]
        for j in range(i, 3):
            order = [0, 0, 0]
            order[i] += 1
            order[j] += 1
            value = ndimage.map_coordinates(derivative(order), index, order=1) / (spacing_zyx[i] * spacing_zyx[j])
            hessian[:, i, j] = hessian[:, j, i] = value
    # F = -smoothed grows outwards: its gradient is the outward normal direction.
    k1, k2 = _principal_curvatures(-gradient, -hessian)
    shape_index = (2.0 / np.pi) * np.arctan2(k1 + k2, k1 - k2)
    areas = _vertex_areas(vertices, faces)
    counts, _ = np.histogram(np.clip(shape_index, -1.0, 1.0), bins=bin_edges(), weights=areas)
    total = float(areas.sum())
    histogram = tuple(float(c) / total for c in counts) if total > 0 else (0.0,) * N_BINS
    return ShapeIndexResult(
        vertices_mm=vertices,
        faces=faces,
        shape_index=shape_index,
        curvatures=np.column_stack([k1, k2]),
        vertex_area_mm2=areas,
        histogram=histogram,
        smoothing_mm=sigma,
    )


def si4(
    mask: np.ndarray,
    spacing_xyz: Sequence[float],
    *,
    smoothing_mm: float = SMOOTHING_MM,
    smoothing_voxels: float = SMOOTHING_VOXELS,
) -> float:
    """SI4 of a lesion: the area fraction of its surface with shape index in [-1/3, -1/9).

    Parameters
    ----------
    mask
        Bool (z, y, x) lesion mask.
    spacing_xyz
        Voxel spacing (x, y, z) in mm.
    smoothing_mm, smoothing_voxels
        See :func:`shape_index_surface`.

    Returns
    -------
    float
        In [0, 1]; 0 for a convex lesion.
    """
    return shape_index_surface(mask, spacing_xyz, smoothing_mm=smoothing_mm, smoothing_voxels=smoothing_voxels).si4


def _principal_curvatures(gradient: np.ndarray, hessian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """k1 >= k2 of the level surfaces of F from its gradient (n, 3) and Hessian (n, 3, 3)."""
    norm = np.linalg.norm(gradient, axis=1)
    norm = np.where(norm > 0, norm, np.finfo(float).tiny)
    normal = gradient / norm[:, None]
    # An orthonormal tangent basis (t1, t2) per vertex.
    helper = np.where(np.abs(normal[:, [0]]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    t1 = np.cross(normal, helper)
    t1 /= np.linalg.norm(t1, axis=1)[:, None]
    t2 = np.cross(normal, t1)
    a = np.einsum("ni,nij,nj->n", t1, hessian, t1) / norm
    b = np.einsum("ni,nij,nj->n", t1, hessian, t2) / norm
    c = np.einsum("ni,nij,nj->n", t2, hessian, t2) / norm
    mean = 0.5 * (a + c)
    spread = np.sqrt((0.5 * (a - c)) ** 2 + b**2)
    return mean + spread, mean - spread


def _vertex_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """One third of the area of every triangle goes to each of its vertices."""
    tri = vertices[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    out = np.zeros(len(vertices))
    for corner in range(3):
        np.add.at(out, faces[:, corner], area / 3.0)
    return out
