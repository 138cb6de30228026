"""What the segmentation objects of a phantom study hold: the lesions, and optionally organs and target volumes.

The writers in :mod:`inference.phantom.segmentation` write one segment / ROI per :class:`StructureMask`, numbered
from 1 in list order; :class:`PhantomStructure` tells a reader of the files what each number is (pure numpy, no
pydicom here: codes are ``(value, scheme, meaning)`` tuples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from inference.phantom.anatomy import LIVER, OUTSIDE, SPLEEN, Anatomy, PhantomGeometry

StructureKind = Literal["seg", "rtstruct"]
StructureRole = Literal["tumour", "organ", "other"]
CodeTuple = tuple[str, str, str]

# Segmented Property Category / Type (CID 7150 / 7151 and the 3D Slicer / dcmqi convention for the category).
ANATOMICAL_STRUCTURE: CodeTuple = ("123037004", "SCT", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE: CodeTuple = ("49755003", "SCT", "Morphologically Abnormal Structure")
NEOPLASM: CodeTuple = ("108369006", "SCT", "Neoplasm")
LIVER_CODE: CodeTuple = ("10200004", "SCT", "Liver")
SPLEEN_CODE: CodeTuple = ("78961009", "SCT", "Spleen")

SEG_LABEL = "Liver lesions"
ROI_NAME = "GTV_Liver_Lesions"
CTV_MARGIN_MM = 5.0
PTV_MARGIN_MM = 10.0
ROI_COLOURS = ((255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255), (0, 200, 200))
_LESION_DESCRIPTION = "Synthetic liver lesion ground truth"


@dataclass(frozen=True)
class PhantomStructure:
    """One segment of the SEG or one ROI of the RTSTRUCT of a phantom study.

    Attributes
    ----------
    kind : {"seg", "rtstruct"}
        The file that holds it.
    number : int
        SegmentNumber (SEG) or ROINumber (RTSTRUCT).
    name : str
        SegmentLabel or ROIName.
    role : {"tumour", "organ", "other"}
        ``"tumour"`` for the lesion segments / GTV ROIs, ``"organ"`` for the liver and spleen, ``"other"`` for
        the body outline and the CTV / PTV margins.
    lesions : tuple of int
        The planted lesions (1-based, as in ``PhantomStudy.lesions``) a tumour structure delineates; empty
        for the other roles.
    """

    kind: StructureKind
    number: int
    name: str
    role: StructureRole
    lesions: tuple[int, ...] = ()


@dataclass(frozen=True, eq=False)
class StructureMask:
    """A structure to write: its mask, its name and how the SEG and the RTSTRUCT code it.

    ``parts`` are bool arrays indexed like the CT instances the writer gets; the structure is their union.
    The RTSTRUCT contours each part on its own, in order (one part per lesion keeps the lesion contours apart).
    ``interpreted_type``, ``description`` and ``colour`` are for the RTSTRUCT; the codes are for the SEG (a
    structure without ``category`` and ``property_type`` cannot be a segment).
    """

    name: str
    role: StructureRole
    parts: tuple[np.ndarray, ...]
    interpreted_type: str
    description: str
    colour: tuple[int, int, int]
    category: CodeTuple | None = None
    property_type: CodeTuple | None = None
    anatomic_region: CodeTuple | None = None
    lesions: tuple[int, ...] = ()

    @property
    def mask(self) -> np.ndarray:
        """The union of ``parts``."""
        return np.logical_or.reduce(self.parts) if len(self.parts) > 1 else self.parts[0].astype(bool)

    def describe(self, kind: StructureKind, number: int) -> PhantomStructure:
        """The :class:`PhantomStructure` of this structure written as ``number`` in a ``kind`` file."""
        return PhantomStructure(kind, number, self.name, self.role, self.lesions)


def lesion_structures(labels: np.ndarray, kind: StructureKind, *, per_lesion: bool) -> list[StructureMask]:
    """The lesion segments (``"seg"``) or GTV ROIs (``"rtstruct"``) of a lesion label volume.

    Parameters
    ----------
    labels : numpy.ndarray
        0 background, ``i`` lesion ``i`` (1-based).
    kind : {"seg", "rtstruct"}
        Names follow the file: "Liver lesion(s)" segments, "GTV_..." ROIs.
    per_lesion : bool
        One structure per lesion instead of one for all lesions.

    Returns
    -------
    list of StructureMask
        Role ``"tumour"``, RT ROI Interpreted Type GTV, Morphologically Abnormal Structure / Neoplasm; empty
        when ``labels`` holds no lesion.
    """
    count = int(labels.max())
    if count == 0:
        return []
    numbers = list(range(1, count + 1))
    if per_lesion:
        names = [f"Liver lesion {i}" if kind == "seg" else f"GTV_Lesion_{i}" for i in numbers]
        groups: list[tuple[int, ...]] = [(i,) for i in numbers]
    else:
        names, groups = [SEG_LABEL if kind == "seg" else ROI_NAME], [tuple(numbers)]
    return [
        StructureMask(
            name=name,
            role="tumour",
            parts=tuple(labels == i for i in group),
            interpreted_type="GTV",
            description=_LESION_DESCRIPTION,
            colour=ROI_COLOURS[index % len(ROI_COLOURS)],
            category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            property_type=NEOPLASM,
            anatomic_region=LIVER_CODE,
            lesions=group,
        )
        for index, (name, group) in enumerate(zip(names, groups, strict=True))
    ]


def file_structures(
    kind: StructureKind,
    labels: np.ndarray,
    geometry: PhantomGeometry,
    anatomy: Anatomy,
    slice_index: Sequence[int],
    *,
    per_lesion: bool,
    clinical: bool,
) -> list[StructureMask]:
    """What the SEG (``kind="seg"``) or the RTSTRUCT of a study holds, in file order.

    Parameters
    ----------
    kind : {"seg", "rtstruct"}
        Which file.
    labels : numpy.ndarray
        Lesion labels (0 background, ``i`` lesion ``i``), indexed like the CT instances.
    geometry : PhantomGeometry
        The CT grid.
    anatomy : Anatomy
        The abdomen of the study (shifted for a follow-up).
    slice_index : sequence of int
        Slice index ``k`` of each CT instance (of each entry of the first axis of ``labels``).
    per_lesion : bool
        One lesion segment / GTV ROI per lesion instead of one for all lesions.
    clinical : bool
        Organs and target volumes as well (:func:`clinical_structures`), or only the lesions.

    Returns
    -------
    list of StructureMask
        The structures; the writers number them from 1 in this order.
    """
    if not clinical:
        return lesion_structures(labels, kind, per_lesion=per_lesion)
    return clinical_structures(
        labels, kind, per_lesion=per_lesion, geometry=geometry, anatomy=anatomy, slice_index=slice_index
    )


def clinical_structures(
    labels: np.ndarray,
    kind: StructureKind,
    *,
    per_lesion: bool,
    geometry: PhantomGeometry,
    anatomy: Anatomy,
    slice_index: Sequence[int],
) -> list[StructureMask]:
    """The structures of a clinical-looking export: organs and target volumes around the lesions.

    SEG: Liver (containing the lesions), Spleen, then the lesion segments. RTSTRUCT: BODY (EXTERNAL), Liver,
    Spleen (ORGAN), the GTV ROI(s), CTV_Liver (GTV + 5 mm in plane) and PTV_Liver (GTV + 10 mm in plane),
    both clipped to the body. A structure with no voxel on the CT (an organ outside a small field of view)
    is left out, so the numbers after it move up.

    Parameters
    ----------
    labels : numpy.ndarray
        Lesion labels (0 background, ``i`` lesion ``i``), indexed like the CT instances.
    kind : {"seg", "rtstruct"}
        Which file the structures are for.
    per_lesion : bool
        One lesion segment / GTV ROI per lesion instead of one for all lesions.
    geometry : PhantomGeometry
        The CT grid.
    anatomy : Anatomy
        The abdomen of the study (shifted for a follow-up).
    slice_index : sequence of int
        Slice index ``k`` of each CT instance (of each entry of the first axis of ``labels``).

    Returns
    -------
    list of StructureMask
        In file order.
    """
    body, liver, spleen = _organ_masks(geometry, anatomy, slice_index)
    lesions = labels > 0
    liver |= lesions  # the organ contains its lesions
    body |= liver
    organs = [
        _organ("Liver", liver, LIVER_CODE, (150, 75, 0)),
        _organ("Spleen", spleen, SPLEEN_CODE, (160, 32, 240)),
    ]
    tumours = lesion_structures(labels, kind, per_lesion=per_lesion)
    if kind == "seg":
        return [s for s in organs if s.mask.any()] + tumours
    outline = _other("BODY", body, "EXTERNAL", "Body outline", (0, 255, 0))
    ctv = _margin(lesions, body, geometry, CTV_MARGIN_MM)
    ptv = _margin(lesions, body, geometry, PTV_MARGIN_MM)
    margins = [
        _other("CTV_Liver", ctv, "CTV", f"Liver lesions + {CTV_MARGIN_MM:g} mm in plane", (255, 128, 0)),
        _other("PTV_Liver", ptv, "PTV", f"Liver lesions + {PTV_MARGIN_MM:g} mm in plane", (0, 255, 255)),
    ]
    return [s for s in [outline, *organs] if s.mask.any()] + tumours + margins


def _organ_masks(
    geometry: PhantomGeometry, anatomy: Anatomy, slice_index: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body, liver and spleen masks on the instances, one pixel clear of the image edge.

    Keeping the outermost pixel ring empty keeps every contour strictly inside the field of view.
    """
    shape = (len(slice_index), geometry.rows, geometry.columns)
    body, liver, spleen = (np.zeros(shape, dtype=bool) for _ in range(3))
    for i, k in enumerate(slice_index):
        _, tissue = anatomy.slice_hu(geometry, k)
        body[i], liver[i], spleen[i] = tissue != OUTSIDE, tissue == LIVER, tissue == SPLEEN
    for mask in (body, liver, spleen):
        mask[:, [0, -1], :] = False
        mask[:, :, [0, -1]] = False
    return body, liver, spleen


