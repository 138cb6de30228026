"""Coded concepts used in pacs-agent's Structured Reports.

Coding schemes (PS3.3 C.12.1.1.2, PS3.16 Table 8-1):

``DCM``
    DICOM Controlled Terminology (PS3.16 Annex D).
``SCT``
    SNOMED CT: procedure reported, finding (Neoplasm), volume, long axis.
``UCUM``
    Units of measure (``mm``, ``mm2``, ``mm3``, ``ml``, ``[hnsf'U]``, ``1`` ...).
``IBSI``
    Image Biomarker Standardisation Initiative feature identifiers (Zwanenburg et al.,
    Radiology 2020; arXiv:1612.07003), added to DICOM by CP-1764. The pyradiomics -> IBSI
    mapping below is transcribed from pyradiomics' ``labs/pyradiomics-dcm/resources/
    featuresDict_IBSIv7.tsv`` (BSD-3).
``99PACSAGENT``
    Private coding scheme of pacs-agent, for concepts with no standard code. It is declared in
    the Coding Scheme Identification Sequence (0008,0110) of every SR pacs-agent writes
    (:data:`PRIVATE_SCHEME_DESIGNATOR`, :data:`PRIVATE_SCHEME_NAME`). Its codes:

    =================  ===========================================================================
    Code value         Code meaning
    =================  ===========================================================================
    WEIGHTS-SHA256     Algorithm weights SHA-256 (checksum of the model weights file)
    DECISION-THRESH    Decision threshold (probability above which the positive class is reported)
    PROVENANCE         Pipeline provenance (library versions, parameter-file hash)
    VALIDATION-STAT    Validation status (DEMO, RESEARCH or VALIDATED)
    INTENDED-USE       Intended use (as declared in the model package)
    USAGE-WARNING      Usage warning (e.g. "DEMO MODEL - NOT FOR CLINICAL USE")
    MAX2D-DIAM-SLICE   Maximum 2D diameter (axial slice): pyradiomics shape
                       Maximum2DDiameterSlice, which has no IBSI identifier
    KURTOSIS-PYRAD     Kurtosis (pyradiomics, not excess): pyradiomics firstorder Kurtosis, which
                       equals IBSI "Kurtosis" (IPH6, excess kurtosis) + 3, so the IBSI code would
                       misstate the value
    =================  ===========================================================================
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.coding import Code

__all__ = [
    "CT_OF_ABDOMEN",
    "DECISION_THRESHOLD",
    "FEATURE_CONCEPTS",
    "INTENDED_USE",
    "LONG_AXIS",
    "NEOPLASM",
    "PIPELINE_PROVENANCE",
    "PRIVATE_SCHEME_DESIGNATOR",
    "PRIVATE_SCHEME_NAME",
    "QUALITATIVE_EVALUATIONS",
    "USAGE_WARNING",
    "VALIDATION_STATUS",
    "VOLUME",
    "WEIGHTS_SHA256",
    "feature_concept",
    "private_concept",
    "split_feature_name",
    "ucum",
]

PRIVATE_SCHEME_DESIGNATOR = "99PACSAGENT"
PRIVATE_SCHEME_NAME = "pacs-agent private concepts"


def private_concept(value: str, meaning: str) -> CodedConcept:
    """A concept of the pacs-agent private coding scheme (:data:`PRIVATE_SCHEME_DESIGNATOR`)."""
    return CodedConcept(value=value, meaning=meaning, scheme_designator=PRIVATE_SCHEME_DESIGNATOR)


def _ibsi(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, meaning=meaning, scheme_designator="IBSI")


# Standard concepts (SCT, DCM, UMLS).
CT_OF_ABDOMEN = CodedConcept(value="169070004", meaning="CT of abdomen", scheme_designator="SCT")
NEOPLASM = CodedConcept(value="108369006", meaning="Neoplasm", scheme_designator="SCT")
VOLUME = CodedConcept(value="118565006", meaning="Volume", scheme_designator="SCT")
LONG_AXIS = CodedConcept(value="103339001", meaning="Long Axis", scheme_designator="SCT")
AREA = CodedConcept(value="42798000", meaning="Area", scheme_designator="SCT")
DERIVED_IMAGING_MEASUREMENTS = CodedConcept(
    value="126011", meaning="Derived Imaging Measurements", scheme_designator="DCM"
)
"""TID 1500 row 9: measurements derived from several ROIs (the patient-level results)."""
COMMENT = CodedConcept(value="121106", meaning="Comment", scheme_designator="DCM")
OHIF_FREEHAND_TOOL = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"
"""Tracking Identifier prefix by which OHIF (dcmjs / Cornerstone3D adapters) recognises a planar
freehand ROI it can load as a measurement: ``<prefix>:<human-readable identifier>``."""
QUALITATIVE_EVALUATIONS = CodedConcept(value="C0034375", meaning="Qualitative Evaluations", scheme_designator="UMLS")
"""TID 1500 row 12: report-level container of CODE / TEXT qualitative evaluations."""

# Private concepts (99PACSAGENT), see the module docstring.
WEIGHTS_SHA256 = private_concept("WEIGHTS-SHA256", "Algorithm weights SHA-256")
DECISION_THRESHOLD = private_concept("DECISION-THRESH", "Decision threshold")
PIPELINE_PROVENANCE = private_concept("PROVENANCE", "Pipeline provenance")
VALIDATION_STATUS = private_concept("VALIDATION-STAT", "Validation status")
INTENDED_USE = private_concept("INTENDED-USE", "Intended use")
USAGE_WARNING = private_concept("USAGE-WARNING", "Usage warning")

FEATURE_CONCEPTS: dict[str, CodedConcept] = {
    # shape (IBSI "Morphological features", HCUG)
    "shape_MeshVolume": _ibsi("RNU0", "Volume"),
    "shape_VoxelVolume": _ibsi("YEKZ", "Approximate volume"),
    "shape_SurfaceArea": _ibsi("C0JK", "Surface area"),
    "shape_Sphericity": _ibsi("QCFX", "Sphericity"),
    "shape_Maximum3DDiameter": _ibsi("L0JK", "Maximum 3D diameter"),
    "shape_Maximum2DDiameterSlice": private_concept("MAX2D-DIAM-SLICE", "Maximum 2D diameter (axial slice)"),
    # firstorder (IBSI intensity-based statistics / intensity histogram)
    "firstorder_Mean": _ibsi("Q4LE", "Mean"),
    "firstorder_Variance": _ibsi("ECT3", "Variance"),
    "firstorder_Skewness": _ibsi("KE2A", "Skewness"),
    "firstorder_RootMeanSquared": _ibsi("5ZWQ", "Root mean square"),
    "firstorder_Entropy": _ibsi("TLU2", "Intensity histogram entropy"),
    "firstorder_Kurtosis": private_concept("KURTOSIS-PYRAD", "Kurtosis (pyradiomics, not excess)"),
    # texture
    "glcm_Contrast": _ibsi("ACUI", "(GLCM) Contrast"),
    "glcm_JointEntropy": _ibsi("TU9B", "Joint entropy"),
    "ngtdm_Contrast": _ibsi("65HE", "(NGTDM) Contrast"),
}
"""pyradiomics ``<class>_<feature>`` -> coded concept name of the TID 300 measurement."""

_UCUM: dict[str, str] = {
    "mm": "millimeter",
    "mm2": "square millimeter",
    "mm3": "cubic millimeter",
    "ml": "milliliter",
    "mm-1": "per millimeter",
    "[hnsf'U]": "Hounsfield unit",
    "[hnsf'U]2": "Hounsfield unit squared",
    "%": "percent",
    "1": "no units",
}


def split_feature_name(name: str) -> tuple[str, str, str]:
    """Split a pyradiomics feature name into image type, feature class and feature.

    Parameters
    ----------
    name: str
        ``<image type>_<class>_<feature>`` as pyradiomics names its outputs (e.g.
        ``original_shape_VoxelVolume``, ``log-sigma-1-0-mm-3D_firstorder_Entropy``), or
        ``<class>_<feature>`` (image type ``original`` is assumed).

    Returns
    -------
    tuple[str, str, str]
        ``(image_type, feature_class, feature)``.

    Raises
    ------
    TypeError
        When ``name`` is not a ``str``.
    ValueError
        When ``name`` does not have two or three ``_``-separated parts.
    """
    if not isinstance(name, str):
        raise TypeError('Argument "name" must have type str.')
    parts = name.split("_")
    if len(parts) == 2:
        parts.insert(0, "original")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f'Feature name "{name}" is not "<image type>_<class>_<feature>" or "<class>_<feature>".')
    return parts[0], parts[1], parts[2]


def feature_concept(name: str) -> CodedConcept:
    """Coded concept name of a pyradiomics feature (IBSI code where one exists).

    The image type (filter) is not part of the concept: the SR records it in the
    measurement's algorithm parameters (TID 4019).

    Parameters
    ----------
    name: str
        pyradiomics feature name, see :func:`split_feature_name`.

    Returns
    -------
    highdicom.sr.CodedConcept
        Concept for the Concept Name of the TID 300 NUM content item.

    Raises
    ------
    TypeError
        When ``name`` is not a ``str``.
    ValueError
        When the feature is not one pacs-agent has a code for.
    """
    _, feature_class, feature = split_feature_name(name)
    key = f"{feature_class}_{feature}"
    try:
        return FEATURE_CONCEPTS[key]
    except KeyError:
        raise ValueError(
            f'No coded concept for feature "{name}"; known: {", ".join(sorted(FEATURE_CONCEPTS))}.'
        ) from None


def ucum(unit: str | Code | CodedConcept) -> CodedConcept:
    """UCUM coded concept for a unit code.

    Parameters
    ----------
    unit: str | pydicom.sr.coding.Code | highdicom.sr.CodedConcept
        UCUM code (case-sensitive form), e.g. ``"mm3"`` or ``"[hnsf'U]"``; a code is checked
        and returned as a ``CodedConcept``.

    Returns
    -------
    highdicom.sr.CodedConcept
        Concept with coding scheme designator ``UCUM`` for the Measurement Units Code Sequence.

    Raises
    ------
    TypeError
        When ``unit`` has the wrong type.
    ValueError
        When the unit is not one pacs-agent uses.
    """
    if isinstance(unit, (Code, CodedConcept)):
        if unit.scheme_designator != "UCUM":
            raise ValueError(f'Unit "{unit.value}" is not a UCUM code.')
        return CodedConcept(value=unit.value, meaning=unit.meaning, scheme_designator="UCUM")
    if not isinstance(unit, str):
        raise TypeError('Argument "unit" must have type str.')
    try:
        meaning = _UCUM[unit]
    except KeyError:
        raise ValueError(f'Unknown unit "{unit}"; known UCUM codes: {", ".join(_UCUM)}.') from None
    return CodedConcept(value=unit, meaning=meaning, scheme_designator="UCUM")


# --- the lesion groups and predictions of a measurement report (dicom_sr.sr.templates) ---
STATUS_CODES: dict[str, CodedConcept] = {
    "mutant": private_concept("MUTANT", "Mutant"),
    "wild type": private_concept("WILD-TYPE", "Wild type"),
    "high risk": CodedConcept(value="15508007", meaning="High risk", scheme_designator="SCT"),
    "low risk": CodedConcept(value="75976002", meaning="Low risk", scheme_designator="SCT"),
    "positive": CodedConcept(value="10828004", meaning="Positive", scheme_designator="SCT"),
    "negative": CodedConcept(value="260385009", meaning="Negative", scheme_designator="SCT"),
}
"""Prediction status -> coded value of the qualitative evaluation."""

POSITIVE_STATUSES = frozenset({"mutant", "high risk", "positive"})
"""Statuses reported when the probability reaches the threshold."""

METHOD = private_concept("METHOD", "Analysis method")
FRAME_OF_REFERENCE_UID = CodedConcept(value="112227", meaning="Frame of Reference UID", scheme_designator="DCM")
LESION_CONCEPTS: dict[str, CodedConcept] = {
    "source_uid": private_concept("SOURCE-UID", "Segmentation SOP Instance UID"),
    "source_number": private_concept("SOURCE-NUMBER", "Segment or ROI number"),
    "source_label": private_concept("SOURCE-LABEL", "Segment or ROI label"),
    "centroid_mm": private_concept("CENTROID-MM", "Lesion centroid (patient, mm)"),
    "key_slice_index": private_concept("KEY-SLICE-INDEX", "Key slice index"),
    "key_slice_uid": private_concept("KEY-SLICE-UID", "Key slice SOP Instance UID"),
}
"""Per-lesion TEXT items that let the reader rebuild a ``LesionResult`` (see module docstring)."""


# --- the response report (dicom_sr.sr.response) ---
# Standard concepts (PS3.16).
TIME_POINT_TYPE = CodedConcept(value="126072", meaning="Time Point Type", scheme_designator="DCM")
BASELINE = CodedConcept(value="C1442488", meaning="Baseline", scheme_designator="UMLS")
"""CID 6146: the baseline CT."""
FOLLOW_UP = CodedConcept(value="126074", meaning="Posttreatment", scheme_designator="DCM")
"""CID 6146: the follow-up CT, taken after treatment started (about 8 weeks into it)."""
FRACTIONAL_CHANGE = CodedConcept(value="125314", meaning="Fractional Change", scheme_designator="DCM")
CURRENT_RESPONSE = CodedConcept(value="112048", meaning="Current Response", scheme_designator="DCM")
RESPONSE_EVALUATION_METHOD = CodedConcept(value="112021", meaning="Response Evaluation Method", scheme_designator="DCM")
RECIST_1_1 = CodedConcept(value="126081", meaning="RECIST 1.1", scheme_designator="DCM")
BASELINE_CATEGORY = CodedConcept(value="112016", meaning="Baseline Category", scheme_designator="DCM")
TARGET_AT_BASELINE = CodedConcept(value="112074", meaning="Target Lesion at Baseline", scheme_designator="DCM")
NON_TARGET_AT_BASELINE = CodedConcept(value="112075", meaning="Non-Target Lesion at Baseline", scheme_designator="DCM")
RECIST_CATEGORY_CODES: dict[str, CodedConcept] = {
    "CR": CodedConcept(value="112041", meaning="Target Lesion Complete Response", scheme_designator="DCM"),
    "PR": CodedConcept(value="112042", meaning="Target Lesion Partial Response", scheme_designator="DCM"),
    "PD": CodedConcept(value="112043", meaning="Target Lesion Progressive Disease", scheme_designator="DCM"),
    "SD": CodedConcept(value="112044", meaning="Target Lesion Stable Disease", scheme_designator="DCM"),
    "NE": private_concept("RECIST-NE", "Not evaluable"),
}
"""RECIST-like category -> value of "Current Response" (CID 6144; NE private)."""

# Private concepts (99PACSAGENT), see the module docstring.
RESPONSE_FEATURE_CONCEPTS: dict[str, CodedConcept] = {
    "si4": private_concept("SI4", "Shape index bin 4 fraction (SI4)"),
    "log_z_entropy": private_concept("LOGZ-ENTROPY", "Entropy after LoG filter along z"),
    "log_x_entropy": private_concept("LOGX-ENTROPY", "Entropy after LoG filter along x"),
    "ngtdm_contrast": FEATURE_CONCEPTS["ngtdm_Contrast"],
}
"""The four response features (:data:`inference.radiomics.delta.FEATURE_NAMES`) -> concept name."""
ABSOLUTE_CHANGE = private_concept("ABS-CHANGE", "Absolute change from baseline")
TOTAL_VOLUME = private_concept("TOTAL-VOLUME", "Total lesion volume")
SUM_OF_DIAMETERS = private_concept("SUM-DIAMETERS", "Sum of target lesion diameters")
INTERVAL = private_concept("INTERVAL", "Interval between baseline and follow-up")
INSENSITIVITY_PROBABILITY = private_concept("INSENS-PROB", "Probability of treatment insensitivity")
RISK_GROUP = private_concept("RISK-GROUP", "Treatment insensitivity risk group")
LESION_STATUS = private_concept("LESION-STATUS", "Lesion status between time points")
LESION_STATUS_VALUES: dict[str, CodedConcept] = {
    "matched": private_concept("MATCHED", "Seen at both time points"),
    "new": private_concept("NEW", "New lesion (follow-up only)"),
    "disappeared": private_concept("DISAPPEARED", "Disappeared (baseline only)"),
}
MATCH_DICE = private_concept("MATCH-DICE", "Overlap of matched lesions (Dice)")
MATCH_DISTANCE = private_concept("MATCH-DISTANCE", "Centroid distance of matched lesions")
MATCH_RULE = private_concept("MATCH-RULE", "Lesion matching rule")
BASELINE_SEGMENT = private_concept("BASELINE-SEGMENT", "Baseline segment or ROI")
RECIST_REASON = private_concept("RECIST-REASON", "Response category reason")
RESULT_NOTE = private_concept("RESULT-NOTE", "Result note")
QUALITY_TIER = private_concept("QUALITY-TIER", "Acquisition quality tier")
"""M5: the study pair's CT quality tier whose recalibration the score used (high / standard), with the reasons."""
BASELINE_STUDY = private_concept("BASELINE-STUDY", "Baseline Study Instance UID")
BASELINE_SEGMENTATION = private_concept("BASELINE-SEG-UID", "Baseline segmentation SOP Instance UID")
DAY = CodedConcept(value="d", meaning="day", scheme_designator="UCUM")
