"""Generate a synthetic portal-venous abdominal CT study with planted liver lesions, and its follow-up."""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from inference.phantom.anatomy import (
    TEXTURES,
    Anatomy,
    Ellipsoid,
    PhantomGeometry,
    RasterLesion,
    check_lesions,
    iter_slices,
    rasterise_mask,
    texture_values,
)
from inference.phantom.ct import SUPPORTED_TRANSFER_SYNTAXES, SeriesInfo, ct_dataset, to_stored, write_instance
from inference.phantom.lesions import place_lesions, scaled_to_volume
from inference.phantom.segmentation import write_rtstruct_structures, write_seg_structures
from inference.phantom.structures import PhantomStructure, StructureKind, StructureRole, file_structures
from inference.vectors import vector3

Segmentation = Literal["seg", "rtstruct", "both", "none"]
FIELD_OF_VIEW_MM = 400.0


@dataclass(frozen=True)
class PhantomLesion:
    """Ground truth of one planted lesion.

    Attributes
    ----------
    centre_mm : tuple of float
        Centre in patient coordinates (LPS, mm).
    radii_mm : tuple of float
        Ellipsoid semi-axes along x, y, z (mm).
    volume_ml : float
        Voxel-count volume of the planted mask: what a correct reader must find.
    mean_hu : float
        Planted mean attenuation (the texture field has zero mean over the mask; noise comes on top).
    texture : str
        ``"coarse"`` (strong spatially correlated noise) or ``"smooth"`` (weak).
    voxels : int
        Number of voxels of the planted mask.
    """

    centre_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    volume_ml: float
    mean_hu: float
    texture: str
    voxels: int = 0


@dataclass(frozen=True)
class PhantomOptions:
    """How a phantom study was written (kept so that a follow-up is written the same way)."""

    segmentation: Segmentation = "both"
    seg_per_lesion: bool = False
    rtstruct_per_lesion: bool = False
    signed_pixels: bool = False
    transfer_syntax: str = ExplicitVRLittleEndian
    clinical_structures: bool = False


@dataclass(frozen=True)
class PhantomStudy:
    """A generated study: where its files are, its UIDs and the ground truth of its lesions.

    ``ct_files`` are in InstanceNumber order; instance 1 is the most superior slice. ``structures`` lists the
    segments of ``seg_file`` and then the ROIs of ``rtstruct_file``, each in number order.
    """

    study_dir: Path
    study_instance_uid: str
    ct_series_instance_uid: str
    frame_of_reference_uid: str
    ct_files: tuple[Path, ...]
    seg_file: Path | None
    rtstruct_file: Path | None
    lesions: tuple[PhantomLesion, ...]
    study_date: datetime.date
    patient_id: str
    seed: int = 0
    geometry: PhantomGeometry = field(
        default_factory=lambda: PhantomGeometry.centred(
            rows=256, columns=256, slices=60, pixel_spacing_mm=FIELD_OF_VIEW_MM / 256, slice_thickness_mm=2.5
        )
    )
    body_shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    patient_name: str = ""
    patient_birth_date: datetime.date = datetime.date(1960, 1, 1)
    patient_sex: str = "O"
    seg_series_instance_uid: str | None = None
    rtstruct_series_instance_uid: str | None = None
    options: PhantomOptions = PhantomOptions()
    structures: tuple[PhantomStructure, ...] = ()

    def structure_numbers(self, kind: StructureKind, role: StructureRole = "tumour") -> tuple[int, ...]:
        """Segment numbers (``kind="seg"``) or ROI numbers (``"rtstruct"``) of the structures with ``role``.

        Parameters
        ----------
        kind : {"seg", "rtstruct"}
            Which file.
        role : {"tumour", "organ", "other"}
            Which structures; default the lesions.

        Returns
        -------
        tuple of int
            Ascending; empty when the file was not written.
        """
        return tuple(s.number for s in self.structures if s.kind == kind and s.role == role)


