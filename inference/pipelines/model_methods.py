"""What the model pipelines (M1-M4) share: finding and caching packages, predictions, the result.

Each method module (``m1_kras``, ``m2_egfr_kras``, ``m3_ras``, ``m4_radscore``) reads like its data
flow - load the study (:func:`~inference.pipelines.study.load_study`), build the method input with
:mod:`inference.imaging.roi`, run the package's model batched over lesions / slices / views, explain
it (:mod:`inference.explain`) - and hands the per-lesion probabilities to :func:`assemble`.

Which package runs
    :func:`installed_package` looks through the models directories in order (the site's
    ``[models] dir`` first, then the demo packages when ``[models] use_demo`` is on) and takes the
    first directory holding a package of the method; in it, the highest version (then name). A
    package with problems is never skipped silently: it fails the job with the reason. No package
    at all fails the job with :class:`ModelUnavailableError` naming the method and the directories.

Loaded once per process
    Verified packages and their models are cached by package path; the entry is reused while the
    manifest (whose sha256 covers every weight file's sha256) and the weight files' size and
    modification time are unchanged, so a worker loads and verifies each model once, and a
    package replaced or tampered with on disk is loaded (and verified) again.

Predictions
    One :class:`~inference.results.Prediction` per lesion and label: the report label is the
    package label in upper case without other characters than A-Z and 0-9, cut to 9 characters
    (``PIK3CA+BRAF`` -> ``PIK3CABRA``; the SR's code values allow no more); the status is
    ``mutant`` / ``wild type`` for genes (:data:`GENE_LABELS`) and ``positive`` / ``negative`` for
    other endpoints (LVI, pleural invasion, T-stage, PD-L1, ...), decided by the package's
    threshold (positive when ``probability >= threshold``).

Patient level
    Volume-weighted mean of the lesion probabilities (weights = lesion volumes in mL), thresholded
    with the same package threshold; written to the result's provenance
    (``patient_<LABEL>``, shown in the SR) and returned by :func:`patient_predictions`. A lesion's
    own probability is per method: M3 averages its slices, the others have one input per lesion.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from inference.errors import InputError, ModelPackageError
from inference.methods import METHODS
from inference.pipelines.study import LoadedStudy, key_image, lesion_result
from inference.registry import MANIFEST, ModelPackage, list_packages, load_package
from inference.registry.files import open_source
from inference.results import KeyImage, PipelineOutput, Prediction, StudyResult

__all__ = [
    "GENE_LABELS",
    "MODEL_METHODS",
    "PATIENT_RULE",
    "ModelUnavailableError",
    "assemble",
    "clear_cache",
    "device_name",
    "find_package",
    "input_size",
    "installed_package",
    "make_prediction",
    "patient_predictions",
    "report_label",
    "resolve_package",
    "spec_value",
    "stack",
]

logger = logging.getLogger(__name__)

MODEL_METHODS = tuple(spec.name for spec in METHODS if spec.network)
"""The CNN methods (a network from a model package, with Grad-CAM)."""

PACKAGED_METHODS = tuple(spec.name for spec in METHODS if spec.package_required and not spec.pair)
"""Every single-study method whose pipeline needs a model package (the worker passes ``model=``)."""

PACKAGE_METHODS = {spec.name: spec.package for spec in METHODS if spec.package and spec.package != spec.name}
"""Method -> the ``method`` its model packages declare, where the two names differ (the registry's)."""

GENE_LABELS = frozenset(
    {"KRAS", "NRAS", "HRAS", "RAS", "BRAF", "PIK3CA", "PIK3CA+BRAF", "EGFR", "ALK", "TP53", "ROS1", "MET", "RET",
     "ERBB2", "HER2", "STK11", "KEAP1", "OTHER"}
)  # fmt: skip
"""Labels reported as ``mutant`` / ``wild type``; any other label is ``positive`` / ``negative``."""

PATIENT_RULE = "volume-weighted mean of the lesion probabilities (weights: lesion volumes in mL)"
"""How the patient-level probability is aggregated (documented in the provenance of every result)."""

_LABEL_CHARS = re.compile(r"[^A-Z0-9]")


class ModelUnavailableError(InputError):
    """No usable model package for a method: none installed, or the installed one is refused.

    An :class:`~pacs_agent.errors.InputError`, so the job fails at once with the message instead of
    being retried: installing or repairing a package is an operator's task.
    """


# ----------------------------------------------------------------------------------------- packages


@dataclass(frozen=True)
class _Cached:
    fingerprint: str
    package: ModelPackage


_cache: dict[str, _Cached] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every cached package and model (tests, benchmarks)."""
    with _cache_lock:
        _cache.clear()


def _fingerprint(path: Path) -> str:
    """sha256 of the manifest plus size and mtime of every file of the package (or of the zip)."""
    digest = hashlib.sha256()
    digest.update(open_source(path).read(MANIFEST))
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def resolve_package(model: ModelPackage | str | os.PathLike[str], method: str) -> ModelPackage:
    """The verified package for ``model``, loaded (and its model built) once per process.

    Parameters
    ----------
    model
        A :class:`~inference.registry.ModelPackage` (used as it is) or the path of a package
        directory or zip.
    method
        The method the package must be for (``"m1"`` .. ``"m4"``).

    Returns
    -------
    ModelPackage
        Verified; its ``model`` property builds the network on first use and keeps it.

    Raises
    ------
    ModelUnavailableError
        The package fails verification (checksum, manifest, weights) or is for another method.
    """
    if isinstance(model, ModelPackage):
        package = model
    else:
        path = Path(model).resolve()
        key = str(path)
        try:
            fingerprint = _fingerprint(path)
        except (OSError, ModelPackageError) as exc:
            raise ModelUnavailableError(f"method {method}: model package {path} cannot be read: {exc}") from exc
        with _cache_lock:
            cached = _cache.get(key)
            if cached is not None and cached.fingerprint == fingerprint:
                package = cached.package
            else:
                try:
                    package = load_package(path)
                except ModelPackageError as exc:
                    _cache.pop(key, None)
                    raise ModelUnavailableError(f"method {method}: {exc}") from exc
                _cache[key] = _Cached(fingerprint, package)
                logger.info("loaded model package %s %s (%s) from %s", package.name, package.version, method, path)
    if package.method != method:
        raise ModelUnavailableError(
            f"model package {package.path} is for method {package.method}, not {method}: install a {method} package"
        )
    return package


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order of versions: ``0.10.0`` after ``0.9.1``; numbers before words at each position."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+_]", version) if p)


def find_package(method: str, models_dirs: Sequence[str | os.PathLike[str]]) -> Path | None:
    """The package of ``method`` the node uses: the first directory holding one; there, the highest version.

    Only manifests are read (cheap; call it per job). A package whose manifest cannot be read at
    all is logged and ignored (it is nobody's package); a package of the method with problems is
    chosen all the same and refused by the caller - never silently replaced by another one.

    Parameters
    ----------
    method
        A package method (``"m1"`` .. ``"m4"``, ``"response"``, ...).
    models_dirs
        Directories of installed packages, in order of preference (``Settings.model_dirs``).

    Returns
    -------
    pathlib.Path or None
        The package path, or None when no directory holds a package of the method.

    Raises
    ------
    ModelUnavailableError
        The chosen package's manifest has problems.
    """
    for directory in models_dirs:
        entries = list_packages(directory)
        for entry in entries:
            if entry.method == "?":  # the manifest itself is unreadable: whose package it is, is unknown
                logger.warning("ignoring unreadable model package %s: %s", entry.path, "; ".join(entry.problems))
        candidates = [e for e in entries if e.method == method]
        if not candidates:
            continue
        best = max(candidates, key=lambda e: (_version_key(e.version), e.name, str(e.path)))
        if best.problems:
            raise ModelUnavailableError(
                f"method {method}: model package {best.path} is refused: {'; '.join(best.problems)}"
            )
        return best.path
    return None


def installed_package(method: str, models_dirs: Sequence[str | os.PathLike[str]]) -> ModelPackage:
    """The verified (and cached) package that runs ``method`` (see :func:`find_package`).

    Parameters
    ----------
    method
        ``"m1"`` .. ``"m4"``.
    models_dirs
        Directories of installed packages, in order of preference (``Settings.model_dirs``).

    Returns
    -------
    ModelPackage
        Verified and cached (see :func:`resolve_package`).

    Raises
    ------
    ModelUnavailableError
        No directory holds a package for the method, or the chosen one is refused.
    """
    path = find_package(PACKAGE_METHODS.get(method, method), models_dirs)
    if path is not None:
        return resolve_package(path, PACKAGE_METHODS.get(method, method))
    where = ", ".join(str(Path(d)) for d in models_dirs) or "(no models directory configured)"
    raise ModelUnavailableError(
        f"method {method} is enabled but no {method} model package is installed in {where}; "
        f"install one with `pacs-agent models install PACKAGE` (or remove {method!r} from [jobs] methods)"
    )


def spec_value(package: ModelPackage, key: str, default: Any, kind: type | tuple[type, ...] = float) -> Any:
    """A value of the package's ``[input]`` table, or ``default`` when absent.

    Parameters
    ----------
    package
        The model package.
    key
        Key in ``[input]``.
    default
        Value when the key is absent.
    kind
        Accepted type(s); ``float`` also accepts integers, never booleans.

    Returns
    -------
    Any
        The value (converted to float when ``kind`` is float).

    Raises
    ------
    ModelUnavailableError
        The value has the wrong type.
    """
    if key not in package.input_spec:
        return default
    value = package.input_spec[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise ModelUnavailableError(f"model package {package.name}: [input] {key} must be {names}, got {value!r}")
    return value


def input_size(package: ModelPackage, rank: int = 2) -> tuple[int, ...]:
    """``[input] shape`` of the package (the per-item array shape; checked by the registry)."""
    shape = tuple(int(v) for v in package.input_spec["shape"])
    if len(shape) != rank:
        raise ModelUnavailableError(f"model package {package.name}: [input] shape must have {rank} values, got {shape}")
    return shape


# -------------------------------------------------------------------------------------- predictions


def report_label(label: str) -> str:
    """The label as the SR codes it: upper case, only A-Z and 0-9, at most 9 characters.

    Parameters
    ----------
    label
        A package label (``KRAS``, ``PIK3CA+BRAF``, ``PD-L1``).

    Returns
    -------
    str
        ``KRAS``, ``PIK3CABRA``, ``PDL1``.

    Raises
    ------
    ValueError
        Nothing is left of the label.
    """
    code = _LABEL_CHARS.sub("", label.upper())[:9]
    if not code:
        raise ValueError(f"label {label!r} has no letter or digit to report")
    return code


def make_prediction(label: str, probability: float, threshold: float, name: str | None = None) -> Prediction:
    """One prediction: the report label, the status the threshold decides, the probability.

    Parameters
    ----------
    label
        Package label (see :func:`report_label`, :data:`GENE_LABELS`).
    probability
        Probability of the positive class (mutant / positive), in [0, 1].
    threshold
        The package's decision threshold for the label.
    name
        How readers see the label (the package's ``[label_names]``); default the package label.

    Returns
    -------
    Prediction
    """
    probability = float(np.clip(probability, 0.0, 1.0))
    positive = probability >= threshold
    if label.upper() in GENE_LABELS:
        status = "mutant" if positive else "wild type"
    else:
        status = "positive" if positive else "negative"
    code, shown = report_label(label), name or label
    return Prediction(
        label=code,
        status=status,
        probability=probability,
        threshold=float(threshold),
        name="" if shown == code else shown,
    )


def patient_predictions(result: StudyResult) -> tuple[Prediction, ...]:
    """Patient-level predictions of a model result (:data:`PATIENT_RULE`).

    Parameters
    ----------
    result
        A result whose lesions all carry predictions for the same labels.

    Returns
    -------
    tuple of Prediction
        One per label, in the order of the first lesion's predictions; empty without predictions.
    """
    lesions = [lesion for lesion in result.lesions if result.predictions.get(lesion.tracking_uid)]
    if not lesions:
        return ()
    weights = np.asarray([max(lesion.volume_ml, 0.0) for lesion in lesions], dtype=np.float64)
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    out = []
    for first in result.predictions[lesions[0].tracking_uid]:
        values = np.asarray(
            [next(p.probability for p in result.predictions[les.tracking_uid] if p.label == first.label)
             for les in lesions]
        )  # fmt: skip
        probability = float(np.dot(weights, values) / weights.sum())
        positive = probability >= first.threshold
        status = _positive_status(first.status) if positive else _negative_status(first.status)
        out.append(Prediction(first.label, status, probability, first.threshold, first.name))
    return tuple(out)


def _positive_status(status: str) -> str:
    return {"wild type": "mutant", "negative": "positive", "low risk": "high risk"}.get(status, status)


def _negative_status(status: str) -> str:
    return {"mutant": "wild type", "positive": "negative", "high risk": "low risk"}.get(status, status)


def _check_labels(package: ModelPackage) -> None:
    codes = [report_label(label) for label in package.labels]
    if len(set(codes)) != len(codes):
        raise ModelUnavailableError(
            f"model package {package.name}: labels {list(package.labels)} are not distinct once reported as "
            f"{codes} (upper case A-Z 0-9, at most 9 characters)"
        )


def assemble(
    *,
    method: str,
    result_kind: str,
    package: ModelPackage,
    study: LoadedStudy,
    probabilities: Sequence[Mapping[str, float]],
    heatmaps: Sequence[np.ndarray | None] | None = None,
    provenance: Mapping[str, str] | None = None,
) -> PipelineOutput:
    """Turn per-lesion probabilities into the pipeline output the worker writes as SR + SCs.

    Parameters
    ----------
    method
        The method name (``[jobs] methods``).
    result_kind
        Stable result name for Series Descriptions and UIDs (``KRAS``, ``EGFR/KRAS``, ``RAS``, ...).
    package
        The model package: identity (``algorithm_info()``), labels and thresholds.
    study
        The loaded study; ``probabilities[i]`` and ``heatmaps[i]`` belong to ``study.lesions[i]``.
    probabilities
        ``{package label: probability}`` per lesion.
    heatmaps
        Grad-CAM map on each lesion's key slice (or None), or None for no maps at all.
    provenance
        Method-specific facts (input settings, device, explained layer).

    Returns
    -------
    PipelineOutput
        Result with one prediction per lesion and label, patient-level aggregation in the
        provenance, key images with heat maps.
    """
    if len(probabilities) != len(study.lesions):
        raise ValueError(f"{len(probabilities)} probability sets for {len(study.lesions)} lesions")
    maps = list(heatmaps) if heatmaps is not None else [None] * len(study.lesions)
    if len(maps) != len(study.lesions):
        raise ValueError(f"{len(maps)} heat maps for {len(study.lesions)} lesions")
    _check_labels(package)
    volume = study.volume
    lesions = []
    predictions: dict[str, tuple[Prediction, ...]] = {}
    key_images: dict[str, KeyImage] = {}
    for item, probs, heatmap in zip(study.lesions, probabilities, maps, strict=True):
        lesions.append(lesion_result(volume, item))
        predictions[item.tracking_uid] = tuple(
            make_prediction(label, probs[label], package.thresholds[label], package.label_name(label))
            for label in package.labels
        )
        key_images[item.tracking_uid] = key_image(volume, item.lesion, heatmap)
    info = package.algorithm_info()
    facts = {
        "model_package": f"{package.name} {package.version}",
        "model_method": package.method,
        "patient_level_rule": PATIENT_RULE,
        **dict(provenance or {}),
    }
    if study.skipped:
        facts["skipped_segments"] = "; ".join(study.skipped)
    result = StudyResult(
        method=method,
        study_instance_uid=volume.study_instance_uid,
        ct_series_instance_uid=volume.series_instance_uid,
        frame_of_reference_uid=volume.frame_of_reference_uid,
        segmentation=study.segmentation,
        algorithm=info,
        lesions=tuple(lesions),
        provenance=facts,
        predictions=predictions,
    )
    patient = patient_predictions(result)
    facts_patient = {
        f"patient_{p.label}": (
            f"{p.status} (probability {p.probability:.3f}, threshold {p.threshold:.3f}, {len(lesions)} lesion(s))"
        )
        for p in patient
    }
    result = replace(result, provenance={**facts, **facts_patient}, patient_predictions=patient)
    return PipelineOutput(result=result, key_images=key_images, result_kind=result_kind)


def stack(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """``np.stack`` as float32 (inputs of one batch)."""
    return np.stack([np.asarray(a, dtype=np.float32) for a in arrays])


def device_name(model: Any) -> str:
    """The device a wrapper runs on, for the provenance (``cpu``, ``cuda:0``)."""
    return str(getattr(model, "device", "cpu"))
