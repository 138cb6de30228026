"""Lesion-level predictions of a trained model (freshly trained, or from a verified package).

:class:`Predictor` is what training evaluates on the validation and test splits and what a
package evaluation runs on new data - the same wrappers (``pre_process -> predict ->
post_process``) and the same method inputs as inference, so a good held-out AUC also proves the
inference path. Aggregation: M3 predicts per slice; a lesion's probability is the mean over its
slices (METHODS.md). All other methods predict one item per lesion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.comparator import RadiomicsComparator, RadScore, radiomics_params
from inference.training.datasets import REGIONS, CaseSet, build_caseset

if TYPE_CHECKING:
    from inference.registry import ModelPackage

__all__ = ["Predictor", "caseset_for_package", "evaluate_package", "package_regions"]


def package_regions(method: str) -> tuple[str, ...]:
    """Radiomics regions a method's cases need (M4: tumour + peritumoral; radiomics: tumour)."""
    return REGIONS if method == "m4" else ("tumour",) if method == "radiomics" else ()


@dataclass
class Predictor:
    """A trained model plus what it needs beyond the network (M4 RadScores).

    Parameters
    ----------
    method
        ``"m1"`` .. ``"m4"`` or ``"radiomics"``.
    labels
        Output labels.
    model
        The method wrapper (:class:`~inference.networks.MethodModel`) or a fitted
        :class:`~inference.comparator.RadiomicsComparator`.
    radscores
        M4: the RadScores in network input order, keyed ``"<label>/<region>"`` (one tumour and one
        peritumoral per endpoint) or ``"<region>"`` (one shared pair, older packages).
    """

    method: str
    labels: tuple[str, ...]
    model: Any
    radscores: Mapping[str, RadScore] = field(default_factory=dict)

    def radscore_matrix(self, cases: CaseSet) -> np.ndarray:
        """(cases, RadScores) raw RadScores of M4 cases, in network input order."""
        columns = []
        for key, radscore in self.radscores.items():
            region = key.rsplit("/", 1)[-1]
            columns.append(radscore.score_matrix(cases.features[region], cases.feature_names[region]))
        return np.column_stack(columns).astype(np.float32)

    def predict(self, cases: CaseSet) -> np.ndarray:
        """Probabilities, shape (cases, labels)."""
        if not len(cases):
            return np.zeros((0, len(self.labels)))
        if self.method == "radiomics":
            names = cases.feature_names["tumour"]
            return self.model.predict_proba(cases.features["tumour"], names)[:, None]
        from inference.networks import DeepRadInput, MultiViewInput

        if self.method == "m1":
            out = self.model(cases.arrays["image"])
        elif self.method == "m2":
            out = self.model(MultiViewInput(cases.arrays["views"], tuple(c.covariates for c in cases.cases)))
        elif self.method == "m3":
            per_slice = self._matrix(self.model(cases.arrays["slices"]))
            owner = np.asarray(cases.slice_owner)
            return np.array([per_slice[owner == i].mean(axis=0) for i in range(len(cases))])
        elif self.method == "m4":
            out = self.model(DeepRadInput(cases.arrays["patch"], self.radscore_matrix(cases)))
        else:
            raise ValueError(f"unknown method {self.method!r}")
        return self._matrix(out)

    def _matrix(self, out: Sequence[Mapping[str, float]]) -> np.ndarray:
        return np.array([[row[label] for label in self.labels] for row in out], dtype=float)

    @classmethod
    def from_package(cls, package: ModelPackage) -> Predictor:
        """The predictor of a verified package (builds its model)."""
        labels = tuple(package.labels)
        if package.method == "radiomics":
            return cls("radiomics", labels, RadiomicsComparator.from_package(package))
        radscores: dict[str, RadScore] = {}
        if package.method == "m4":
            from inference.pipelines.m4_radscore import radscore_columns

            radscores = dict(radscore_columns(package))
        return cls(package.method, labels, package.model, radscores)


def caseset_for_package(
    package: ModelPackage, studies_dir: str | Path, labels_csv: str | Path, *, min_volume_ml: float = 0.05
) -> CaseSet:
    """Load labelled lesions with the package's own ``[input]`` settings (and radiomics settings).

    Returns
    -------
    CaseSet
    """
    spec = dict(package.input_spec)
    if package.method == "m1":  # a package without margin_px crops as it was trained (20 px per side)
        from inference.imaging.roi import M1_LEGACY_MARGIN_PX

        spec.setdefault("margin_px", M1_LEGACY_MARGIN_PX)
        spec.setdefault("roi_set", "custom")
    settings = spec.get("radiomics_settings")
    params = radiomics_params(settings) if isinstance(settings, str) and settings else None
    return build_caseset(
        package.method,
        package.labels,
        studies_dir,
        labels_csv,
        input_spec={k: v for k, v in spec.items() if not isinstance(v, Mapping)},
        regions=package_regions(package.method),
        radiomics_params=params,
        min_volume_ml=min_volume_ml,
    )


def evaluate_package(
    package_path: str | Path, studies_dir: str | Path, labels_csv: str | Path
) -> tuple[CaseSet, np.ndarray, list[Any]]:
    """Evaluate a model package on labelled DICOM data with its own thresholds.

    Returns
    -------
    tuple
        ``(cases, probabilities (cases, labels), [LabelEvaluation per label])``.
    """
    from inference.registry import load_package
    from inference.training.evaluate import evaluate_label

    package = load_package(package_path)
    cases = caseset_for_package(package, studies_dir, labels_csv)
    probabilities = Predictor.from_package(package).predict(cases)
    y = cases.y
    evaluations = [
        evaluate_label(label, y[:, j], probabilities[:, j], package.thresholds[label])
        for j, label in enumerate(package.labels)
    ]
    return cases, probabilities, evaluations