def generate_study(
    out_dir: Path,
    *,
    seed: int = 0,
    lesions: int = 3,
    slices: int = 60,
    rows: int = 256,
    columns: int = 256,
    pixel_spacing_mm: float | None = None,
    slice_thickness_mm: float = 2.5,
    segmentation: Segmentation = "both",
    patient_id: str | None = None,
    study_date: datetime.date | None = None,
    lesion_texture: str | Sequence[str] = "coarse",
    lesion_scale: float = 1.0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    seg_per_lesion: bool = False,
    rtstruct_per_lesion: bool = False,
    signed_pixels: bool = False,
    clinical_structures: bool = False,
) -> PhantomStudy:
    """Write a synthetic portal-venous abdominal CT study with liver lesions and their segmentations.

    Files: ``out_dir/CT/ct_NNNN.dcm`` (one per slice), ``out_dir/SEG/seg.dcm``,
    ``out_dir/RTSTRUCT/rtstruct.dcm``. The same arguments always give the same files, UIDs included.

    Parameters
    ----------
    out_dir : Path
        Folder to write into (created).
    seed : int
        Seed of everything random: lesion layout, textures, noise, UIDs, patient demographics.
    lesions : int
        Number of lesions planted in the liver (0 allowed; then no SEG / RTSTRUCT is written).
    slices, rows, columns : int
        Size of the CT series.
    pixel_spacing_mm : float, optional
        In-plane spacing; default gives a 400 mm field of view.
    slice_thickness_mm : float
        Slice thickness and spacing.
    segmentation : {"seg", "rtstruct", "both", "none"}
        Which segmentation objects to write.
    patient_id : str, optional
        PatientID; default ``PHANTOM<seed>``.
    study_date : datetime.date, optional
        StudyDate; default derived from the seed.
    lesion_texture : str or sequence of str
        ``"coarse"`` or ``"smooth"``, for all lesions or one per lesion.
    lesion_scale : float
        Factor on the lesion radii (default sizes are 10-40 mm in diameter).
    transfer_syntax : str
        Transfer syntax of the CT files, one of ``SUPPORTED_TRANSFER_SYNTAXES``.
    seg_per_lesion, rtstruct_per_lesion : bool
        One segment / ROI per lesion instead of one for all lesions.
    signed_pixels : bool
        Store int16 HU (intercept 0) instead of uint16 with intercept -1024.
    clinical_structures : bool
        Write segmentations that look like clinical exports, where the lesions are neither first nor alone.
        SEG: 1 "Liver" (containing the lesions), 2 "Spleen" (Anatomical Structure), then the lesion
        segment(s). RTSTRUCT: 1 "BODY" (EXTERNAL), 2 "Liver", 3 "Spleen" (ORGAN), the GTV ROI(s), then
        "CTV_Liver" (GTV + 5 mm in plane) and "PTV_Liver" (GTV + 10 mm), both clipped to the body. The CT
        pixels are those of the default study; the UIDs differ. ``PhantomStudy.structures`` lists them.

    Returns
    -------
    PhantomStudy
        Paths, UIDs, the ground truth of the lesions (in planting order) and what the SEG / RTSTRUCT hold.

    Raises
    ------
    ValueError
        On an invalid argument, or when the lesions cannot be placed in the volume.
    """
    _check_args(
        slices=slices,
        rows=rows,
        columns=columns,
        lesions=lesions,
        scale=lesion_scale,
        segmentation=segmentation,
        transfer_syntax=transfer_syntax,
    )
    textures = _textures(lesion_texture, lesions)
    spacing = FIELD_OF_VIEW_MM / columns if pixel_spacing_mm is None else float(pixel_spacing_mm)
    if spacing <= 0 or slice_thickness_mm <= 0:
        raise ValueError("pixel_spacing_mm and slice_thickness_mm must be positive")
    geometry = PhantomGeometry.centred(
        rows=rows, columns=columns, slices=slices, pixel_spacing_mm=spacing, slice_thickness_mm=slice_thickness_mm
    )
    anatomy = Anatomy(z_extent_mm=slices * slice_thickness_mm)
    namespace = [
        "pacs-agent-phantom",
        "1",
        str(seed),
        str(lesions),
        repr(geometry),
        ",".join(textures),
        repr(lesion_scale),
        str(patient_id),
        str(study_date),
        str(signed_pixels),
        *(["clinical-structures"] if clinical_structures else []),  # the default study keeps its UIDs
    ]
    study_uid = _uid(namespace, "study")
    info = SeriesInfo(
        patient_name=f"PHANTOM^SEED{seed}",
        patient_id=patient_id or f"PHANTOM{seed:04d}",
        patient_birth_date=datetime.date(1940 + seed % 40, 1 + seed % 12, 1 + seed % 28),
        patient_sex="F" if seed % 2 else "M",
        study_instance_uid=study_uid,
        study_date=study_date or datetime.date(2024, 1, 8) + datetime.timedelta(days=seed % 365),
        study_time=_study_time(seed),
        study_id="1",
        accession_number=_accession(study_uid),
        frame_of_reference_uid=_uid(namespace, "frame-of-reference"),
    )
    layout_rng, texture_rng = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2])
    planted = place_lesions(geometry, anatomy, textures, lesion_scale, layout_rng, texture_rng)
    options = PhantomOptions(
        segmentation, seg_per_lesion, rtstruct_per_lesion, signed_pixels, transfer_syntax, clinical_structures
    )
    return _write_study(
        Path(out_dir), info, geometry, anatomy, planted, np.random.default_rng([seed, 3]), namespace, options, seed
    )


