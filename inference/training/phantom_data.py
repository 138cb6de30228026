"""Phantom cohorts with planted labels: synthetic "patients" whose label is visible in the image.

Each patient is one phantom study (``inference.phantom.generate_study``: portal-venous abdominal
CT, liver lesions, DICOM SEG or RTSTRUCT). Each label is tied to one image property of all the
patient's lesions, and each property is assigned independently and balanced over the cohort (a
random half of the patients has it):

- ``texture``: the lesions carry the phantom's ``"coarse"`` texture (spatially correlated noise,
  SD 30 HU, correlation length 2.5 mm) instead of the ``"smooth"`` one (SD 4 HU);
- ``attenuation``: the lesion voxels are :data:`ATTENUATION_OFFSET_HU` lower (written into the CT
  pixel data after generation);
- ``rim``: the outermost in-plane voxel ring of each lesion slice is :data:`RIM_OFFSET_HU` higher
  (an enhancing rim).

A working pipeline learns such a label almost perfectly, so a held-out AUC >= 0.95 shows that data
loading, method inputs, training, packaging and inference are wired correctly. It says nothing
about any real mutation. The cohort is written as DICOM studies plus a labels CSV in the format
real data uses (:mod:`inference.training.datasets`), so training reads it through the same code.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "ATTENUATION_OFFSET_HU",
    "PROPERTIES",
    "RIM_OFFSET_HU",
    "PhantomCohort",
    "PhantomCohortSpec",
    "cohort_folder",
    "make_phantom_cohort",
]

logger = logging.getLogger(__name__)

ATTENUATION_OFFSET_HU = -60
"""HU added to every lesion voxel of patients with the ``attenuation`` property."""
RIM_OFFSET_HU = 100
"""HU added to the outer in-plane voxel ring of each lesion slice for the ``rim`` property."""
PROPERTIES: dict[str, str] = {
    "texture": "coarse lesion texture (correlated noise SD 30 HU, 2.5 mm) instead of smooth (SD 4 HU)",
    "attenuation": f"lesion attenuation {ATTENUATION_OFFSET_HU:+d} HU",
    "rim": f"enhancing rim: the outer in-plane voxel ring of each lesion slice {RIM_OFFSET_HU:+d} HU",
}
"""Image properties a label can be planted as, and what each one does."""
_FORMAT = 2


@dataclass(frozen=True)
class PhantomCohortSpec:
    """What a phantom cohort holds; the same spec always gives the same files.

    Parameters
    ----------
    planted
        Label -> image property (a key of :data:`PROPERTIES`); labels sharing a property are equal.
    patients
        Number of patients (= studies).
    seed
        Cohort seed; patient ``i`` is phantom seed ``seed * 1_000_000 + i``.
    lesions
        Liver lesions per patient.
    rows, slices, pixel_spacing_mm, slice_thickness_mm, lesion_scale
        Phantom geometry (see ``inference.phantom.generate_study``).
    segmentation
        ``"seg"``, ``"rtstruct"`` or ``"alternate"`` (even patients SEG, odd RTSTRUCT).
    """

    planted: Mapping[str, str]
    patients: int = 120
    seed: int = 0
    lesions: int = 2
    rows: int = 128
    slices: int = 32
    pixel_spacing_mm: float = 2.5
    slice_thickness_mm: float = 2.5
    lesion_scale: float = 1.0
    segmentation: Literal["seg", "rtstruct", "alternate"] = "alternate"

    def __post_init__(self) -> None:
        if not self.planted:
            raise ValueError("a phantom cohort needs at least one planted label")
        unknown = sorted(set(self.planted.values()) - set(PROPERTIES))
        if unknown:
            raise ValueError(f"unknown planted propert(y/ies) {unknown}; known: {sorted(PROPERTIES)}")
        if self.patients < 4:
            raise ValueError(f"a phantom cohort needs at least 4 patients, got {self.patients}")
        if self.lesions < 1:
            raise ValueError(f"lesions must be >= 1, got {self.lesions}")
        if self.segmentation not in ("seg", "rtstruct", "alternate"):
            raise ValueError(f'segmentation must be "seg", "rtstruct" or "alternate", got {self.segmentation!r}')
        object.__setattr__(self, "planted", dict(self.planted))

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any]) -> PhantomCohortSpec:
        """Build from a TOML table (``[data.phantom]``); unknown keys are refused."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"[data.phantom] has unknown key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**dict(table))

    def as_dict(self) -> dict[str, Any]:
        """Plain values (for ``model.toml`` and the cache marker)."""
        return {**asdict(self), "planted": dict(self.planted)}

    @property
    def properties(self) -> tuple[str, ...]:
        """The distinct planted properties, in first-use order."""
        return tuple(dict.fromkeys(self.planted.values()))

    def describe(self) -> str:
        """One paragraph saying exactly what the phantoms are (``[training_data] description``)."""
        planted = "; ".join(f"{label} = {PROPERTIES[prop]}" for label, prop in self.planted.items())
        return (
            f"{self.patients} synthetic phantom patients (seed {self.seed}), one study each, made by the pacs-agent "
            f"phantom generator: portal-venous abdominal CT {self.rows} x {self.rows} x {self.slices} voxels "
            f"({self.pixel_spacing_mm} mm pixels, {self.slice_thickness_mm} mm slices) with {self.lesions} liver "
            f"lesion(s) each, segmented by DICOM SEG / RTSTRUCT. Each label is planted in the image of all the "
            f"patient's lesions, independently and balanced over patients: {planted}. Mutant (1) = the property "
            f"present. No real patient data; the labels have no biological meaning."
        )


