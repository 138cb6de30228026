"""Shared imaging steps: CT series -> volume, SEG/RTSTRUCT -> masks, masks -> lesions."""

from inference.imaging.lesions import Lesion, find_lesions, outline_mm
from inference.imaging.masks import LabelMask, SegmentationError, load_segmentation, referenced_series_uids
from inference.imaging.volume import CTVolume, VolumeError, array_view, load_ct_series, volume_from_image

__all__ = [
    "CTVolume",
    "LabelMask",
    "Lesion",
    "SegmentationError",
    "VolumeError",
    "array_view",
    "find_lesions",
    "load_ct_series",
    "load_segmentation",
    "outline_mm",
    "referenced_series_uids",
    "volume_from_image",
]
