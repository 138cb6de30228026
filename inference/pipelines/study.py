"""What every per-lesion pipeline does first: CT + segmentation -> volume, masks, tracked lesions.

One loader, shared by the radiomics pipeline, the model pipelines (M1-M4) and the response pipeline
(M5, for each time point), so that a lesion has the same tracking id, tracking UID and key slice
whichever method looks at it:

    segmentation file -> which structures are tumours / organs (inference.structures, or routing's choice)
    segmentation file -> phase of the CT it was drawn on      (inference.imaging.masks)
    CT files (that phase) -> HU volume + headers               (inference.imaging.volume)
    SEG / RTSTRUCT -> one mask per tumour / organ structure   (load_segmentation)
    each usable tumour mask -> lesions (26-connected components)  (inference.imaging.lesions)

Only tumour structures become lesions; organs (e.g. the liver holding the lesions) are kept as
context, every other structure (body outline, planning volumes, oedema) is not read. An empty or
unusable segment is skipped with its reason (the others go on).

:func:`load_study` loads one study; a study without any lesion (no tumour structure, nothing drawn,
nothing above the minimum volume) is an :class:`~inference.errors.InputError` unless the caller
allows it (the response method reports a time point without lesions instead of failing).

A worker owns one :class:`StudyLoader`: it loads a study once, hands the same read-only
:class:`LoadedStudy` to each method of that study (and both time points to the response method),
and is told to forget when the study's jobs are done. Nothing is kept at module level.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom import Dataset

from inference.errors import InputError
from inference.imaging.lesions import Lesion, find_lesions, key_outline_px, outline_mm
from inference.imaging.masks import (
    EmptySegmentationError,
    LabelMask,
    default_structures,
    load_segmentation,
    phase_of_segmentation,
    read_segmentation,
)
from inference.imaging.volume import CTVolume, load_ct_series
from inference.results import FeatureValue, KeyImage, LesionResult, SegmentationSource
from inference.structures import StructureSelection
from inference.uids import derive_uid

__all__ = [
    "LoadedStudy",
    "NoLesionError",
    "StudyLesion",
    "StudyLoader",
    "key_image",
    "lesion_result",
    "load_study",
]

logger = logging.getLogger(__name__)


NoLesionReason = Literal["no-tumour", "nothing-drawn", "too-small"]


class NoLesionError(InputError):
    """The study gives no lesion to analyse; ``reason`` says which of three ways.

    ``"no-tumour"``: no structure is a tumour; ``"nothing-drawn"``: every tumour segment is empty
    on this CT (e.g. every lesion gone at follow-up); ``"too-small"``: no lesion reaches the
    minimum volume.
    """

    def __init__(self, message: str, reason: NoLesionReason) -> None:
        super().__init__(message)
        self.reason: NoLesionReason = reason


@dataclass(frozen=True, eq=False)
class StudyLesion:
    """One lesion of a loaded study: the component, the segment it came from, its tracking UID."""

    lesion: Lesion
    source: SegmentationSource
    tracking_uid: str


@dataclass(frozen=True, eq=False)
class LoadedStudy:
    """A CT volume with its segmentation masks and lesions, ready for a method's input step.

    Read-only: the worker hands the same object to every method of the study.

    Attributes
    ----------
    volume : CTVolume
        The CT series (the phase the segmentation was drawn on) in HU, with its headers.
    segmentation_dataset : pydicom.Dataset
        The SEG / RTSTRUCT as read (a result's evidence and copied attributes come from it).
    masks : tuple of LabelMask
        Every tumour and organ segment / ROI, usable or not, in segmentation order.
    lesions : tuple of StudyLesion
        Lesions of the usable tumour masks; per mask ordered by volume (largest first).
    skipped : tuple of str
        One sentence per unusable segment (label, kind, number, "skipped:", reason).
    organs : tuple of (str, LabelMask)
        Usable organ structures (name, mask), e.g. ``("liver", mask)``: context, never lesions.
    selection : StructureSelection
        Which structures were taken as tumours and organs.
    no_lesion : NoLesionError or None
        Why the study has no lesion (None when it has some): :func:`load_study` raises it unless
        the caller allows a study without lesions.
    """

    volume: CTVolume
    segmentation_dataset: Dataset
    masks: tuple[LabelMask, ...]
    lesions: tuple[StudyLesion, ...]
    skipped: tuple[str, ...]
    organs: tuple[tuple[str, LabelMask], ...] = ()
    selection: StructureSelection | None = None
    no_lesion: NoLesionError | None = None

    @property
    def segmentation(self) -> SegmentationSource:
        """The segmentation object (its first segment / ROI) the lesions come from."""
        if not self.masks:
            raise self.no_lesion or NoLesionError("the segmentation holds no segment", "nothing-drawn")
        return self.masks[0].source

    @property
    def ct_headers(self) -> tuple[Dataset, ...]:
        """Headers of the CT instances the volume was built from (no pixel data)."""
        return self.volume.headers

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel spacing (mm) along z, y, x: what :mod:`inference.imaging.roi` takes."""
        x, y, z = self.volume.spacing_xyz
        return z, y, x

    def lesion(self, tracking_uid: str) -> StudyLesion | None:
        """The lesion with ``tracking_uid``, or None."""
        return next((item for item in self.lesions if item.tracking_uid == tracking_uid), None)


def load_study(
    ct_paths: Sequence[Path],
    segmentation_path: Path,
    structures: StructureSelection | None = None,
    *,
    allow_no_lesion: bool = False,
) -> LoadedStudy:
    """Load a CT series and its segmentation and split every usable tumour segment into lesions.

    Parameters
    ----------
    ct_paths
        Files of the CT series (several phases allowed: the one the segmentation references is used).
    segmentation_path
        The SEG or RTSTRUCT drawn on that CT.
    structures
        Which segments / ROIs are tumours and organs (the node's routing decides and passes it);
        None: decided here with the default rules of :mod:`inference.structures`.
    allow_no_lesion
        Return a study without lesions (``no_lesion`` says why) instead of raising.

    Returns
    -------
    LoadedStudy
        Its arrays are read-only.

    Raises
    ------
    InputError
        The CT cannot be assembled into a volume, the segmentation cannot be read or does not fit
        the CT; :class:`NoLesionError` (unless allowed): no tumour structure, every tumour segment
        empty, or no lesion above the minimum volume.
    """
    study = _load_study(ct_paths, segmentation_path, structures)
    if study.no_lesion is not None and not allow_no_lesion:
        raise study.no_lesion
    return study


class StudyLoader:
    """Loads studies for one worker and keeps the last few, so each study is read once.

    The jobs of a study follow each other in the worker; each asks the loader for the study and
    gets the same :class:`LoadedStudy` as long as its files are the same, unchanged ones. Two
    studies are kept (a response job needs its baseline and its follow-up); loading a third drops
    the oldest. The worker calls :meth:`forget` when a study's jobs are done.

    Parameters
    ----------
    capacity
        How many studies are kept at most.
    """

    def __init__(self, capacity: int = 2) -> None:
        if capacity < 1:
            raise ValueError("a study loader keeps at least one study")
        self.capacity = capacity
        self.loads = 0
        """How many studies were read from their files (not handed out again)."""
        self._kept: OrderedDict[_StudyKey, LoadedStudy] = OrderedDict()

    def load(
        self,
        ct_paths: Sequence[Path],
        segmentation_path: Path,
        structures: StructureSelection | None = None,
        *,
        allow_no_lesion: bool = False,
    ) -> LoadedStudy:
        """:func:`load_study`, from the kept studies when the same files were loaded before.

        Raises
        ------
        InputError
            As :func:`load_study`.
        """
        files = _files_key([*ct_paths, segmentation_path])
        key = None if files is None else (files, structures)
        study = self._kept.get(key) if key is not None else None
        if study is not None:
            self._kept.move_to_end(key)  # type: ignore[arg-type]  # key is not None here
            logger.debug("study reused (same %d files)", len(files or ()))
        else:
            while len(self._kept) >= self.capacity:
                self._kept.popitem(last=False)  # free the oldest before reading another
            study = _load_study(ct_paths, segmentation_path, structures)
            self.loads += 1
            if key is not None:
                self._kept[key] = study
        if study.no_lesion is not None and not allow_no_lesion:
            raise study.no_lesion
        return study

    def forget(self) -> None:
        """Drop every kept study (the worker calls this when a study's jobs are done)."""
        self._kept.clear()

    @property
    def kept(self) -> int:
        """How many studies are kept now."""
        return len(self._kept)


_FilesKey = tuple[tuple[str, int, int, int], ...]
_StudyKey = tuple[_FilesKey, StructureSelection | None]


def _files_key(paths: Sequence[Path]) -> _FilesKey | None:
    """Path, inode, size and modification time of every file: a changed or replaced file changes the key.

    None when a file cannot be examined (the loader then reports what is wrong with it).
    """
    key = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            return None
        key.append((str(path), info.st_ino, info.st_size, info.st_mtime_ns))
    return tuple(key)


def _load_study(
    ct_paths: Sequence[Path], segmentation_path: Path, structures: StructureSelection | None
) -> LoadedStudy:
    """:func:`load_study` that never raises for a missing lesion (``no_lesion`` says why)."""
    segmentation = read_segmentation(Path(segmentation_path))
    uid = segmentation.get("SOPInstanceUID")
    no_lesion: NoLesionError | None = None
    if structures is None:
        structures, no_tumour = default_structures(segmentation)
        if no_tumour:
            no_lesion = NoLesionError(f"segmentation {uid}: {no_tumour}", "no-tumour")
    elif not structures.tumours:
        no_lesion = NoLesionError(f"segmentation {uid}: no tumour structure was chosen", "no-tumour")
    volume = load_ct_series(ct_paths, choose_phase=lambda phases: phase_of_segmentation(phases, segmentation))
    organ_names = dict(structures.organs)
    wanted = [*structures.tumours, *organ_names]
    try:
        masks = tuple(load_segmentation(segmentation, volume, numbers=wanted)) if wanted else ()
    except EmptySegmentationError as exc:  # nothing drawn on this CT (e.g. every lesion gone)
        masks, no_lesion = (), no_lesion or NoLesionError(f"the segmentation holds no lesion ({exc})", "nothing-drawn")
    lesions: list[StudyLesion] = []
    skipped: list[str] = []
    organs: list[tuple[str, LabelMask]] = []
    for label_mask in masks:
        label_mask.mask.setflags(write=False)
        source = label_mask.source
        if not label_mask.ok:  # an empty or unusable segment fails alone, the others go on
            skipped.append(f"{source.label} ({source.kind} {source.number}) skipped: {label_mask.problem}")
            logger.warning("segment %d of %s skipped: %s", source.number, source.sop_instance_uid, label_mask.problem)
            continue
        if source.number in organ_names:
            organs.append((organ_names[source.number], label_mask))
            continue
        for lesion in find_lesions(label_mask, volume):
            lesion.mask.setflags(write=False)
            tracking_uid = derive_uid("tracking", source.sop_instance_uid, str(source.number), lesion.tracking_id)
            lesions.append(StudyLesion(lesion=lesion, source=source, tracking_uid=str(tracking_uid)))
    if not lesions and no_lesion is None:
        no_lesion = NoLesionError("the segmentation holds no lesion above the minimum volume", "too-small")
    return LoadedStudy(
        volume=volume,
        segmentation_dataset=segmentation,
        masks=masks,
        lesions=tuple(lesions),
        skipped=tuple(skipped),
        organs=tuple(organs),
        selection=structures,
        no_lesion=no_lesion,
    )


def key_image(volume: CTVolume, lesion: Lesion, heatmap: np.ndarray | None = None) -> KeyImage:
    """The key slice of ``lesion`` with its mask (and a heat map on that slice), for the Secondary Capture.

    Parameters
    ----------
    volume
        The CT volume.
    lesion
        The lesion; its ``key_slice_index`` is the slice shown.
    heatmap
        Optional map in [0, 1] with the shape of one slice (rows, columns).

    Returns
    -------
    KeyImage
    """
    z = lesion.key_slice_index
    spacing_x, spacing_y, _ = volume.spacing_xyz
    hu = np.asarray(volume.array[z], dtype=np.float32)
    if heatmap is not None and heatmap.shape != hu.shape:
        raise ValueError(f"heat map shape {heatmap.shape} is not the slice shape {hu.shape}")
    return KeyImage(
        hu=hu,
        mask=np.asarray(lesion.mask[z], dtype=bool),
        pixel_spacing_mm=(float(spacing_y), float(spacing_x)),
        heatmap=None if heatmap is None else np.asarray(heatmap, dtype=np.float32),
    )


def lesion_result(volume: CTVolume, item: StudyLesion, features: tuple[FeatureValue, ...] = ()) -> LesionResult:
    """The :class:`LesionResult` of one lesion: size, position, key slice, outlines, features.

    Parameters
    ----------
    volume
        The CT volume the lesion lies in.
    item
        The lesion with its source and tracking UID.
    features
        Radiomic features, if the method computed any.

    Returns
    -------
    LesionResult
    """
    lesion, source = item.lesion, item.source
    return LesionResult(
        tracking_id=lesion.tracking_id,
        tracking_uid=item.tracking_uid,
        source=source,
        volume_ml=lesion.volume_ml,
        longest_axial_diameter_mm=lesion.longest_axial_diameter_mm,
        centroid_mm=lesion.centroid_mm,
        key_slice_index=lesion.key_slice_index,
        key_slice_sop_instance_uid=volume.sop_instance_uids[lesion.key_slice_index],
        features=features,
        outline_mm=outline_mm(lesion, volume) if source.kind == "rtstruct" else (),
        key_outline_px=key_outline_px(lesion.mask[lesion.key_slice_index]),
    )
