"""``pacs-agent radiomics``: pyradiomics features of one segment of a DICOM CT, as JSON (research use).

The features describe the whole mask of the chosen segment / ROI (all its lesions together, as
pyradiomics sees a label map); ``--per-lesion`` adds one feature set per lesion (3D connected
component, 26-connectivity). Feature names are pyradiomics' own (``original_shape_VoxelVolume``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inference.errors import InputError, PacsAgentError
from inference.imaging.lesions import find_lesions
from inference.imaging.masks import (
    LabelMask,
    SegmentationError,
    default_structures,
    load_segmentation,
    read_segmentation,
)
from inference.imaging.volume import CTVolume, load_ct_series
from inference.radiomics.features import FeatureSet, compute_features
from inference.version import __version__

EXIT_OK, EXIT_ERROR = 0, 1


class RadiomicsCliError(InputError):
    """The command's inputs do not fit together (no such segment, empty CT folder, ...)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacs-agent radiomics",
        description="Compute pyradiomics features of one segment (DICOM SEG) or ROI (RTSTRUCT) on its DICOM CT "
        "series and write them as JSON: {features: {name: value}, provenance: {...}}. Research use.",
    )
    parser.add_argument("--ct", type=Path, required=True, help="folder holding the files of one CT series")
    parser.add_argument("--seg", type=Path, required=True, help="DICOM SEG or RTSTRUCT file drawn on that CT")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--label",
        type=int,
        help="segment number (SEG) or ROI number (RTSTRUCT); default: the one tumour structure (e.g. the GTV "
        "among BODY, organs and planning volumes), chosen by the node's default rules",
    )
    which.add_argument("--roi", help="segment label (SEG) or ROI name (RTSTRUCT)")
    parser.add_argument("--params", type=Path, help="pyradiomics parameter file (default: the node's default)")
    parser.add_argument("--per-lesion", action="store_true", help="also one feature set per connected lesion")
    parser.add_argument(
        "--min-lesion-ml", type=float, default=0.05, help="with --per-lesion: ignore smaller lesions (default 0.05)"
    )
    parser.add_argument("--phase", help='phase of a multi-phase CT series, e.g. "AcquisitionNumber=2"')
    parser.add_argument("--out", required=True, help='output JSON file ("-" for standard output)')
    return parser


def ct_files(folder: Path) -> list[Path]:
    """Files of a CT series folder (not recursive; hidden files and DICOMDIR skipped).

    Raises
    ------
    RadiomicsCliError
        The folder does not exist or holds no files.
    """
    if not folder.is_dir():
        raise RadiomicsCliError(f"CT folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR")
    if not files:
        raise RadiomicsCliError(f"CT folder {folder} holds no files")
    return files


def select_segment(
    masks: Sequence[LabelMask],
    *,
    label: int | None = None,
    roi: str | None = None,
    tumours: Sequence[int] = (),
) -> LabelMask:
    """Pick one segment / ROI by number or by name; when neither is given, the only one, else the only tumour.

    ``tumours`` are the numbers of the tumour structures (:func:`inference.structures.select_structures`).

    Raises
    ------
    RadiomicsCliError
        No such segment, or several and none chosen.
    SegmentationError
        The chosen segment cannot be used (empty, off the volume, ...).
    """
    listing = ", ".join(f"{m.source.number} ({m.source.label})" for m in masks)
    if label is not None:
        chosen = [m for m in masks if m.source.number == label]
        what = f"number {label}"
    elif roi is not None:
        chosen = [m for m in masks if m.source.label == roi]
        what = f"name {roi!r}"
    elif len(masks) == 1:
        chosen, what = list(masks), ""
    elif len(tumours) == 1:
        chosen, what = [m for m in masks if m.source.number == tumours[0]], f"number {tumours[0]}"
    else:
        which = f"{len(tumours)} of them look like tumours" if tumours else "none of them looks like a tumour"
        raise RadiomicsCliError(
            f"the segmentation holds {len(masks)} segments/ROIs ({listing}) and {which}; "
            "choose one with --label or --roi"
        )
    if not chosen:
        raise RadiomicsCliError(f"the segmentation has no segment/ROI with {what}; it has: {listing}")
    if len(chosen) > 1:
        raise RadiomicsCliError(f"{len(chosen)} segments/ROIs have the {what}; choose one with --label")
    mask = chosen[0]
    if not mask.ok:
        raise SegmentationError(str(mask.problem))
    return mask


