"""Training data: DICOM studies + a labels CSV (or a features CSV) -> per-lesion method inputs.

**Studies.** Any folder tree of DICOM files. Headers are read to group the files: CT images by
series, and every SEG / RTSTRUCT paired with the CT series it references (a study with one CT
series and an unreferencing segmentation is paired by study). Per study one pair is used, a SEG
before an RTSTRUCT. Folder names do not matter.

**Labels CSV.** One row per study (or per lesion): ``patient_id``, ``study_uid``, one column per
label (``1`` / ``0``; also ``mutant`` / ``wild type``, ``yes`` / ``no``, ``true`` / ``false``,
``positive`` / ``negative``; empty = unknown), optional ``age`` (years), ``sex`` (M / F),
``smoking`` (yes / no / current / former / never) and optional ``lesion``: when given the row
applies to that lesion only, numbered 1, 2, ... over the study's segments in segment order and,
within a segment, largest lesion first (``find_lesions`` order). Covariates missing from the CSV
are read from the CT header (PatientAge or PatientBirthDate + StudyDate; PatientSex).

**Features CSV** (radiomics comparator only): the same id / label columns plus one column per
radiomic feature: the pyradiomics-named columns, or those chosen explicitly (names, prefixes, a
regex); see :mod:`inference.training.columns` - another label's column is never a feature.

Every lesion becomes a :class:`LesionCase`; its method input is computed by
:func:`method_inputs` from the package ``[input]`` parameters, the same function evaluation and
inference use. Logs count studies and lesions; they never name a patient or a folder.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from inference.errors import InputError
from inference.imaging.lesions import find_lesions
from inference.imaging.masks import (
    RTSTRUCT_STORAGE,
    SEG_STORAGE,
    load_segmentation,
    phase_of_segmentation,
    referenced_series_uids,
)
from inference.imaging.roi import VIEW_NAMES, m1_input, m1_roi_set, m2_input, m3_input, m4_input, peritumoral_ring
from inference.imaging.volume import CTVolume, load_ct_series
from inference.networks.m2_multiview import Covariates
from inference.pipelines.m2_egfr_kras import covariates_from_header
from inference.training.columns import ColumnSelection, select_feature_columns

__all__ = [
    "DEFAULT_INPUTS",
    "M4_RADIOMICS_SETTINGS",
    "REGIONS",
    "CaseSet",
    "LabelRecord",
    "LesionCase",
    "StudyFiles",
    "TrainingDataError",
    "build_caseset",
    "index_studies",
    "iter_lesions",
    "method_inputs",
    "parse_label",
    "read_features_csv",
    "read_labels_csv",
    "resolve_input_spec",
    "write_features_csv",
]

logger = logging.getLogger(__name__)

REGIONS = ("tumour", "peritumoral")
"""Radiomics regions: the lesion, and the 3 mm ring around it (M4)."""

DEFAULT_INPUTS: dict[str, dict[str, Any]] = {
    "m1": {"roi_set": "A2", "shape": [80, 80], "margin_px": 10, "order": 3, "square": False},
    "m2": {"shape": [9, 299, 299], "cube_mm": 64.0, "spacing_mm": 1.0, "order": 3},
    "m3": {
        "shape": [128, 128],
        "area_fraction": 0.4,
        "opening_radius_px": 1,
        "border_mm": 10.0,
        "window_centre": 40.0,
        "window_width": 400.0,
        "order": 1,
    },
    "m4": {"shape": [160, 160], "ring_mm": 3.0},
    "radiomics": {"region": "tumour"},
}
"""The papers' input settings per method (METHODS.md); a training config overrides single keys.

