"""Voxel geometry, the synthetic abdomen and the planted liver lesions (pure numpy, no DICOM).

Coordinates are DICOM patient coordinates (LPS, mm): x grows to the patient's left, y grows posterior,
z grows superior. Images are axial with ImageOrientationPatient ``[1, 0, 0, 0, 1, 0]``, so image columns
follow +x and image rows follow +y. Volumes are indexed ``[k, row, column]`` with ``k = 0`` the most
inferior slice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Hounsfield units of the tissues (portal-venous phase, about 70 s after injection).
AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 45.0
LIVER_HU = 105.0
SPLEEN_HU = 115.0
KIDNEY_HU = 170.0
PORTAL_VEIN_HU = 170.0
AORTA_HU = 160.0
IVC_HU = 140.0
CANCELLOUS_BONE_HU = 350.0
CORTICAL_BONE_HU = 900.0
CSF_HU = 15.0
NOISE_SD_HU = 12.0

# Texture of the lesions: standard deviation (HU) and correlation length (mm) of the added field.
TEXTURES: dict[str, tuple[float, float]] = {"coarse": (30.0, 2.5), "smooth": (4.0, 2.5)}

# Labels of the anatomy map; lesions may only be planted where the label is LIVER.
OUTSIDE, BODY, LIVER, SPLEEN = 0, 1, 2, 3


@dataclass(frozen=True)
class PhantomGeometry:
    """The voxel grid of a phantom CT series.

    Attributes
    ----------
    rows, columns, slices : int
        Matrix size and number of axial slices.
    pixel_spacing_mm : float
        In-plane spacing (square pixels).
    slice_thickness_mm : float
        Slice thickness, equal to the spacing between slice centres.
    origin_mm : tuple of float
        Patient position of the centre of the first pixel of the most inferior slice.
    """

    rows: int
    columns: int
    slices: int
    pixel_spacing_mm: float
    slice_thickness_mm: float
    origin_mm: tuple[float, float, float]

    @classmethod
    def centred(
        cls, *, rows: int, columns: int, slices: int, pixel_spacing_mm: float, slice_thickness_mm: float
    ) -> PhantomGeometry:
        """A grid whose centre is the patient-coordinate origin."""
        origin = (
            -(columns - 1) / 2 * pixel_spacing_mm,
            -(rows - 1) / 2 * pixel_spacing_mm,
            -(slices - 1) / 2 * slice_thickness_mm,
        )
        return cls(rows, columns, slices, pixel_spacing_mm, slice_thickness_mm, origin)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, columns)``."""
        return (self.slices, self.rows, self.columns)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return self.pixel_spacing_mm**2 * self.slice_thickness_mm / 1000.0

    def slice_z(self, k: int) -> float:
        """Patient z (mm) of slice index ``k``."""
        return self.origin_mm[2] + k * self.slice_thickness_mm

    def x_mm(self) -> np.ndarray:
        """Patient x of every column."""
        return self.origin_mm[0] + np.arange(self.columns) * self.pixel_spacing_mm

    def y_mm(self) -> np.ndarray:
        """Patient y of every row."""
        return self.origin_mm[1] + np.arange(self.rows) * self.pixel_spacing_mm

    def z_mm(self) -> np.ndarray:
        """Patient z of every slice."""
        return self.origin_mm[2] + np.arange(self.slices) * self.slice_thickness_mm

    def index_of(self, point_mm: tuple[float, float, float]) -> tuple[float, float, float]:
        """Continuous ``(k, row, column)`` index of a patient point."""
        x, y, z = point_mm
        return (
            (z - self.origin_mm[2]) / self.slice_thickness_mm,
            (y - self.origin_mm[1]) / self.pixel_spacing_mm,
            (x - self.origin_mm[0]) / self.pixel_spacing_mm,
        )


