"""A generated 60-patient radiogenomics feature table (15 KRAS mutant) with a planted signal.

Shaped like the public radiogenomics tables a site starts from: one row per patient, pyradiomics
feature columns (names the node's comparator parameter file computes), the pyradiomics diagnostics
columns, and two mutation columns - KRAS (the label) and EGFR, which is mutually exclusive with
KRAS as in NSCLC, so a model that used EGFR as a feature would "predict" KRAS from it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

PLANTED = ("log-sigma-3-0-mm-3D_firstorder_Entropy", "wavelet-HLL_glszm_ZoneEntropy")
"""The features whose mean differs between KRAS mutant and wild type."""

NOISE = (
    "original_shape_Sphericity",
    "original_shape_MeshVolume",
    "original_firstorder_Mean",
    "original_firstorder_Skewness",
    "original_firstorder_Kurtosis",
    "original_glcm_Contrast",
    "original_glcm_JointEntropy",
    "original_glrlm_RunEntropy",
    "original_ngtdm_Coarseness",
    "log-sigma-1-0-mm-3D_firstorder_Mean",
    "log-sigma-1-0-mm-3D_glcm_Idm",
    "log-sigma-5-0-mm-3D_firstorder_Energy",
    "log-sigma-5-0-mm-3D_gldm_DependenceEntropy",
    "wavelet-LLL_firstorder_Mean",
    "wavelet-LHL_glcm_Correlation",
    "wavelet-HHH_firstorder_Entropy",
    "wavelet-LLH_glrlm_GrayLevelNonUniformity",
    "wavelet-HLH_ngtdm_Busyness",
)

DIAGNOSTICS = {
    "diagnostics_Versions_PyRadiomics": "v3.0.1",
    "diagnostics_Configuration_Settings": "{'minimumROIDimensions': 2, 'minimumROISize': None, "
    "'normalize': False, 'normalizeScale': 1, 'removeOutliers': None, 'resampledPixelSpacing': None, "
    "'interpolator': 'sitkBSpline', 'preCrop': False, 'padDistance': 5, 'distances': [1], 'force2D': False, "
    "'force2Ddimension': 0, 'resegmentRange': None, 'label': 1, 'additionalInfo': True, 'binWidth': 25}",
    "diagnostics_Configuration_EnabledImageTypes": "{'Original': {}, 'LoG': {'sigma': [1.0, 3.0, 5.0]}, 'Wavelet': {}}",
}


def write_kras_cohort(path: Path, *, seed: int = 0, effect: float = 1.6, shuffle_labels: bool = False) -> Path:
    """Write the cohort CSV; ``shuffle_labels`` permutes KRAS (and EGFR with it) over the patients.

    Parameters
    ----------
    path
        CSV to write.
    seed
        Random seed of the features.
    effect
        Mean shift of the planted features in the mutants, in standard deviations.
    shuffle_labels
        Break the link between labels and features (the null case).
    """
    rng = np.random.default_rng(seed)
    n, mutants = 60, 15
    kras = np.zeros(n, dtype=int)
    kras[:mutants] = 1
    egfr = np.zeros(n, dtype=int)
    egfr[mutants : mutants + 20] = 1  # EGFR mutant only among KRAS wild type: a perfect anti-predictor
    features = {name: rng.normal(0.0, 1.0, n) for name in (*PLANTED, *NOISE)}
    for name in PLANTED:
        features[name] = features[name] + effect * kras
    scale = {name: 1.0 + 10.0 * (i % 3) for i, name in enumerate(features)}
    if shuffle_labels:
        order = rng.permutation(n)
        kras, egfr = kras[order], egfr[order]
    columns = ["patient_id", "study_uid", "KRAS", "EGFR", *DIAGNOSTICS, *features]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for i in range(n):
            writer.writerow(
                [
                    f"P{i:03d}",
                    f"1.2.826.0.1.3680043.10.1{i:03d}",
                    "mutant" if kras[i] else "wild type",
                    egfr[i],
                    *DIAGNOSTICS.values(),
                    *(repr(float(scale[name] * features[name][i] + 3 * scale[name])) for name in features),
                ]
            )
    return path