M1: the paper's A2 set (ROI + 20 pixels in all, 10 per side, 80 x 80); ``roi_set = "A1"`` / ``"A3"``
/ ``"ROI"`` picks another of the paper's sets (see :func:`resolve_input_spec`).
"""


M4_RADIOMICS_SETTINGS: dict[str, Any] = {
    "setting": {"binWidth": 25, "label": 1, "additionalInfo": True, "minimumROIDimensions": 2, "padDistance": 5},
    "imageType": {"Original": {}, "Wavelet": {}},
    "featureClass": dict.fromkeys(("shape", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")),
}
"""M4's default radiomics parameters (``config/radiomics/m4_deep_radscore.yaml``): the paper's 851 features
per ROI (Original: 14 shape + 93 first-order and texture; 8 wavelet images x 93)."""


def resolve_input_spec(method: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A method's ``[input]`` parameters: :data:`DEFAULT_INPUTS` with a configuration's keys on top.

    M1: ``roi_set`` (``"ROI"``, ``"A1"``, ``"A2"``, ``"A3"``, :data:`~inference.imaging.roi.M1_ROI_SETS`)
    sets ``margin_px`` (per side) and ``shape`` unless the configuration gives them too; a
    ``margin_px`` or ``shape`` that differs from the named set makes ``roi_set = "custom"``. The
    resolved ``margin_px`` is always written into the package, so inference crops as training did.

    Raises
    ------
    ValueError
        An unknown ``roi_set``.
    """
    given = dict(overrides or {})
    spec = {**DEFAULT_INPUTS[method], **given}
    if method == "m1":
        name = str(given.get("roi_set", DEFAULT_INPUTS["m1"]["roi_set"]))
        if name != "custom":
            margin, shape = m1_roi_set(name)
            spec["margin_px"] = int(given.get("margin_px", margin))
            spec["shape"] = [int(v) for v in given.get("shape", shape)]
            if spec["margin_px"] != margin or spec["shape"] != list(shape):
                name = "custom"
        spec["roi_set"] = name
    return spec


_POSITIVE = {"1", "1.0", "mutant", "mut", "mutated", "yes", "y", "true", "positive", "pos"}
_NEGATIVE = {"0", "0.0", "wild type", "wildtype", "wild-type", "wt", "no", "n", "false", "negative", "neg"}


class TrainingDataError(InputError):
    """The training data cannot be used as given (missing columns, no usable study, ...)."""


# ------------------------------------------------------------------------------------------ labels


def parse_label(value: str) -> float:
    """``1.0`` / ``0.0`` for a label cell, NaN when empty.

    Raises
    ------
    TrainingDataError
        A value that is neither positive, negative nor empty.
    """
    text = value.strip().lower()
    if not text or text in ("na", "nan", "unknown", "?"):
        return math.nan
    if text in _POSITIVE:
        return 1.0
    if text in _NEGATIVE:
        return 0.0
    raise TrainingDataError(f"label value {value!r} is not 1/0, mutant/wild type, yes/no, true/false or empty")


def _parse_smoking(value: str) -> bool | None:
    text = value.strip().lower()
    if text in ("", "unknown", "na", "?"):
        return None
    if text in ("1", "yes", "y", "true", "current", "former", "smoker", "ex"):
        return True
    if text in ("0", "no", "n", "false", "never", "non-smoker", "nonsmoker"):
        return False
    raise TrainingDataError(f"smoking value {value!r} is not yes/no/current/former/never or empty")


def _parse_age(value: str) -> float | None:
    text = value.strip()
    if not text:
        return None
    try:
        age = float(text)
    except ValueError:
        raise TrainingDataError(f"age {value!r} is not a number of years") from None
    return age if math.isfinite(age) and age >= 0 else None


@dataclass(frozen=True)
class LabelRecord:
    """One row of the labels CSV."""

    patient_id: str
    study_uid: str
    labels: tuple[float, ...]
    lesion: int | None = None
    age: float | None = None
    sex: Literal["M", "F"] | None = None
    smoking: bool | None = None


