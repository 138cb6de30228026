"""``pacs-agent phantom``: write a synthetic study (and optionally its follow-up) to a folder."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from inference.phantom.study import PhantomStudy, generate_follow_up, generate_study


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacs-agent phantom",
        description="Write a synthetic portal-venous abdominal CT study with liver lesions, a DICOM SEG and "
        "an RTSTRUCT (deterministic for a seed).",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random (default 0)")
    parser.add_argument("--lesions", type=int, default=3, help="number of liver lesions (default 3)")
    parser.add_argument("--slices", type=int, default=60, help="number of axial slices (default 60)")
    parser.add_argument("--size", type=int, default=256, help="rows and columns of each slice (default 256)")
    parser.add_argument(
        "--segmentation",
        choices=("seg", "rtstruct", "both", "none"),
        default="both",
        help="segmentation objects to write (default both)",
    )
    parser.add_argument(
        "--clinical-structures",
        action="store_true",
        help="segmentations like clinical exports: SEG Liver, Spleen, lesions; RTSTRUCT BODY, Liver, Spleen, "
        "GTV, CTV_Liver, PTV_Liver (default: the lesions only)",
    )
    parser.add_argument(
        "--follow-up",
        action="store_true",
        help="also write an 8-week follow-up with shrunken, homogenised lesions: OUT/baseline and OUT/follow-up",
    )
    return parser


def _describe(label: str, study: PhantomStudy) -> None:
    print(f"{label}: {study.study_dir}")
    print(f"  StudyInstanceUID {study.study_instance_uid}  StudyDate {study.study_date.isoformat()}")
    print(
        f"  CT: {len(study.ct_files)} files in {study.ct_files[0].parent}  "
        f"(SeriesInstanceUID {study.ct_series_instance_uid})"
    )
    if study.seg_file:
        print(f"  SEG: {study.seg_file}")
        _describe_structures(study, "seg", "segment")
    if study.rtstruct_file:
        print(f"  RTSTRUCT: {study.rtstruct_file}")
        _describe_structures(study, "rtstruct", "ROI")
    for number, lesion in enumerate(study.lesions, start=1):
        centre = ", ".join(f"{v:.1f}" for v in lesion.centre_mm)
        print(
            f"  lesion {number}: {lesion.volume_ml:.2f} ml, mean {lesion.mean_hu:.0f} HU, {lesion.texture}, "
            f"centre ({centre}) mm"
        )


def _describe_structures(study: PhantomStudy, kind: str, noun: str) -> None:
    for structure in study.structures:
        if structure.kind == kind:
            numbers = ", ".join(map(str, structure.lesions))
            lesions = f" (lesion{'s' if len(structure.lesions) > 1 else ''} {numbers})" if structure.lesions else ""
            print(f'    {noun} {structure.number} "{structure.name}": {structure.role}{lesions}')


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pacs-agent phantom``.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments after ``phantom``; default ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit code: 0 on success, 2 on invalid arguments.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        baseline_dir = args.out / "baseline" if args.follow_up else args.out
        study = generate_study(
            baseline_dir,
            seed=args.seed,
            lesions=args.lesions,
            slices=args.slices,
            rows=args.size,
            columns=args.size,
            segmentation=args.segmentation,
            clinical_structures=args.clinical_structures,
        )
        _describe("baseline" if args.follow_up else "study", study)
        if args.follow_up:
            follow_up = generate_follow_up(study, args.out / "follow-up")
            _describe("follow-up", follow_up)
    except ValueError as exc:
        parser.error(str(exc))  # exits with code 2
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0
