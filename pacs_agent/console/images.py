"""Result objects for the study page: an SR as readable text, a Secondary Capture as a PNG.

Read from the stored result files (paths from the ``results`` table only, never from a request).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_sr.sr.text import render_sr_text

THUMBNAIL_PIXELS = 1024


class ResultUnreadable(Exception):
    """A stored result file is missing or not DICOM (the page says so instead of failing)."""


def sr_text(path: Path) -> str:
    """The SR at ``path`` as indented text (:func:`dicom_sr.sr.text.render_sr_text`, no patient identity)."""
    try:
        return render_sr_text(dcmread(path))
    except (OSError, InvalidDicomError, AttributeError, KeyError, ValueError) as exc:
        raise ResultUnreadable(f"cannot read {path.name}: {exc}") from exc


def png(path: Path, max_pixels: int = THUMBNAIL_PIXELS) -> bytes:
    """The first frame of the image object at ``path`` as PNG, at most ``max_pixels`` on its long side."""
    try:
        ds = dcmread(path)
        pixels = ds.pixel_array
    except (OSError, InvalidDicomError, AttributeError, KeyError, ValueError, RuntimeError) as exc:
        raise ResultUnreadable(f"cannot read the image of {path.name}: {exc}") from exc
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    if pixels.ndim == 2:
        lo, hi = float(pixels.min()), float(pixels.max())
        pixels = (pixels.astype(np.float64) - lo) / (hi - lo or 1.0) * 255
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    image.thumbnail((max_pixels, max_pixels))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
