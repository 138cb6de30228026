"""The response pipeline (M5): baseline + ~8-week CT and segmentations -> deltas, score, RECIST.

Data flow::

    both CT + SEG/RTSTRUCT -> volumes, masks, lesions   (inference.pipelines.study, as every method)
    each lesion     -> SI4, LoG z/x entropy, NGTDM contrast   (inference.radiomics.delta)
    the two CTs     -> alignment -> lesion pairs, new, disappeared   (inference.response.matching)
    each time point -> volume-weighted patient features -> deltas
    deltas          -> random forest -> P(insensitive), risk group   (inference.response.signature)
    pairs           -> RECIST-like category, volumetric change        (inference.response.recist)

Which segments / ROIs are lesions is decided as for every method (:mod:`inference.structures`, or the
node's routing, which passes its choice): only tumour structures become lesions; an organ structure
that is the liver (e.g. a segment "Liver" coded as the organ) is used as the registration region,
never as a lesion; every other structure is ignored. For the RECIST organ rule a lesion belongs to
the organ structure that holds most of it, else to the liver (M5 is about liver metastases).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from inference.errors import InputError
from inference.imaging.lesions import Lesion, key_outline_px, outline_mm
from inference.imaging.volume import CTVolume
from inference.pipelines.study import LoadedStudy, StudyLesion, load_study
from inference.radiomics.delta import (
    DEFAULT_DELTA,
    LesionFeatures,
    PatientFeatures,
    feature_deltas,
    lesion_features,
    patient_features,
)
from inference.radiomics.features import FeatureError
from inference.response import LesionMeasurement, LesionPair, ResponseResult, TimePoint
from inference.response.matching import MAX_DISTANCE_MM, MIN_DICE, REGION_MARGIN_MM, Alignment, align, match_lesions
from inference.response.quality import Acquisition, QualityTier, TierRule, decide_tier
from inference.response.recist import MeasuredLesion, assess_response
from inference.response.signature import ResponseSignature, signature_from
from inference.results import AlgorithmInfo
from inference.structures import StructureSelection
from inference.version import __version__

logger = logging.getLogger(__name__)

METHOD = "response"
ORGAN = "liver"
LIVER_ORGAN = re.compile(r"^\s*(liver|hepar)\b", re.IGNORECASE)
"""Organ names (of a :class:`~inference.structures.StructureSelection`) meaning the liver: the registration region."""
INTENDED_USE = (
    "Research use: change of liver-metastasis radiomics between a baseline and an on-treatment CT, with "
    "RECIST 1.1-like and volumetric comparators. Not a diagnosis."
)


class NoLesionError(InputError):
    """Neither time point has a segmented lesion: there is nothing to compare."""


@dataclass(frozen=True, eq=False)
class _TimePointData:
    """One time point as the response method sees it: the loaded study, its liver and organs."""

    study: LoadedStudy
    liver: np.ndarray | None
    problems: tuple[str, ...]
    organs: tuple[tuple[str, np.ndarray], ...] = ()
    """Organ structures (name, mask): a lesion lying in one of them is assigned to it (RECIST per organ)."""

    @property
    def volume(self) -> CTVolume:
        """The time point's CT volume."""
        return self.study.volume

    @property
    def lesions(self) -> tuple[StudyLesion, ...]:
        """The time point's lesions (tracking UIDs as every method derives them)."""
        return self.study.lesions

    def organ_of(self, lesion: Lesion) -> str:
        """The organ holding most of ``lesion``; the liver when no organ was segmented (M5: liver metastases)."""
        best, overlap = ORGAN, 0
        for name, mask in self.organs:
            inside = int(np.count_nonzero(mask[lesion.bbox] & lesion.mask[lesion.bbox]))
            if inside * 2 > lesion.voxel_count and inside > overlap:
                best, overlap = name, inside
        return best