def _margin(lesions: np.ndarray, body: np.ndarray, geometry: PhantomGeometry, margin_mm: float) -> np.ndarray:
    """``lesions`` dilated by ``margin_mm`` within each slice (Euclidean, pixel centres), clipped to ``body``.

    On pixels coarser than the margin the reach is rounded to whole pixels (at least one), so a margin
    always adds voxels.
    """
    out = np.zeros_like(lesions)
    spacing = geometry.pixel_spacing_mm
    reach = max(margin_mm, max(1, round(margin_mm / spacing)) * spacing)
    for i in np.flatnonzero(lesions.any(axis=(1, 2))):
        out[i] = ndimage.distance_transform_edt(~lesions[i], sampling=(spacing, spacing)) <= reach
    return out & body


def _organ(name: str, mask: np.ndarray, code: CodeTuple, colour: tuple[int, int, int]) -> StructureMask:
    return StructureMask(
        name=name,
        role="organ",
        parts=(mask,),
        interpreted_type="ORGAN",
        description=f"{name} (synthetic phantom)",
        colour=colour,
        category=ANATOMICAL_STRUCTURE,
        property_type=code,
    )


def _other(
    name: str, mask: np.ndarray, interpreted_type: str, description: str, colour: tuple[int, int, int]
) -> StructureMask:
    return StructureMask(name, "other", (mask,), interpreted_type, description, colour)
