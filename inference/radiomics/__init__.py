"""Radiomic features with pyradiomics (parameters in ``config/radiomics/``)."""

from inference.radiomics.features import (
    DEFAULT_PARAMS,
    DEFAULT_SETTINGS,
    FeatureError,
    FeatureSet,
    compute_features,
    feature_unit,
)

__all__ = ["DEFAULT_PARAMS", "DEFAULT_SETTINGS", "FeatureError", "FeatureSet", "compute_features", "feature_unit"]