def run_response(
    baseline_ct_paths: Sequence[Path],
    baseline_seg_path: Path,
    followup_ct_paths: Sequence[Path],
    followup_seg_path: Path,
    *,
    model: ResponseSignature | str | os.PathLike[str] | None = None,
    baseline_structures: StructureSelection | None = None,
    followup_structures: StructureSelection | None = None,
    baseline_study: LoadedStudy | None = None,
    followup_study: LoadedStudy | None = None,
) -> ResponseResult:
    """Compare a baseline and a follow-up study of one patient.

    Parameters
    ----------
    baseline_ct_paths, followup_ct_paths
        Files of the portal-venous CT series of each study.
    baseline_seg_path, followup_seg_path
        The SEG or RTSTRUCT drawn on each CT.
    model
        A loaded :class:`ResponseSignature`, the path of a ``response`` model package, or None to report
        the features, deltas and comparators without a score.
    baseline_structures, followup_structures
        Which segments / ROIs of each segmentation are tumours and organs (the node's routing passes
        its choice); None: decided with the default rules of :mod:`inference.structures`.
    baseline_study, followup_study
        Each time point as the worker's study loader already loaded it (with ``allow_no_lesion``),
        read-only; None: loaded here with :func:`~inference.pipelines.study.load_study`.

    Returns
    -------
    ResponseResult

    Raises
    ------
    InputError
        A CT cannot be assembled, a segmentation does not fit its CT, or neither time point has a
        lesion (:class:`NoLesionError`). Lesions present at one time point only are reported as new /
        disappeared, not raised.
    ModelPackageError
        ``model`` is a path to a package that fails verification.
    """
    signature = signature_from(model)
    definition = signature.delta_definition if signature is not None else DEFAULT_DELTA
    base = _time_point_data(
        baseline_study or load_study(baseline_ct_paths, baseline_seg_path, baseline_structures, allow_no_lesion=True),
        "baseline",
    )
    follow = _time_point_data(
        followup_study or load_study(followup_ct_paths, followup_seg_path, followup_structures, allow_no_lesion=True),
        "follow-up",
    )
    if not base.lesions and not follow.lesions:
        raise NoLesionError(
            "neither the baseline nor the follow-up segmentation holds a lesion above the minimum volume: "
            "nothing to compare"
        )
    problems = [*base.problems, *follow.problems]
    provenance: dict[str, str] = {}
    base_measures = _measure(base, "baseline", problems, provenance)
    follow_measures = _measure(follow, "follow-up", problems, provenance)

    region, region_label = _registration_region(base)
    alignment = align(base.volume, follow.volume, region_mask=region, region_label=region_label)
    matching = match_lesions(
        base.volume,
        [item.lesion for item in base.lesions],
        follow.volume,
        [item.lesion for item in follow.lesions],
        alignment=alignment,
    )
    pairs = []
    for match in matching.matches:
        b, f = base_measures[match.baseline_index], follow_measures[match.follow_up_index]
        f = _retrack(f, b.tracking_uid)
        deltas = feature_deltas(b.features, f.features, definition=definition) if b.features and f.features else None
        pairs.append(LesionPair(b.tracking_uid, b, f, deltas, match.dice, match.distance_mm, match.rule))
    new = tuple(follow_measures[j] for j in matching.new)
    gone = tuple(base_measures[i] for i in matching.disappeared)
    for lesion in new:
        problems.append(f"{lesion.tracking_id} is segmented at follow-up only: reported as a new lesion")
    for lesion in gone:
        problems.append(f"{lesion.tracking_id} is segmented at baseline only: reported as disappeared")

    base_features = _patient(base_measures, "baseline", problems)
    follow_features = _patient(follow_measures, "follow-up", problems)
    deltas = (
        feature_deltas(base_features, follow_features, definition=definition)
        if base_features and follow_features
        else None
    )
    recist = assess_response(
        [_recist_input(p.baseline, p.follow_up) for p in pairs] + [_recist_input(g, None) for g in gone],
        new_lesions=len(new),
        new_lesion_volume_ml=sum(n.volume_ml for n in new),
    )
    quality = _quality(base.volume, follow.volume, signature)
    score = None
    if signature is not None:
        if deltas is None:
            problems.append("no signature score: the deltas need lesions with features at both time points")
        else:
            score = signature.score(deltas, quality)
    algorithm = signature.algorithm if signature is not None else _algorithm(provenance)
    provenance.update(_alignment_provenance(alignment))
    return ResponseResult(
        baseline=_time_point(base),
        follow_up=_time_point(follow),
        pairs=tuple(pairs),
        new_lesions=new,
        disappeared_lesions=gone,
        baseline_features=base_features,
        follow_up_features=follow_features,
        deltas=deltas,
        recist=recist,
        alignment=alignment,
        score=score,
        algorithm=algorithm,
        problems=tuple(problems),
        method=METHOD,
        provenance=provenance,
        quality=quality,
    )


def _quality(baseline: CTVolume, follow_up: CTVolume, signature: ResponseSignature | None) -> QualityTier:
    """The pair's quality tier by the package's tier rule (the default rule without a tiered package)."""
    rule = signature.tiers.rule if signature is not None and signature.tiers is not None else TierRule()
    return decide_tier(
        Acquisition.from_headers(baseline.headers, baseline.spacing_xyz[2]),
        Acquisition.from_headers(follow_up.headers, follow_up.spacing_xyz[2]),
        rule,
    )


def _time_point_data(study: LoadedStudy, when: str) -> _TimePointData:
    """The liver (registration region), the organs and the problems of one loaded time point."""
    problems = [f"{when}: {reason}" for reason in study.skipped]
    if study.no_lesion is not None and study.no_lesion.reason != "too-small":
        problems.insert(0, f"{when}: {study.no_lesion}")
    liver: np.ndarray | None = None
    organs: list[tuple[str, np.ndarray]] = []
    for name, label_mask in study.organs:
        is_liver = LIVER_ORGAN.match(name)
        if is_liver:
            liver = label_mask.mask if liver is None else liver | label_mask.mask
        organs.append((ORGAN if is_liver else name, label_mask.mask))
    return _TimePointData(study, liver, tuple(problems), tuple(organs))


