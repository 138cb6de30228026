"""What every per-lesion pipeline does first: CT + segmentation -> volume, masks, tracked lesions.

One function, :func:`load_study`, shared by the radiomics pipeline and the model pipelines (M1-M4),
so that a lesion has the same tracking id, tracking UID and key slice whichever method looks at it:

    segmentation file -> which structures are tumours / organs (inference.structures, or routing's choice)
    segmentation file -> phase of the CT it was drawn on      (inference.imaging.masks)
    CT files (that phase) -> HU volume                         (inference.imaging.volume)
    SEG / RTSTRUCT -> one mask per tumour / organ structure   (load_segmentation)
    each usable tumour mask -> lesions (26-connected components)  (inference.imaging.lesions)

Only tumour structures become lesions; organs (e.g. the liver holding the lesions) are kept as
context, every other structure (body outline, planning volumes, oedema) is not read. An empty or
unusable tumour segment is skipped with its reason (the others go on); no tumour structure or no
lesion at all is an :class:`~pacs_agent.errors.InputError`.

A worker runs one job per method, and the jobs of one study follow each other: the last loaded
study is kept (read-only) and handed to the next method when its files are the same, unchanged
ones, so a study with M1 + radiomics is read and split into lesions once. Loading another study
drops it first (never two studies in memory); :func:`forget_loaded_study` drops it when the
worker goes idle.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread

from inference.errors import InputError
from inference.imaging.lesions import Lesion, find_lesions, key_outline_px, outline_mm
from inference.imaging.masks import LabelMask, default_structures, load_segmentation, phase_of_segmentation
from inference.imaging.volume import CTVolume, load_ct_series
from inference.results import FeatureValue, KeyImage, LesionResult, SegmentationSource
from inference.structures import StructureSelection
from inference.uids import derive_uid

__all__ = ["LoadedStudy", "StudyLesion", "forget_loaded_study", "key_image", "lesion_result", "load_study"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class StudyLesion:
    """One lesion of a loaded study: the component, the segment it came from, its tracking UID."""

    lesion: Lesion
    source: SegmentationSource
    tracking_uid: str


@dataclass(frozen=True, eq=False)
class LoadedStudy:
    """A CT volume with its segmentation masks and lesions, ready for a method's input step.

    Attributes
    ----------
    volume : CTVolume
        The CT series (the phase the segmentation was drawn on) in HU.
    masks : tuple of LabelMask
        Every segment / ROI, usable or not, in segmentation order.
    lesions : tuple of StudyLesion
        Lesions of the usable masks; per mask ordered by volume (largest first).
    skipped : tuple of str
        One sentence per unusable tumour segment (label, kind, number, reason).
    organs : tuple of (str, LabelMask)
        Organ structures (name, mask), e.g. ``("liver", mask)``: context, never lesions.
    selection : StructureSelection
        Which structures were taken as tumours and organs.
    """

    volume: CTVolume
    masks: tuple[LabelMask, ...]
    lesions: tuple[StudyLesion, ...]
    skipped: tuple[str, ...]
    organs: tuple[tuple[str, LabelMask], ...] = ()
    selection: StructureSelection | None = None

    @property
    def segmentation(self) -> SegmentationSource:
        """The segmentation object (its first segment / ROI) the lesions come from."""
        return self.masks[0].source

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel spacing (mm) along z, y, x: what :mod:`inference.imaging.roi` takes."""
        x, y, z = self.volume.spacing_xyz
        return z, y, x


def load_study(
    ct_paths: Sequence[Path], segmentation_path: Path, structures: StructureSelection | None = None
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

    Returns
    -------
    LoadedStudy

    Raises
    ------
    InputError
        The CT cannot be assembled into a volume, the segmentation does not fit it, it has no
        tumour structure, or no lesion remains after the minimum-volume filter.
    """
    files = _files_key([*ct_paths, segmentation_path])
    key = None if files is None else (files, structures)
    with _last_lock:
        if key is not None and _last is not None and _last[0] == key:
            logger.debug("study reused from the previous job (same %d files)", len(key))
            return _last[1]
    forget_loaded_study()  # never hold two studies at once
    study = _load_study(ct_paths, segmentation_path, structures)
    if key is not None:
        _remember(key, study)
    return study


def forget_loaded_study() -> None:
    """Drop the study kept for the next job (the worker calls this when it has nothing to do)."""
    global _last
    with _last_lock:
        _last = None


_FilesKey = tuple[tuple[str, int, int, int], ...]
_StudyKey = tuple[_FilesKey, StructureSelection | None]
_last: tuple[_StudyKey, LoadedStudy] | None = None
_last_lock = threading.Lock()


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


def _remember(key: _StudyKey, study: LoadedStudy) -> None:
    """Keep ``study`` for the next job, its arrays made read-only so that no method changes them for another."""
    global _last
    for label_mask in study.masks:
        label_mask.mask.setflags(write=False)
    for item in study.lesions:
        item.lesion.mask.setflags(write=False)
    with _last_lock:
        _last = (key, study)


def _load_study(
    ct_paths: Sequence[Path], segmentation_path: Path, structures: StructureSelection | None
) -> LoadedStudy:
    """:func:`load_study` without the reuse."""
    segmentation = dcmread(segmentation_path)
    if structures is None:
        structures, no_tumour = default_structures(segmentation)
        if no_tumour:
            raise InputError(f"segmentation {segmentation.get('SOPInstanceUID')}: {no_tumour}")
    if not structures.tumours:
        raise InputError(f"segmentation {segmentation.get('SOPInstanceUID')}: no tumour structure was chosen")
    volume = load_ct_series(ct_paths, choose_phase=lambda phases: phase_of_segmentation(phases, segmentation))
    organ_names = dict(structures.organs)
    masks = tuple(load_segmentation(segmentation, volume, numbers=[*structures.tumours, *organ_names]))
    lesions: list[StudyLesion] = []
    skipped: list[str] = []
    organs: list[tuple[str, LabelMask]] = []
    for label_mask in masks:
        source = label_mask.source
        if source.number in organ_names:
            if label_mask.ok:
                organs.append((organ_names[source.number], label_mask))
            continue
        if not label_mask.ok:  # an empty or unusable segment fails alone, the others go on
            skipped.append(f"{source.label} ({source.kind} {source.number}): {label_mask.problem}")
            logger.warning("segment %d of %s skipped: %s", source.number, source.sop_instance_uid, label_mask.problem)
            continue
        for lesion in find_lesions(label_mask, volume):
            tracking_uid = derive_uid("tracking", source.sop_instance_uid, str(source.number), lesion.tracking_id)
            lesions.append(StudyLesion(lesion=lesion, source=source, tracking_uid=str(tracking_uid)))
    if not lesions:
        raise InputError("the segmentation holds no lesion above the minimum volume")
    return LoadedStudy(
        volume=volume,
        masks=masks,
        lesions=tuple(lesions),
        skipped=tuple(skipped),
        organs=tuple(organs),
        selection=structures,
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