def _csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise TrainingDataError(f"CSV file {path} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "") for k, v in row.items()} for row in reader]
    return columns, rows


def read_labels_csv(path: str | Path, labels: Sequence[str]) -> list[LabelRecord]:
    """Read a labels CSV.

    Parameters
    ----------
    path
        The CSV file (header row required).
    labels
        Label columns to read, in model output order.

    Returns
    -------
    list of LabelRecord

    Raises
    ------
    TrainingDataError
        Missing columns or unreadable values (the message gives the row number, not the patient).
    """
    path = Path(path)
    columns, rows = _csv_rows(path)
    missing = [c for c in ("patient_id", "study_uid", *labels) if c not in columns]
    if missing:
        raise TrainingDataError(f"{path.name} lacks column(s) {missing}; it has {columns}")
    records = []
    for number, row in enumerate(rows, start=2):
        try:
            lesion = row.get("lesion", "").strip()
            sex = row.get("sex", "").strip().upper()[:1] or None
            records.append(
                LabelRecord(
                    patient_id=row["patient_id"].strip(),
                    study_uid=row["study_uid"].strip(),
                    labels=tuple(parse_label(row[label]) for label in labels),
                    lesion=int(lesion) if lesion else None,
                    age=_parse_age(row.get("age", "")),
                    sex="M" if sex == "M" else "F" if sex == "F" else None,
                    smoking=_parse_smoking(row.get("smoking", "")),
                )
            )
        except (TrainingDataError, ValueError) as exc:
            raise TrainingDataError(f"{path.name} row {number}: {exc}") from None
        if not records[-1].patient_id or not records[-1].study_uid:
            raise TrainingDataError(f"{path.name} row {number}: patient_id and study_uid must not be empty")
    return records


# ----------------------------------------------------------------------------------------- studies


@dataclass(frozen=True)
class StudyFiles:
    """The CT series and segmentation of one study found on disk."""

    study_uid: str
    ct_files: tuple[Path, ...]
    segmentation: Path
    segmentation_kind: str


def index_studies(root: str | Path) -> dict[str, StudyFiles]:
    """Find CT series and their SEG / RTSTRUCT under ``root`` by reading DICOM headers.

    Parameters
    ----------
    root
        Folder searched recursively; non-DICOM files are skipped.

    Returns
    -------
    dict
        Study Instance UID -> :class:`StudyFiles`, for studies with a CT series and a segmentation
        that references it.
    """
    root = Path(root)
    if not root.is_dir():
        raise TrainingDataError(f"studies folder {root} does not exist")
    series: dict[tuple[str, str], list[Path]] = defaultdict(list)
    segs: list[tuple[str, str, Path, set[str]]] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError):
            continue
        study = str(ds.get("StudyInstanceUID", ""))
        sop_class = str(ds.get("SOPClassUID", ""))
        if not study:
            continue
        if sop_class in (SEG_STORAGE, RTSTRUCT_STORAGE):
            kind = "seg" if sop_class == SEG_STORAGE else "rtstruct"
            segs.append((study, kind, path, referenced_series_uids(ds)))
        elif str(ds.get("Modality", "")) == "CT" and "SeriesInstanceUID" in ds:
            series[(study, str(ds.SeriesInstanceUID))].append(path)
    found: dict[str, StudyFiles] = {}
    for study, kind, path, refs in sorted(segs, key=lambda s: (s[0], s[1] != "seg", str(s[2]))):
        if study in found:
            continue
        candidates = [key for key in series if key[0] == study and (key[1] in refs or not refs)]
        if not refs and len(candidates) != 1:
            continue
        if len(candidates) >= 1:
            found[study] = StudyFiles(study, tuple(sorted(series[candidates[0]])), path, kind)
    logger.info("found %d studies with CT and segmentation", len(found))
    return found


@dataclass(frozen=True)
class LesionCase:
    """One labelled lesion."""

    patient_id: str
    study_uid: str
    lesion: int
    labels: tuple[float, ...]
    covariates: Covariates = field(default_factory=Covariates)
    volume_ml: float = math.nan


def _header_covariates(volume_files: Sequence[Path]) -> Covariates:
    """Age and sex from the CT header, read exactly as at inference (one rule for training and use)."""
    return covariates_from_header(pydicom.dcmread(volume_files[0], stop_before_pixels=True))