def _measure(
    data: _TimePointData, when: str, problems: list[str], provenance: dict[str, str]
) -> list[LesionMeasurement]:
    out = []
    for item in data.lesions:
        lesion, source = item.lesion, item.source
        features: LesionFeatures | None
        try:
            features, lesion_provenance = lesion_features(data.volume, lesion.mask)
            provenance.update(lesion_provenance)
        except FeatureError as exc:
            features = None
            problems.append(f"{when}: {lesion.tracking_id}: features not computed ({exc})")
        out.append(
            LesionMeasurement(
                tracking_id=lesion.tracking_id,
                tracking_uid=item.tracking_uid,
                source=source,
                organ=data.organ_of(lesion),
                volume_ml=lesion.volume_ml,
                longest_axial_diameter_mm=lesion.longest_axial_diameter_mm,
                centroid_mm=lesion.centroid_mm,
                key_slice_index=lesion.key_slice_index,
                key_slice_sop_instance_uid=data.volume.sop_instance_uids[lesion.key_slice_index],
                features=features,
                outline_mm=outline_mm(lesion, data.volume) if source.kind == "rtstruct" else (),
                key_outline_px=key_outline_px(lesion.mask[lesion.key_slice_index]),
            )
        )
    provenance.pop("mask_voxel_count", None)  # per lesion, not per run
    return out


def _retrack(measurement: LesionMeasurement, tracking_uid: str) -> LesionMeasurement:
    """The follow-up measurement of a matched lesion carries the baseline's tracking UID."""
    return replace(measurement, tracking_uid=tracking_uid)


def _patient(measures: Sequence[LesionMeasurement], when: str, problems: list[str]) -> PatientFeatures | None:
    with_features = [m.features for m in measures if m.features is not None]
    if not with_features:
        if measures:
            problems.append(f"{when}: no lesion has features: no patient-level features")
        return None
    return patient_features(with_features)


def _recist_input(baseline: LesionMeasurement, follow_up: LesionMeasurement | None) -> MeasuredLesion:
    return MeasuredLesion(
        lesion_id=baseline.tracking_id,
        organ=baseline.organ,
        baseline_diameter_mm=baseline.longest_axial_diameter_mm,
        baseline_volume_ml=baseline.volume_ml,
        follow_up_diameter_mm=None if follow_up is None else follow_up.longest_axial_diameter_mm,
        follow_up_volume_ml=None if follow_up is None else follow_up.volume_ml,
    )


def _registration_region(data: _TimePointData) -> tuple[np.ndarray | None, str]:
    if data.liver is not None and data.liver.any():
        return data.liver, "liver"
    if not data.lesions:
        return None, "whole CT"
    region = np.zeros(data.volume.shape, dtype=bool)
    for item in data.lesions:
        region |= item.lesion.mask
    return region, "lesions"


def _time_point(data: _TimePointData) -> TimePoint:
    return TimePoint(
        study_instance_uid=data.volume.study_instance_uid,
        ct_series_instance_uid=data.volume.series_instance_uid,
        frame_of_reference_uid=data.volume.frame_of_reference_uid,
        segmentation=data.study.masks[0].source if data.study.masks else None,
        lesion_count=len(data.lesions),
    )


def _algorithm(provenance: dict[str, str]) -> AlgorithmInfo:
    param_hash = provenance.get("parameter_hash", "unknown")[:8]
    return AlgorithmInfo(
        name="pacs-agent response",
        version=f"{__version__}+params.{param_hash}",
        validation_status="RESEARCH",
        weights_sha256=None,
        intended_use=INTENDED_USE,
    )


def _alignment_provenance(alignment: Alignment) -> dict[str, str]:
    out = {
        "alignment_method": alignment.method,
        "matching": f"Dice >= {MIN_DICE:g}, then centroid distance <= {MAX_DISTANCE_MM:g} mm (Hungarian)",
    }
    if alignment.method == "rigid-registration":
        out.update(
            {
                "registration_region": alignment.region,
                "registration_margin_mm": f"{REGION_MARGIN_MM:g}",
                "registration_start": alignment.start,
                "registration_rotation_deg": f"{alignment.rotation_degrees:.2f}",
                "registration_translation_mm": ",".join(f"{v:.2f}" for v in alignment.translation_mm),
                "registration_mattes_mi": f"{alignment.metric_start:.4f} -> {alignment.metric_final:.4f}",
                "registration_seconds": f"{alignment.seconds:.2f}",
            }
        )
    return out