def generate_follow_up(
    baseline: PhantomStudy,
    out_dir: Path,
    *,
    weeks: float = 8.0,
    shrink: float = 0.7,
    texture_change: Literal["homogenise", "coarsen"] | None = "homogenise",
    seed: int | None = None,
    body_shift_mm: tuple[float, float, float] | None = None,
    transfer_syntax: str | None = None,
) -> PhantomStudy:
    """Write a follow-up study of the same patient in which every lesion changed by a known amount.

    Parameters
    ----------
    baseline : PhantomStudy
        The earlier study (from :func:`generate_study` or a previous follow-up).
    out_dir : Path
        Folder to write into, with the same layout as :func:`generate_study`.
    weeks : float
        Interval; StudyDate = baseline StudyDate + ``round(weeks * 7)`` days.
    shrink : float
        Factor on each lesion's voxel volume (0.7 = 30 % smaller; > 1 grows). The realised factor is
        the ratio of the ground-truth ``volume_ml`` values.
    texture_change : {"homogenise", "coarsen"} or None
        Make every lesion "smooth" / "coarse", or keep each lesion's texture.
    seed : int, optional
        Seed of the noise, textures and body shift; default the baseline's seed.
    body_shift_mm : tuple of float, optional
        Shift of the whole body relative to the baseline; default a random shift of a few mm.
    transfer_syntax : str, optional
        Transfer syntax of the CT files; default the baseline's.

    Returns
    -------
    PhantomStudy
        New StudyInstanceUID and Frame of Reference, same patient; lesion ``i`` is baseline lesion ``i``.

    Raises
    ------
    ValueError
        On an invalid argument, or when the changed lesions leave the liver or touch each other.
    """
    if shrink <= 0:
        raise ValueError(f"shrink must be positive, got {shrink}")
    if weeks < 0:
        raise ValueError(f"weeks must not be negative, got {weeks}")
    if texture_change not in (None, "homogenise", "coarsen"):
        raise ValueError(f'texture_change must be "homogenise", "coarsen" or None, got {texture_change!r}')
    seed = baseline.seed if seed is None else seed
    options = replace(baseline.options, transfer_syntax=transfer_syntax or baseline.options.transfer_syntax)
    _check_args(
        slices=baseline.geometry.slices,
        rows=baseline.geometry.rows,
        columns=baseline.geometry.columns,
        lesions=len(baseline.lesions),
        scale=1.0,
        segmentation=options.segmentation,
        transfer_syntax=options.transfer_syntax,
    )
    rng = np.random.default_rng([seed, 11])
    if body_shift_mm is None:
        body_shift_mm = (float(rng.uniform(-4, 4)), float(rng.uniform(-4, 4)), float(rng.uniform(-3, 3)))
    total_shift = vector3(a + b for a, b in zip(baseline.body_shift_mm, body_shift_mm, strict=True))
    geometry = baseline.geometry
    anatomy = Anatomy(z_extent_mm=geometry.slices * geometry.slice_thickness_mm, shift_mm=total_shift)
    texture_rng = np.random.default_rng([seed, 12])
    changed = []
    for number, lesion in enumerate(baseline.lesions, start=1):
        centre = vector3(c + s for c, s in zip(lesion.centre_mm, body_shift_mm, strict=True))
        target = shrink * lesion.volume_ml / geometry.voxel_volume_ml
        try:
            ellipsoid, start, mask = scaled_to_volume(geometry, centre, lesion.radii_mm, target)
        except ValueError as exc:
            raise ValueError(f"the follow-up cannot be drawn with shrink={shrink}: lesion {number}: {exc}") from exc
        texture = {"homogenise": "smooth", "coarsen": "coarse", None: lesion.texture}[texture_change]
        values = texture_values(geometry, mask, lesion.mean_hu, texture, texture_rng)
        changed.append(RasterLesion(ellipsoid, start, mask, values, lesion.mean_hu, texture))
    problem = check_lesions(geometry, anatomy, changed)
    if problem:
        raise ValueError(f"the follow-up cannot be drawn with shrink={shrink}: {problem}")
    namespace = [
        "pacs-agent-phantom-follow-up",
        "1",
        baseline.study_instance_uid,
        str(seed),
        repr(weeks),
        repr(shrink),
        str(texture_change),
        repr(body_shift_mm),
    ]
    study_uid = _uid(namespace, "study")
    info = SeriesInfo(
        patient_name=baseline.patient_name,
        patient_id=baseline.patient_id,
        patient_birth_date=baseline.patient_birth_date,
        patient_sex=baseline.patient_sex,
        study_instance_uid=study_uid,
        study_date=baseline.study_date + datetime.timedelta(days=round(weeks * 7)),
        study_time=_study_time(baseline.seed),
        study_id="2",
        accession_number=_accession(study_uid),
        frame_of_reference_uid=_uid(namespace, "frame-of-reference"),
    )
    study = _write_study(
        Path(out_dir), info, geometry, anatomy, changed, np.random.default_rng([seed, 13]), namespace, options, seed
    )
    return replace(study, body_shift_mm=total_shift)