def iter_lesions(
    studies: Mapping[str, StudyFiles],
    records: Sequence[LabelRecord],
    *,
    min_volume_ml: float = 0.05,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[LesionCase, CTVolume, np.ndarray]]:
    """Load each labelled study once and yield its lesions with their labels.

    Studies in the CSV but not on disk, and studies that fail to load, are skipped with a warning
    (by number and reason, never a patient id or folder name); the rest go on.

    Yields
    ------
    tuple
        ``(case, volume, lesion_mask)``.
    """
    by_study: dict[str, list[LabelRecord]] = defaultdict(list)
    for r in records:
        by_study[r.study_uid].append(r)
    missing = [uid for uid in by_study if uid not in studies]
    if missing:
        logger.warning("%d labelled studies were not found in the studies folder", len(missing))
    todo = [uid for uid in by_study if uid in studies]
    for done, uid in enumerate(todo, start=1):
        files = studies[uid]
        rows = by_study[uid]
        try:
            segmentation = pydicom.dcmread(files.segmentation)
            volume = load_ct_series(
                files.ct_files, choose_phase=functools.partial(phase_of_segmentation, segmentation=segmentation)
            )
            masks = [m for m in load_segmentation(segmentation, volume) if m.ok]
            lesions = [lesion for m in masks for lesion in find_lesions(m, volume, min_volume_ml=min_volume_ml)]
        except InputError as exc:
            logger.warning("study %d of %d was skipped: %s", done, len(todo), exc)
            if progress is not None:
                progress(done, len(todo))
            continue
        header = _header_covariates(files.ct_files)
        study_row = next((r for r in rows if r.lesion is None), None)
        for number, lesion in enumerate(lesions, start=1):
            row = next((r for r in rows if r.lesion == number), study_row)
            if row is None:
                continue
            covariates = Covariates(
                age=row.age if row.age is not None else header.age,
                sex=row.sex if row.sex is not None else header.sex,
                smoking=row.smoking,
            )
            case = LesionCase(row.patient_id, uid, number, row.labels, covariates, lesion.volume_ml)
            yield case, volume, lesion.mask
        if progress is not None:
            progress(done, len(todo))


# ------------------------------------------------------------------------------------ method inputs


