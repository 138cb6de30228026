"""The radiomics comparator as a method: features -> univariate filter -> LASSO -> random forest.

The seeds' classical route beside the CNNs (He et al. 2020, Dong et al. 2021): each lesion's
pyradiomics features, computed with the settings stored in the model package, go through the
package's selected features into its random forest. The result names the features that pushed
the prediction most (value, z-score, LASSO coefficient, contribution) as the explanation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inference.comparator import RadiomicsComparator, radiomics_params
from inference.errors import InputError
from inference.pipelines.model_methods import assemble, resolve_package
from inference.pipelines.study import LoadedStudy, load_study
from inference.radiomics.features import compute_features, uncomputable_features
from inference.registry import ModelPackage
from inference.results import PipelineOutput
from inference.structures import StructureSelection

__all__ = ["METHOD", "deployable_params", "run_comparator"]

METHOD = "comparator"
PACKAGE_METHOD = "radiomics"
TOP_FEATURES = 3


def deployable_params(package: ModelPackage, features: Sequence[str]) -> dict[str, Any]:
    """The pyradiomics parameters a comparator package computes its features with, checked.

    Raises
    ------
    InputError
        The package records no settings (trained from a features CSV without ``--params``), unreadable
        settings, or features those settings do not compute - each with what to do about it.
    """
    settings = str(package.input_spec.get("radiomics_settings", "") or "")
    if not settings:
        raise InputError(
            f"model package {package.name} was trained from a features CSV without the pyradiomics parameters the "
            "features were computed with, so the node cannot compute them on DICOM studies; retrain it with "
            "`pacs-agent train radiomics --params PARAMS.yaml` (or [radiomics] params in the training config)"
        )
    try:
        params = radiomics_params(settings)
    except ValueError as exc:
        raise InputError(f"model package {package.name}: unreadable radiomics settings ({exc})") from exc
    missing = uncomputable_features(params, features)
    if missing:
        raise InputError(
            f"model package {package.name} uses feature(s) {missing} that its recorded pyradiomics settings do not "
            "compute; the node cannot run it on DICOM studies (retrain with the parameter file that computes them)"
        )
    return params


def run_comparator(
    ct_paths: Sequence[Path],
    segmentation_path: Path,
    *,
    model: ModelPackage | str | os.PathLike[str],
    explain: bool = True,
    structures: StructureSelection | None = None,
    study: LoadedStudy | None = None,
) -> PipelineOutput:
    """Predict the package's label per lesion from radiomic features.

    Parameters
    ----------
    ct_paths, segmentation_path
        The CT series and the SEG or RTSTRUCT drawn on it.
    model
        A ``radiomics`` model package (loaded object or path).
    explain
        Put the strongest feature contributions of each lesion into the provenance.
    structures
        Which segments / ROIs are tumours (routing's choice); None: the default rules.
    study
        The study as the worker's loader already loaded it (read-only); None: loaded here.

    Raises
    ------
    InputError
        Unusable input, or a package that is not a usable comparator.
    """
    package = resolve_package(model, PACKAGE_METHOD)
    try:
        comparator = RadiomicsComparator.from_package(package)
    except (KeyError, ValueError) as exc:
        raise InputError(f"model package {package.name}: not a usable radiomics comparator ({exc})") from exc
    params = deployable_params(package, comparator.features)
    study = study or load_study(ct_paths, segmentation_path, structures)
    features = [compute_features(study.volume, item.lesion.mask, params=params).features for item in study.lesions]
    try:
        probabilities = comparator.predict_proba(features)
    except (KeyError, ValueError) as exc:
        raise InputError(f"the radiomic features do not fit package {package.name}: {exc}") from exc
    label = package.labels[0]
    provenance = {"input": f"pyradiomics features ({len(comparator.features)} selected) per lesion"}
    if explain:
        for item, values in zip(study.lesions, features, strict=True):
            top = comparator.contributions(values)[:TOP_FEATURES]
            provenance[f"contributions {item.lesion.tracking_id}"] = "; ".join(
                f"{c.name} = {c.value:.4g} (z {c.z:+.2f}, coefficient {c.coefficient:+.3f}, "
                f"contribution {c.contribution:+.3f})"
                for c in top
            )
    return assemble(
        method=METHOD,
        result_kind=f"{label} RF",  # radiomics random forest: "AI KRAS RF" (dicom_sr.series)
        package=package,
        study=study,
        probabilities=[{label: float(p)} for p in probabilities],
        heatmaps=None,
        provenance=provenance,
    )