def label_volume(study: PhantomStudy) -> np.ndarray:
    """The planted lesion labels of ``study`` (0 background, ``i`` = lesion ``i``), as uint8.

    Indexed ``[k, row, column]`` with ``k = 0`` the most inferior slice (the reverse of ``ct_files``).
    """
    labels = np.zeros(study.geometry.shape, dtype=np.uint8)
    for index, lesion in enumerate(study.lesions, start=1):
        start, mask = rasterise_mask(study.geometry, Ellipsoid(lesion.centre_mm, lesion.radii_mm))
        box = tuple(slice(s, s + n) for s, n in zip(start, mask.shape, strict=True))
        labels[box][mask] = index
    return labels


def _write_study(
    out_dir: Path,
    info: SeriesInfo,
    geometry: PhantomGeometry,
    anatomy: Anatomy,
    planted: list[RasterLesion],
    noise_rng: np.random.Generator,
    namespace: list[str],
    options: PhantomOptions,
    seed: int,
) -> PhantomStudy:
    """Write CT, SEG and RTSTRUCT files and describe them."""
    ct_dir = out_dir / "CT"
    ct_dir.mkdir(parents=True, exist_ok=True)
    series_uid = _uid(namespace, "ct-series")
    labels = np.zeros(geometry.shape, dtype=np.uint8)
    for index, lesion in enumerate(planted, start=1):
        labels[lesion.box_slices()][lesion.mask] = index
    headers: list[Dataset] = [Dataset()] * geometry.slices
    files: list[Path] = [Path()] * geometry.slices
    for k, hu in enumerate(iter_slices(geometry, anatomy, planted, noise_rng)):
        number = geometry.slices - k
        ds = ct_dataset(
            info,
            geometry,
            series_instance_uid=series_uid,
            sop_instance_uid=_uid(namespace, "ct-instance", str(number)),
            k=k,
            instance_number=number,
            stored=to_stored(hu, options.signed_pixels),
            signed=options.signed_pixels,
        )
        path = ct_dir / f"ct_{number:04d}.dcm"
        write_instance(ds, path, UID(options.transfer_syntax))
        del ds.PixelData  # the SEG and RTSTRUCT only reference the instances
        headers[number - 1], files[number - 1] = ds, path
    ordered_labels = labels[::-1]  # instance order: most superior first
    slice_index = [geometry.slices - 1 - i for i in range(geometry.slices)]
    seg_file = rtstruct_file = None
    seg_series = rtstruct_series = None
    written: list[PhantomStructure] = []
    grid = (ordered_labels, geometry, anatomy, slice_index)
    if planted and options.segmentation in ("seg", "both"):
        seg_file, seg_series = out_dir / "SEG" / "seg.dcm", _uid(namespace, "seg-series")
        seg_file.parent.mkdir(exist_ok=True)
        segments = file_structures(
            "seg", *grid, per_lesion=options.seg_per_lesion, clinical=options.clinical_structures
        )
        write_seg_structures(
            seg_file,
            headers,
            segments,
            series_instance_uid=seg_series,
            sop_instance_uid=_uid(namespace, "seg-instance"),
        )
        written += [s.describe("seg", number) for number, s in enumerate(segments, start=1)]
    if planted and options.segmentation in ("rtstruct", "both"):
        rtstruct_file, rtstruct_series = out_dir / "RTSTRUCT" / "rtstruct.dcm", _uid(namespace, "rtstruct-series")
        rtstruct_file.parent.mkdir(exist_ok=True)
        rois = file_structures(
            "rtstruct", *grid, per_lesion=options.rtstruct_per_lesion, clinical=options.clinical_structures
        )
        write_rtstruct_structures(
            rtstruct_file,
            info,
            geometry,
            headers,
            slice_index,
            rois,
            series_instance_uid=rtstruct_series,
            sop_instance_uid=_uid(namespace, "rtstruct-instance"),
        )
        written += [s.describe("rtstruct", number) for number, s in enumerate(rois, start=1)]
    truth = tuple(
        PhantomLesion(
            centre_mm=lesion.ellipsoid.centre_mm,
            radii_mm=lesion.ellipsoid.radii_mm,
            volume_ml=lesion.voxels * geometry.voxel_volume_ml,
            mean_hu=lesion.mean_hu,
            texture=lesion.texture,
            voxels=lesion.voxels,
        )
        for lesion in planted
    )
    return PhantomStudy(
        study_dir=out_dir,
        study_instance_uid=info.study_instance_uid,
        ct_series_instance_uid=series_uid,
        frame_of_reference_uid=info.frame_of_reference_uid,
        ct_files=tuple(files),
        seg_file=seg_file,
        rtstruct_file=rtstruct_file,
        lesions=truth,
        study_date=info.study_date,
        patient_id=info.patient_id,
        seed=seed,
        geometry=geometry,
        body_shift_mm=anatomy.shift_mm,
        patient_name=info.patient_name,
        patient_birth_date=info.patient_birth_date,
        patient_sex=info.patient_sex,
        seg_series_instance_uid=seg_series,
        rtstruct_series_instance_uid=rtstruct_series,
        options=options,
        structures=tuple(written),
    )