def method_inputs(method: str, spec: Mapping[str, Any], volume: CTVolume, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The method input of one lesion, in raw units (HU; M3 grey values), before z-scoring.

    Parameters
    ----------
    method
        ``"m1"`` .. ``"m4"``.
    spec
        The package's ``[input]`` table (:data:`DEFAULT_INPUTS` keys).
    volume
        The CT.
    mask
        The lesion mask on the CT grid.

    Returns
    -------
    dict
        M1 ``image`` (H, W); M2 ``views`` (9, S, S) in :data:`~inference.imaging.roi.VIEW_NAMES` order;
        M3 ``slices`` (n, H, W) in [0, 255]; M4 ``patch`` (H, W) and ``ring`` (the peritumoral mask, 3D).
    """
    ct = volume.array
    spacing = tuple(float(s) for s in volume.spacing_xyz[::-1])
    shape = [int(s) for s in spec["shape"]]
    if method == "m1":
        item = m1_input(
            ct,
            mask,
            None,
            margin_px=int(spec.get("margin_px", 10)),
            size=shape,
            order=int(spec.get("order", 3)),
            square=bool(spec.get("square", False)),
        )
        return {"image": item.image}
    if method == "m2":
        views = m2_input(
            ct,
            mask,
            spacing,
            None,
            cube_mm=float(spec.get("cube_mm", 64.0)),
            spacing_mm=float(spec.get("spacing_mm", 1.0)),
            view_size=shape[1:],
            order=int(spec.get("order", 3)),
        ).views
        return {"views": np.stack([views[name] for name in VIEW_NAMES])}
    if method == "m3":
        slices = m3_input(
            ct,
            mask,
            spacing,
            area_fraction=float(spec.get("area_fraction", 0.4)),
            opening_radius_px=int(spec.get("opening_radius_px", 1)),
            border_mm=float(spec.get("border_mm", 10.0)),
            window_centre=float(spec.get("window_centre", 40.0)),
            window_width=float(spec.get("window_width", 400.0)),
            size=shape,
            order=int(spec.get("order", 1)),
        )
        return {"slices": np.stack([s.image for s in slices])}
    if method == "m4":
        patch = m4_input(ct, mask, spacing, patch_size=shape, ring_mm=float(spec.get("ring_mm", 3.0)))
        return {"patch": patch.patch_hu, "ring": patch.ring_mask}
    raise ValueError(f"method_inputs: unknown method {method!r}")


# ----------------------------------------------------------------------------------------- case set


@dataclass
class CaseSet:
    """Labelled lesions with their method inputs.

    ``arrays`` hold one entry per case along the first axis (M1 ``image``, M2 ``views``, M4
    ``patch``); M3 keeps all slices in ``arrays["slices"]`` with ``slice_owner[i]`` = the case of
    slice ``i``. ``features[region]`` is an (n_cases, n_features) matrix with column names
    ``feature_names[region]`` (radiomics, M4).
    """

    method: str
    labels: tuple[str, ...]
    cases: list[LesionCase]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    slice_owner: np.ndarray | None = None
    features: dict[str, np.ndarray] = field(default_factory=dict)
    feature_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    radiomics_settings: str = ""
    column_selection: ColumnSelection | None = None
    """How the feature columns of a features CSV were chosen (None for DICOM data)."""
    diagnostics: dict[str, str] = field(default_factory=dict)
    """A features CSV's pyradiomics ``diagnostics_Configuration_*`` / ``diagnostics_Versions_*`` values."""

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def y(self) -> np.ndarray:
        """(cases, labels) float array of 0 / 1 / NaN."""
        return np.array([c.labels for c in self.cases], dtype=float).reshape(len(self.cases), len(self.labels))

    @property
    def patients(self) -> list[str]:
        """Patient id of each case."""
        return [c.patient_id for c in self.cases]

    def subset(self, index: Sequence[int] | np.ndarray) -> CaseSet:
        """The cases at ``index`` (in that order), with their arrays, slices and features."""
        idx = np.asarray(index, dtype=int)
        arrays = {k: v[idx] for k, v in self.arrays.items() if k != "slices"}
        owner = None
        if self.slice_owner is not None:
            pieces, owners = [], []
            for new, old in enumerate(idx):
                sel = np.flatnonzero(self.slice_owner == old)
                pieces.append(self.arrays["slices"][sel])
                owners.append(np.full(sel.size, new))
            arrays["slices"] = np.concatenate(pieces) if pieces else self.arrays["slices"][:0]
            owner = np.concatenate(owners) if owners else np.zeros(0, dtype=int)
        return replace(
            self,
            cases=[self.cases[i] for i in idx],
            arrays=arrays,
            slice_owner=owner,
            features={k: v[idx] for k, v in self.features.items()},
        )


def _features(volume: CTVolume, mask: np.ndarray, params: Any) -> tuple[dict[str, float], str]:
    from inference.radiomics.features import compute_features

    result = compute_features(volume, mask, params=params)
    return result.features, result.provenance["settings"]


def build_caseset(
    method: str,
    labels: Sequence[str],
    studies_dir: str | Path,
    labels_csv: str | Path,
    *,
    input_spec: Mapping[str, Any] | None = None,
    regions: Sequence[str] = (),
    radiomics_params: Any = None,
    min_volume_ml: float = 0.05,
    progress: Callable[[int, int], None] | None = None,
) -> CaseSet:
    """Load every labelled lesion of a DICOM folder and compute its method input.

    Parameters
    ----------
    method
        ``"m1"`` .. ``"m4"`` or ``"radiomics"``.
    labels
        Label columns of the CSV, in output order.
    studies_dir, labels_csv
        The data.
    input_spec
        ``[input]`` parameters (default :data:`DEFAULT_INPUTS` of the method).
    regions
        Radiomics regions to compute features for (``"tumour"``, ``"peritumoral"``).
    radiomics_params
        pyradiomics parameters (file path or mapping; None: the node's defaults).
    min_volume_ml
        Lesions smaller than this are ignored.
    progress
        Called with ``(studies done, studies)``.

    Returns
    -------
    CaseSet

    Raises
    ------
    TrainingDataError
        No lesion could be loaded.
    """
    spec = resolve_input_spec(method, input_spec)
    records = read_labels_csv(labels_csv, labels)
    studies = index_studies(studies_dir)
    cases: list[LesionCase] = []
    arrays: dict[str, list[np.ndarray]] = defaultdict(list)
    owners: list[np.ndarray] = []
    rows: dict[str, list[dict[str, float]]] = {r: [] for r in regions}
    settings = ""
    skipped = 0
    for case, volume, mask in iter_lesions(studies, records, min_volume_ml=min_volume_ml, progress=progress):
        try:
            item = method_inputs(method, spec, volume, mask) if method != "radiomics" else {}
            feats = {}
            for region in regions:
                region_mask = mask if region == "tumour" else item.get("ring")
                if region_mask is None:
                    spacing = tuple(float(s) for s in volume.spacing_xyz[::-1])
                    region_mask = peritumoral_ring(mask, spacing, ring_mm=float(spec.get("ring_mm", 3.0)))
                feats[region], settings = _features(volume, region_mask, radiomics_params)
        except (InputError, ValueError) as exc:
            skipped += 1
            logger.warning("a lesion was skipped: %s", exc)
            continue
        for region in regions:
            rows[region].append(feats[region])
        for key, value in item.items():
            if key == "ring":
                continue
            if key == "slices":
                owners.append(np.full(value.shape[0], len(cases)))
            arrays[key].append(value)
        cases.append(case)
    if not cases:
        raise TrainingDataError("no labelled lesion could be loaded (check study UIDs in the labels CSV)")
    if skipped:
        logger.warning("%d lesion(s) skipped", skipped)
    out = CaseSet(method, tuple(labels), cases, radiomics_settings=settings)
    for key, values in arrays.items():
        out.arrays[key] = np.concatenate(values) if key == "slices" else np.stack(values)
    if owners:
        out.slice_owner = np.concatenate(owners)
    for region, dicts in rows.items():
        names = tuple(sorted(dicts[0]))
        out.feature_names[region] = names
        out.features[region] = np.array([[d[n] for n in names] for d in dicts], dtype=float)
    logger.info("loaded %d lesions of %d patients", len(cases), len(set(out.patients)))
    return out


def write_features_csv(cases: CaseSet, path: str | Path, region: str = "tumour") -> Path:
    """Write the ids, labels, covariates and one region's features of a case set as a features CSV.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    names = cases.feature_names[region]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient_id", "study_uid", "lesion", *cases.labels, *names])
        for case, row in zip(cases.cases, cases.features[region], strict=True):
            values = ["" if math.isnan(v) else int(v) for v in case.labels]
            writer.writerow([case.patient_id, case.study_uid, case.lesion, *values, *(repr(float(v)) for v in row)])
    return path


def read_features_csv(
    path: str | Path,
    labels: Sequence[str],
    *,
    features: Sequence[str] | None = None,
    prefixes: Sequence[str] | None = None,
    regex: str | None = None,
    ignore: Sequence[str] = (),
    region: str = "tumour",
) -> CaseSet:
    """Read a features CSV into a radiomics :class:`CaseSet`.

    Parameters
    ----------
    path
        The CSV (``patient_id``, ``study_uid``, optional ``lesion``, labels, features).
    labels
        Label columns.
    features, prefixes, regex
        Explicit feature choice (exact names, name prefixes, a regular expression); default: the
        pyradiomics-named columns, and any other unknown column is an error
        (:func:`inference.training.columns.select_feature_columns`). A column that looks like a label
        (another mutation) is never a feature.
    ignore
        Non-feature columns to tolerate in the default mode.
    region
        Region name the features describe.

    Returns
    -------
    CaseSet
        With ``column_selection`` (what was chosen, what was skipped as label-like) and the CSV's
        pyradiomics ``diagnostics`` (first row) when it has them.

    Raises
    ------
    TrainingDataError
        Missing columns, non-numeric feature values.
    FeatureColumnError
        The feature columns cannot be chosen as asked (see ``select_feature_columns``).
    """
    path = Path(path)
    columns, rows = _csv_rows(path)
    missing = [c for c in ("patient_id", "study_uid") if c not in columns]
    if missing:
        raise TrainingDataError(f"{path.name} lacks column(s) {missing}")
    selection = select_feature_columns(
        columns,
        labels,
        feature_columns=features,
        feature_prefixes=prefixes,
        feature_regex=regex,
        ignore_columns=ignore,
        source=path.name,
    )
    names = list(selection.features)
    cases: list[LesionCase] = []
    matrix: list[list[float]] = []
    for number, row in enumerate(rows, start=2):
        try:
            values = [float(row[n]) for n in names]
            lesion = int(row.get("lesion") or 0) or len(cases) + 1
            label_values = tuple(parse_label(row[label]) for label in labels)
        except ValueError as exc:
            raise TrainingDataError(f"{path.name} row {number}: {exc}") from None
        cases.append(LesionCase(row["patient_id"].strip(), row["study_uid"].strip(), lesion, label_values))
        matrix.append(values)
    if not cases:
        raise TrainingDataError(f"{path.name} has no rows")
    out = CaseSet("radiomics", tuple(labels), cases, column_selection=selection)
    out.diagnostics = {
        c: rows[0][c] for c in columns if c.startswith(("diagnostics_Configuration_", "diagnostics_Versions_"))
    }
    out.features[region] = np.array(matrix, dtype=float)
    out.feature_names[region] = tuple(names)
    return out
