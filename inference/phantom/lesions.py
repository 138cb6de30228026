"""Where lesions go: planting them in the liver, and resizing them to a target voxel count."""

from __future__ import annotations

import functools

import numpy as np

from inference.phantom.anatomy import (
    Anatomy,
    Ellipsoid,
    PhantomGeometry,
    RasterLesion,
    check_lesions,
    rasterise_mask,
    texture_values,
)
from inference.vectors import vector3


def place_lesions(
    geometry: PhantomGeometry,
    anatomy: Anatomy,
    textures: list[str],
    scale: float,
    layout_rng: np.random.Generator,
    texture_rng: np.random.Generator,
) -> list[RasterLesion]:
    """Plant one ellipsoid per texture inside the liver, apart from vessels, bone and each other.

    Parameters
    ----------
    geometry : PhantomGeometry
        The CT grid.
    anatomy : Anatomy
        The abdomen the lesions go into.
    textures : list of str
        One texture name per lesion.
    scale : float
        Factor on the radii (default diameters 10-40 mm).
    layout_rng, texture_rng : numpy.random.Generator
        Random streams for positions and sizes, and for the texture fields.

    Returns
    -------
    list of RasterLesion
        The lesions, each inside the liver, two slices from the volume's ends, and its own 26-connected
        component.

    Raises
    ------
    ValueError
        If a lesion cannot be placed even after shrinking the candidates repeatedly.
    """
    liver = anatomy.liver
    gap = 2.0 * max(geometry.pixel_spacing_mm, geometry.slice_thickness_mm) + 1.0
    min_radius = 1.5 * max(geometry.pixel_spacing_mm, geometry.slice_thickness_mm)
    placed: list[RasterLesion] = []
    for index, texture in enumerate(textures, start=1):
        for attempt in range(2000):
            shrink = 0.85 ** (attempt // 100)  # smaller lesions when the liver is crowded or the volume thin
            radius = max(min_radius, layout_rng.uniform(5.0, 20.0) * scale * shrink)
            radii = vector3(np.maximum(min_radius, radius * layout_rng.uniform(0.8, 1.2, 3)))
            centre = vector3(
                np.asarray(liver.centre_mm) + layout_rng.uniform(-0.8, 0.8, 3) * np.asarray(liver.radii_mm)
            )
            ellipsoid = Ellipsoid(centre, radii)
            if not _fits(ellipsoid, anatomy, geometry, placed, gap):
                continue
            start, mask = rasterise_mask(geometry, ellipsoid)
            if not mask.any():
                continue
            candidate = RasterLesion(ellipsoid, start, mask, mask.astype(np.float32), 0.0, texture)
            if check_lesions(geometry, anatomy, [*placed, candidate]) is None:
                mean_hu = round(float(layout_rng.uniform(40.0, 60.0)), 1)
                values = texture_values(geometry, mask, mean_hu, texture, texture_rng)
                placed.append(RasterLesion(ellipsoid, start, mask, values, mean_hu, texture))
                break
        else:
            raise ValueError(
                f"cannot place lesion {index} of {len(textures)} in the liver of a {geometry.slices}-slice volume; "
                "use more slices, fewer lesions or a smaller lesion_scale"
            )
    return placed


def _fits(
    ellipsoid: Ellipsoid, anatomy: Anatomy, geometry: PhantomGeometry, placed: list[RasterLesion], gap: float
) -> bool:
    """Cheap analytic test that a lesion is inside the liver and the volume, away from others."""
    centre, radii = np.asarray(ellipsoid.centre_mm), np.asarray(ellipsoid.radii_mm)
    if not anatomy.liver.contains(centre + _unit_sphere() * (radii + 4.0)).all():
        return False
    z = geometry.z_mm()
    if centre[2] - radii[2] - 2 * geometry.slice_thickness_mm < z[0]:
        return False
    if centre[2] + radii[2] + 2 * geometry.slice_thickness_mm > z[-1]:
        return False
    reach = max(radii[0], radii[1])
    for x, y, r in anatomy.forbidden_cylinders():
        if np.hypot(centre[0] - x, centre[1] - y) < reach + r + 4.0:
            return False
    for other in placed:
        distance = np.linalg.norm(centre - np.asarray(other.ellipsoid.centre_mm))
        if distance < max(radii) + max(other.ellipsoid.radii_mm) + gap:
            return False
    return True


@functools.cache
def _unit_sphere(n: int = 200) -> np.ndarray:
    """``n`` points spread evenly over the unit sphere (Fibonacci lattice)."""
    i = np.arange(n) + 0.5
    phi, theta = np.arccos(1 - 2 * i / n), np.pi * (1 + 5**0.5) * i
    return np.column_stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)])


def scaled_to_volume(
    geometry: PhantomGeometry, centre: tuple[float, float, float], radii: tuple[float, float, float], target: float
) -> tuple[Ellipsoid, tuple[int, int, int], np.ndarray]:
    """The ellipsoid of shape ``radii`` around ``centre`` whose voxel count is closest to ``target``.

    Parameters
    ----------
    geometry : PhantomGeometry
        The CT grid.
    centre : tuple of float
        Centre (mm).
    radii : tuple of float
        Semi-axes fixing the shape; they are scaled by one common factor.
    target : float
        Wanted number of voxels.

    Returns
    -------
    tuple
        ``(ellipsoid, box_start, box_mask)`` as from :func:`rasterise_mask`.

    Raises
    ------
    ValueError
        If no scaling comes within 10 % of ``target`` (a lesion too small, or one that leaves the volume).
    """

    def raster(factor: float) -> tuple[Ellipsoid, tuple[int, int, int], np.ndarray]:
        ellipsoid = Ellipsoid(centre, vector3(round(r * factor, 6) for r in radii))
        return (ellipsoid, *rasterise_mask(geometry, ellipsoid))

    low, high = 0.0, 2.0 * (target / max(1.0, _ellipsoid_voxels(geometry, radii))) ** (1 / 3)
    best, best_error = None, np.inf
    for _ in range(30):
        middle = (low + high) / 2
        try:
            candidate = raster(middle)
        except ValueError:  # reaches the edge of the volume: too large
            high = middle
            continue
        count = int(candidate[2].sum())
        if count > 0 and abs(count - target) < best_error:
            best, best_error = candidate, abs(count - target)
        low, high = (middle, high) if count < target else (low, middle)
    if best is None or best_error > max(0.1 * target, 2.0):
        raise ValueError(f"no lesion of {target:.0f} voxels fits at this position (too small, or leaves the volume)")
    return best


def _ellipsoid_voxels(geometry: PhantomGeometry, radii: tuple[float, float, float]) -> float:
    return 4 / 3 * np.pi * float(np.prod(radii)) / (geometry.voxel_volume_ml * 1000.0)