@dataclass(frozen=True)
class PhantomCohort:
    """A written cohort: the folder of studies, the labels CSV, and the planted truth per patient."""

    spec: PhantomCohortSpec
    studies_dir: Path
    labels_csv: Path
    truth: tuple[dict[str, Any], ...] = field(repr=False)


def _assignments(spec: PhantomCohortSpec) -> dict[str, np.ndarray]:
    """A balanced, independent 0 / 1 assignment over patients for each property."""
    out = {}
    for j, prop in enumerate(spec.properties):
        rng = np.random.default_rng([spec.seed, 7919, j])
        values = np.array([1] * math.ceil(spec.patients / 2) + [0] * (spec.patients // 2))
        out[prop] = rng.permutation(values)
    return out


def _age(birth: Any, seen: Any) -> float:
    return float(seen.year - birth.year - ((seen.month, seen.day) < (birth.month, birth.day)))


def _modify_lesions(study: Any, attenuation: bool, rim: bool) -> None:
    """Write the attenuation offset and / or the rim into the CT files of a phantom study."""
    import pydicom
    from scipy import ndimage

    from inference.phantom import label_volume

    labels = label_volume(study)  # k = 0 is the most inferior slice; ct_files[0] the most superior
    n = len(study.ct_files)
    cross = ndimage.generate_binary_structure(2, 1)
    for i, path in enumerate(study.ct_files):
        mask = labels[n - 1 - i] > 0
        if not mask.any():
            continue
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        stored = pixels.astype(np.int32)
        slope = float(getattr(ds, "RescaleSlope", 1.0))
        delta = np.zeros(stored.shape, dtype=np.float64)
        if attenuation:
            delta[mask] += ATTENUATION_OFFSET_HU
        if rim:
            edge = mask & ~ndimage.binary_erosion(mask, structure=cross)
            delta[edge] += RIM_OFFSET_HU
        info = np.iinfo(pixels.dtype)
        stored = np.clip(stored + np.rint(delta / slope).astype(np.int32), info.min, min(info.max, 4095))
        ds.PixelData = stored.astype(pixels.dtype).tobytes()
        ds.save_as(path, enforce_file_format=True)


def cohort_folder(work_dir: str | Path, spec: PhantomCohortSpec) -> Path:
    """The folder under ``work_dir`` that holds the cohort of ``spec`` (named by a hash of the spec)."""
    text = json.dumps({"format": _FORMAT, "spec": spec.as_dict(), "properties": PROPERTIES}, sort_keys=True)
    return Path(work_dir) / f"phantom-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def make_phantom_cohort(
    out_dir: str | Path,
    spec: PhantomCohortSpec,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> PhantomCohort:
    """Write (or reuse) a phantom cohort: ``studies/<patient>/`` and ``labels.csv``.

    A folder already holding a complete cohort of the same spec (``cohort.json``) is reused
    as it is; a folder holding anything else is refused.

    Parameters
    ----------
    out_dir
        Cohort folder.
    spec
        What to generate.
    progress
        Called with ``(done, total)`` after each patient.

    Returns
    -------
    PhantomCohort
    """
    from inference.phantom import generate_study

    root = Path(out_dir)
    marker = root / "cohort.json"
    studies_dir, labels_csv = root / "studies", root / "labels.csv"
    wanted = {"format": _FORMAT, "spec": spec.as_dict(), "properties": PROPERTIES}
    if marker.is_file():
        data = json.loads(marker.read_text(encoding="utf-8"))
        if {k: data.get(k) for k in wanted} == wanted:
            logger.info("reusing the phantom cohort in %s", root)
            return PhantomCohort(spec, studies_dir, labels_csv, tuple(data["truth"]))
        raise ValueError(f"{root} holds a different phantom cohort; use another folder")
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} is not empty and holds no phantom cohort; use another folder")
    studies_dir.mkdir(parents=True, exist_ok=True)
    assignment = _assignments(spec)
    truth: list[dict[str, Any]] = []
    for i in range(spec.patients):
        props = {p: int(assignment[p][i]) for p in spec.properties}
        kind = spec.segmentation if spec.segmentation != "alternate" else ("seg" if i % 2 == 0 else "rtstruct")
        patient_id = f"PHANTOM-{spec.seed:03d}-{i:04d}"
        study = generate_study(
            studies_dir / f"patient-{i:04d}",
            seed=spec.seed * 1_000_000 + i,
            lesions=spec.lesions,
            rows=spec.rows,
            columns=spec.rows,
            slices=spec.slices,
            pixel_spacing_mm=spec.pixel_spacing_mm,
            slice_thickness_mm=spec.slice_thickness_mm,
            segmentation=kind,
            patient_id=patient_id,
            lesion_texture="coarse" if props.get("texture") else "smooth",
            lesion_scale=spec.lesion_scale,
        )
        if props.get("attenuation") or props.get("rim"):
            _modify_lesions(study, bool(props.get("attenuation")), bool(props.get("rim")))
        truth.append(
            {
                "patient_id": patient_id,
                "study_uid": study.study_instance_uid,
                "labels": {label: props[prop] for label, prop in spec.planted.items()},
                "properties": props,
                "age": _age(study.patient_birth_date, study.study_date),
                "sex": study.patient_sex,
                "lesions": len(study.lesions),
            }
        )
        if progress is not None:
            progress(i + 1, spec.patients)
    with labels_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient_id", "study_uid", *spec.planted, "age", "sex", "smoking"])
        for t in truth:
            writer.writerow(
                [
                    t["patient_id"],
                    t["study_uid"],
                    *(t["labels"][label] for label in spec.planted),
                    t["age"],
                    t["sex"],
                    "",
                ]
            )
    marker.write_text(json.dumps({**wanted, "truth": truth}, indent=1), encoding="utf-8")
    logger.info("wrote a phantom cohort of %d patients to %s", spec.patients, root)
    return PhantomCohort(spec, studies_dir, labels_csv, tuple(truth))