@dataclass(frozen=True)
class Ellipsoid:
    """An axis-aligned ellipsoid in patient coordinates."""

    centre_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]

    def section(self, z: float) -> tuple[float, float] | None:
        """In-plane semi-axes of the cross-section at ``z``, or None when the plane misses it."""
        t = 1.0 - ((z - self.centre_mm[2]) / self.radii_mm[2]) ** 2
        if t <= 0.0:
            return None
        f = float(np.sqrt(t))
        return self.radii_mm[0] * f, self.radii_mm[1] * f

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Whether each row of the ``(n, 3)`` array ``points`` lies inside."""
        d = (points - np.asarray(self.centre_mm)) / np.asarray(self.radii_mm)
        return np.einsum("ij,ij->i", d, d) <= 1.0


@dataclass(frozen=True)
class Anatomy:
    """The abdomen, defined analytically in mm and shifted as a whole by ``shift_mm``."""

    z_extent_mm: float
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def _at(self, x: float, y: float, z: float = 0.0) -> tuple[float, float, float]:
        return (x + self.shift_mm[0], y + self.shift_mm[1], z + self.shift_mm[2])

    @property
    def liver(self) -> Ellipsoid:
        """The liver: patient right and anterior, about 16 x 14 cm in plane."""
        return Ellipsoid(self._at(-60.0, -5.0), (80.0, 72.0, max(20.0, min(90.0, 0.42 * self.z_extent_mm))))

    @property
    def spleen(self) -> Ellipsoid:
        """The spleen: patient left, posterior, upper abdomen."""
        liver_rz = self.liver.radii_mm[2]
        return Ellipsoid(self._at(85.0, 30.0, 0.3 * liver_rz), (28.0, 45.0, 0.6 * liver_rz))

    def kidneys(self) -> tuple[Ellipsoid, Ellipsoid]:
        """Both kidneys, posterior, in the lower half of the volume."""
        z = -0.25 * self.z_extent_mm
        radii = (28.0, 32.0, max(15.0, min(55.0, 0.25 * self.z_extent_mm)))
        return Ellipsoid(self._at(-75.0, 55.0, z), radii), Ellipsoid(self._at(75.0, 55.0, z), radii)

    def vessels(self) -> tuple[tuple[float, float, float, float], ...]:
        """Vertical cylinders ``(x, y, radius, HU)``: IVC, aorta, portal vein, spine, spinal canal."""
        sx, sy, _ = self.shift_mm
        return (
            (-25.0 + sx, 30.0 + sy, 11.0, IVC_HU),
            (20.0 + sx, 35.0 + sy, 12.0, AORTA_HU),
            (-45.0 + sx, 8.0 + sy, 7.0, PORTAL_VEIN_HU),
        )

    def forbidden_cylinders(self) -> tuple[tuple[float, float, float], ...]:
        """``(x, y, radius)`` of vessels and bone that lesions must stay away from."""
        sx, sy, _ = self.shift_mm
        return (*((x, y, r) for x, y, r, _hu in self.vessels()), (sx, 75.0 + sy, 30.0))

    def slice_hu(self, geometry: PhantomGeometry, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Noise-free HU image and label map (OUTSIDE / BODY / LIVER / SPLEEN) of slice ``k``.

        A pixel is labelled by the last structure painted over it: vessels and bone inside the liver or
        spleen are BODY.
        """
        x, y, z = geometry.x_mm(), geometry.y_mm(), geometry.slice_z(k)
        sx, sy, _ = self.shift_mm
        hu = np.full((geometry.rows, geometry.columns), AIR_HU, dtype=np.float32)
        labels = np.zeros(hu.shape, dtype=np.uint8)
        _fill(hu, x, y, (sx, sy), (165.0, 120.0), FAT_HU, labels, BODY)
        _fill(hu, x, y, (sx, sy + 2.0), (148.0, 104.0), SOFT_TISSUE_HU)
        right_kidney, left_kidney = self.kidneys()
        organs = (
            (right_kidney, KIDNEY_HU, BODY),
            (left_kidney, KIDNEY_HU, BODY),
            (self.spleen, SPLEEN_HU, SPLEEN),
            (self.liver, LIVER_HU, LIVER),
        )
        for organ, value, label in organs:  # later organs cover earlier ones
            section = organ.section(z)
            if section is not None:
                _fill(hu, x, y, organ.centre_mm[:2], section, value, labels, label)
        for vx, vy, radius, value in self.vessels():
            _fill(hu, x, y, (vx, vy), (radius, radius), value, labels, BODY)
        # Vertebral body (cortex and cancellous bone), spinal canal, posterior elements.
        _fill(hu, x, y, (sx, sy + 75.0), (21.0, 19.0), CORTICAL_BONE_HU, labels, BODY)
        _fill(hu, x, y, (sx, sy + 75.0), (17.0, 15.0), CANCELLOUS_BONE_HU)
        _fill(hu, x, y, (sx, sy + 104.0), (13.0, 9.0), CORTICAL_BONE_HU)
        _fill(hu, x, y, (sx, sy + 103.0), (8.0, 7.0), CSF_HU)
        return hu, labels


def _fill(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    centre: tuple[float, float],
    semi_axes: tuple[float, float],
    value: float,
    labels: np.ndarray | None = None,
    label: int | None = None,
) -> None:
    """Set the pixels of ``image`` inside an ellipse to ``value`` (only within its bounding box)."""
    (cx, cy), (ax, ay) = centre, semi_axes
    c0, c1 = np.searchsorted(x, cx - ax), np.searchsorted(x, cx + ax, side="right")
    r0, r1 = np.searchsorted(y, cy - ay), np.searchsorted(y, cy + ay, side="right")
    if c0 >= c1 or r0 >= r1:
        return
    dx = ((x[c0:c1] - cx) / ax) ** 2
    dy = ((y[r0:r1] - cy) / ay) ** 2
    inside = dy[:, None] + dx[None, :] <= 1.0
    image[r0:r1, c0:c1][inside] = value
    if labels is not None and label is not None:
        labels[r0:r1, c0:c1][inside] = label