def _textures(lesion_texture: str | Sequence[str], count: int) -> list[str]:
    textures = [lesion_texture] * count if isinstance(lesion_texture, str) else list(lesion_texture)
    if len(textures) != count:
        raise ValueError(f"lesion_texture has {len(textures)} entries for {count} lesions")
    for texture in textures:
        if texture not in TEXTURES:
            raise ValueError(f'lesion_texture must be one of {sorted(TEXTURES)}, got "{texture}"')
    return textures


def _check_args(
    *, slices: int, rows: int, columns: int, lesions: int, scale: float, segmentation: str, transfer_syntax: str
) -> None:
    if slices < 3 or rows < 64 or columns < 64:
        raise ValueError(f"the volume must be at least 3 x 64 x 64, got {slices} x {rows} x {columns}")
    if lesions < 0:
        raise ValueError(f"lesions must not be negative, got {lesions}")
    if scale <= 0:
        raise ValueError(f"lesion_scale must be positive, got {scale}")
    if segmentation not in ("seg", "rtstruct", "both", "none"):
        raise ValueError(f'segmentation must be "seg", "rtstruct", "both" or "none", got {segmentation!r}')
    if transfer_syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        raise ValueError(f'transfer syntax "{transfer_syntax}" is not supported by the phantom writer')


def _uid(namespace: list[str], *role: str) -> str:
    """A UID that depends only on the generation parameters and the role of the object."""
    return str(generate_uid(entropy_srcs=[*namespace, *role]))


def _study_time(seed: int) -> datetime.time:
    return datetime.time(8 + seed % 10, (7 * seed) % 60, 0)


def _accession(study_uid: str) -> str:
    return "PH" + str(int(hashlib.sha256(study_uid.encode()).hexdigest(), 16) % 10**10).zfill(10)
