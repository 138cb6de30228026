"""M5: the 8-week delta-radiomics response score, with RECIST-like and volumetric comparators.

Result dataclasses of the response pipeline (:func:`inference.pipelines.response.run_response`): what
``dicom_sr`` turns into one SR per baseline / follow-up pair. Frozen, no pydicom, no images.

The result types are in :mod:`~inference.response.results` (light, re-exported here); importing this
package loads nothing heavy. Submodules: :mod:`~inference.response.matching` (alignment and lesion
matching),
:mod:`~inference.response.recist` (comparators), :mod:`~inference.response.signature` (random forest
and its model package). The features themselves are in :mod:`inference.radiomics.delta`.
"""

from __future__ import annotations

from inference.response.results import (
    Alignment,
    FeatureDeltas,
    LesionFeatures,
    LesionMeasurement,
    LesionPair,
    MeasuredLesion,
    PatientFeatures,
    RecistResult,
    ResponseResult,
    SignatureScore,
    TimePoint,
)

__all__ = [
    "Alignment",
    "FeatureDeltas",
    "LesionFeatures",
    "LesionMeasurement",
    "LesionPair",
    "MeasuredLesion",
    "PatientFeatures",
    "RecistResult",
    "ResponseResult",
    "SignatureScore",
    "TimePoint",
]