@dataclass(frozen=True)
class RasterLesion:
    """A lesion rasterised on the grid: mask and HU values inside a bounding box."""

    ellipsoid: Ellipsoid
    box_start: tuple[int, int, int]
    mask: np.ndarray
    values: np.ndarray
    mean_hu: float
    texture: str

    @property
    def voxels(self) -> int:
        """Number of voxels in the mask."""
        return int(self.mask.sum())

    def box_slices(self) -> tuple[slice, slice, slice]:
        """Index ranges of the bounding box in the volume."""
        k, r, c = self.box_start
        nk, nr, nc = self.mask.shape
        return slice(k, k + nk), slice(r, r + nr), slice(c, c + nc)

    def slice_region(self, k: int) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
        """``(rows, columns, mask, values)`` of the lesion on slice ``k``, or None."""
        kk = k - self.box_start[0]
        if not 0 <= kk < self.mask.shape[0] or not self.mask[kk].any():
            return None
        _, rows, cols = self.box_slices()
        return rows, cols, self.mask[kk], self.values[kk]


def rasterise_mask(geometry: PhantomGeometry, ellipsoid: Ellipsoid) -> tuple[tuple[int, int, int], np.ndarray]:
    """Voxels whose centres lie inside ``ellipsoid``, as ``(box_start, box_mask)``.

    Raises
    ------
    ValueError
        If the ellipsoid reaches outside the volume.
    """
    cx, cy, cz = ellipsoid.centre_mm
    rx, ry, rz = ellipsoid.radii_mm
    lo = geometry.index_of((cx - rx, cy - ry, cz - rz))
    hi = geometry.index_of((cx + rx, cy + ry, cz + rz))
    start = (int(np.ceil(lo[0])), int(np.ceil(lo[1])), int(np.ceil(lo[2])))
    stop = tuple(int(np.floor(v)) + 1 for v in hi)
    if any(s < 1 for s in start) or any(e > n - 1 for e, n in zip(stop, geometry.shape, strict=True)):
        raise ValueError("the lesion reaches the edge of the volume")
    k = np.arange(start[0], stop[0])
    r = np.arange(start[1], stop[1])
    c = np.arange(start[2], stop[2])
    dz = ((geometry.origin_mm[2] + k * geometry.slice_thickness_mm - cz) / rz) ** 2
    dy = ((geometry.origin_mm[1] + r * geometry.pixel_spacing_mm - cy) / ry) ** 2
    dx = ((geometry.origin_mm[0] + c * geometry.pixel_spacing_mm - cx) / rx) ** 2
    mask = dz[:, None, None] + dy[None, :, None] + dx[None, None, :] <= 1.0
    return start, mask


def texture_values(
    geometry: PhantomGeometry, mask: np.ndarray, mean_hu: float, texture: str, rng: np.random.Generator
) -> np.ndarray:
    """HU values of a lesion: ``mean_hu`` plus a spatially correlated field with zero mean over the mask."""
    sd, corr_mm = TEXTURES[texture]
    sigma = (
        corr_mm / geometry.slice_thickness_mm,
        corr_mm / geometry.pixel_spacing_mm,
        corr_mm / geometry.pixel_spacing_mm,
    )
    field = ndimage.gaussian_filter(rng.standard_normal(mask.shape).astype(np.float32), sigma, mode="reflect")
    inside = field[mask]
    if inside.size > 1 and inside.std() > 0:
        field = (field - inside.mean()) / inside.std() * sd
    else:
        field[:] = 0.0
    return (mean_hu + field).astype(np.float32)


def check_lesions(geometry: PhantomGeometry, anatomy: Anatomy, lesions: list[RasterLesion]) -> str | None:
    """Why the lesions are invalid (outside the liver, touching each other), or None when they are fine."""
    if not lesions:
        return None
    # Work inside the bounding box of all lesions (one voxel wider), not the whole volume.
    low = np.min([lesion.box_start for lesion in lesions], axis=0) - 1
    high = np.max([np.add(lesion.box_start, lesion.mask.shape) for lesion in lesions], axis=0) + 1
    union = np.zeros(tuple(high - low), dtype=bool)
    for index, lesion in enumerate(lesions, start=1):
        box = lesion.box_slices()
        for kk in range(lesion.mask.shape[0]):
            _, labels = anatomy.slice_hu(geometry, box[0].start + kk)
            if not np.all(labels[box[1], box[2]][lesion.mask[kk]] == LIVER):
                return f"lesion {index} is not entirely inside the liver"
        local = tuple(slice(b.start - lo, b.stop - lo) for b, lo in zip(box, low, strict=True))
        union[local] |= lesion.mask
    _, count = ndimage.label(union, structure=np.ones((3, 3, 3), dtype=bool))
    if count != len(lesions):
        return f"{len(lesions)} lesions form {count} connected components"
    return None


def iter_slices(
    geometry: PhantomGeometry, anatomy: Anatomy, lesions: list[RasterLesion], rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """HU image of every slice ``k = 0 .. slices-1`` (anatomy + lesions + Gaussian noise), float32."""
    for k in range(geometry.slices):
        hu, _ = anatomy.slice_hu(geometry, k)
        for lesion in lesions:
            region = lesion.slice_region(k)
            if region is not None:
                rows, cols, mask, values = region
                hu[rows, cols][mask] = values[mask]
        hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(NOISE_SD_HU)
        yield hu
