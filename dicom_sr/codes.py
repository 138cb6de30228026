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
    "split_feature_name",
    "ucum",
]

PRIVATE_SCHEME_DESIGNATOR = "99PACSAGENT"
PRIVATE_SCHEME_NAME = "pacs-agent private concepts"


def _private(value: str, meaning: str) -> CodedConcept:
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
WEIGHTS_SHA256 = _private("WEIGHTS-SHA256", "Algorithm weights SHA-256")
DECISION_THRESHOLD = _private("DECISION-THRESH", "Decision threshold")
PIPELINE_PROVENANCE = _private("PROVENANCE", "Pipeline provenance")
VALIDATION_STATUS = _private("VALIDATION-STAT", "Validation status")
INTENDED_USE = _private("INTENDED-USE", "Intended use")
USAGE_WARNING = _private("USAGE-WARNING", "Usage warning")

FEATURE_CONCEPTS: dict[str, CodedConcept] = {
    # shape (IBSI "Morphological features", HCUG)
    "shape_MeshVolume": _ibsi("RNU0", "Volume"),
    "shape_VoxelVolume": _ibsi("YEKZ", "Approximate volume"),
    "shape_SurfaceArea": _ibsi("C0JK", "Surface area"),
    "shape_Sphericity": _ibsi("QCFX", "Sphericity"),
    "shape_Maximum3DDiameter": _ibsi("L0JK", "Maximum 3D diameter"),
    "shape_Maximum2DDiameterSlice": _private("MAX2D-DIAM-SLICE", "Maximum 2D diameter (axial slice)"),
    # firstorder (IBSI intensity-based statistics / intensity histogram)
    "firstorder_Mean": _ibsi("Q4LE", "Mean"),
    "firstorder_Variance": _ibsi("ECT3", "Variance"),
    "firstorder_Skewness": _ibsi("KE2A", "Skewness"),
    "firstorder_RootMeanSquared": _ibsi("5ZWQ", "Root mean square"),
    "firstorder_Entropy": _ibsi("TLU2", "Intensity histogram entropy"),
    "firstorder_Kurtosis": _private("KURTOSIS-PYRAD", "Kurtosis (pyradiomics, not excess)"),
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
