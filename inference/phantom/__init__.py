"""Synthetic phantom studies: portal-venous abdominal CT with liver lesions, DICOM SEG and RTSTRUCT.

The phantom is the project's test and demonstration input. Every study is deterministic for its
arguments (UIDs included) and carries the ground truth of its lesions and of what its SEG / RTSTRUCT
hold (``PhantomStudy.structures``), so readers can be checked against what was planted.
"""

from inference.phantom.anatomy import PhantomGeometry
from inference.phantom.cli import main
from inference.phantom.ct import SERIES_DESCRIPTION, SUPPORTED_TRANSFER_SYNTAXES
from inference.phantom.structures import PhantomStructure
from inference.phantom.study import (
    PhantomLesion,
    PhantomOptions,
    PhantomStudy,
    generate_follow_up,
    generate_study,
    label_volume,
)

__all__ = [
    "SERIES_DESCRIPTION",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "PhantomGeometry",
    "PhantomLesion",
    "PhantomOptions",
    "PhantomStructure",
    "PhantomStudy",
    "generate_follow_up",
    "generate_study",
    "label_volume",
    "main",
]