def radiomics_report(
    ct_paths: Sequence[Path],
    segmentation: Path,
    *,
    label: int | None = None,
    roi: str | None = None,
    params: Path | None = None,
    per_lesion: bool = False,
    min_lesion_ml: float = 0.05,
    phase: str | None = None,
) -> dict[str, Any]:
    """Features of the whole mask of one segment / ROI (and optionally of each lesion) as a JSON-able dict.

    Parameters
    ----------
    ct_paths
        Files of the CT series.
    segmentation
        DICOM SEG or RTSTRUCT file drawn on that CT.
    label, roi
        Segment / ROI number, or label / name; neither when the object holds one segment.
    params
        pyradiomics parameter file; None for the node's default.
    per_lesion
        Add ``lesions``: one entry per 3D connected component (26-connectivity) with its features.
    min_lesion_ml
        Smallest lesion reported with ``per_lesion``.
    phase
        Phase key of a multi-phase series (see ``inference.imaging.volume.split_phases``).

    Returns
    -------
    dict
        ``{"features": {name: value}, "provenance": {...}}`` (+ ``"lesions": [...]``). Values
        that are not finite become None.

    Raises
    ------
    InputError
        The CT, the segmentation, the segment choice or the features cannot be computed.
    """
    volume = load_ct_series(ct_paths, phase=phase)
    dataset = read_segmentation(segmentation)
    masks = load_segmentation(dataset, volume)
    tumours: tuple[int, ...] = ()
    if label is None and roi is None:
        tumours = default_structures(dataset)[0].tumours
    chosen = select_segment(masks, label=label, roi=roi, tumours=tumours)
    whole = compute_features(volume, chosen.mask, params=params)
    report: dict[str, Any] = {
        "features": _finite(whole.features),
        "provenance": _provenance(whole, volume, chosen, phase),
    }
    if per_lesion:
        lesions = []
        for lesion in find_lesions(chosen, volume, min_volume_ml=min_lesion_ml):
            features = compute_features(volume, lesion.mask, params=params)
            lesions.append(
                {
                    "tracking_id": lesion.tracking_id,
                    "voxel_count": lesion.voxel_count,
                    "volume_ml": lesion.volume_ml,
                    "centroid_mm": list(lesion.centroid_mm),
                    "features": _finite(features.features),
                }
            )
        report["lesions"] = lesions
    return report


def _finite(features: dict[str, float]) -> dict[str, float | None]:
    return {name: (value if math.isfinite(value) else None) for name, value in features.items()}


def _provenance(features: FeatureSet, volume: CTVolume, mask: LabelMask, phase: str | None) -> dict[str, Any]:
    provenance: dict[str, Any] = dict(features.provenance)
    provenance["settings"] = json.loads(provenance["settings"])
    provenance.update(
        {
            "pacs_agent_version": __version__,
            "mask": "whole segment (all lesions of the segment/ROI together)",
            "ct_series_instance_uid": volume.series_instance_uid,
            "frame_of_reference_uid": volume.frame_of_reference_uid,
            "segmentation_sop_instance_uid": mask.source.sop_instance_uid,
            "segmentation_kind": mask.source.kind,
            "segment_number": mask.source.number,
            "segment_label": mask.source.label,
        }
    )
    if phase is not None:
        provenance["phase"] = phase
    return provenance


def _parameter_errors() -> tuple[type[BaseException], ...]:
    """Exceptions pyradiomics raises for an invalid or unreadable parameter file."""
    errors: list[type[BaseException]] = [FileNotFoundError]
    try:
        from pykwalify.errors import PyKwalifyException

        errors.append(PyKwalifyException)
    except ImportError:  # pragma: no cover - pyradiomics depends on pykwalify
        pass
    try:
        from ruamel.yaml.error import YAMLError

        errors.append(YAMLError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pacs-agent radiomics``.

    Parameters
    ----------
    argv
        Arguments after ``radiomics``; default ``sys.argv[1:]``.

    Returns
    -------
    int
        0 on success; 1 when the inputs cannot be used (message on stderr); 2 on invalid arguments.
    """
    args = _parser().parse_args(argv)
    try:
        if args.params is not None and not args.params.is_file():
            raise RadiomicsCliError(f"parameter file {args.params} does not exist")
        report = radiomics_report(
            ct_files(args.ct),
            args.seg,
            label=args.label,
            roi=args.roi,
            params=args.params,
            per_lesion=args.per_lesion,
            min_lesion_ml=args.min_lesion_ml,
            phase=args.phase,
        )
    except PacsAgentError as exc:
        print(f"pacs-agent radiomics: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except _parameter_errors() as exc:
        print(f"pacs-agent radiomics: invalid parameter file {args.params}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as exc:  # e.g. an empty mask handed to pyradiomics
        print(f"pacs-agent radiomics: {exc}", file=sys.stderr)
        return EXIT_ERROR
    text = json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n"
    if args.out == "-":
        sys.stdout.write(text)
        return EXIT_OK
    try:
        Path(args.out).write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"pacs-agent radiomics: cannot write {args.out}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK
