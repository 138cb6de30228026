"""``pacs-agent show``: SRs as indented text, image objects (Secondary Captures) as PNG.

Text taken from the files is printed with control characters escaped (:func:`pacs_agent.text.printable`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from dicom_sr.sr.text import render_sr_text
from pacs_agent.text import printable


def _dicom_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def write_png(ds: Dataset, target: Path) -> Path:
    """Write the first frame of an image object as an 8-bit PNG (RGB as is, grey scaled to 0-255)."""
    pixels = ds.pixel_array
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    if pixels.ndim == 2:
        lo, hi = float(pixels.min()), float(pixels.max())
        pixels = ((pixels - lo) / (hi - lo or 1.0) * 255).astype(np.uint8)
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(target)
    return target


def show(path: Path, png_dir: Path | None = None) -> int:
    """Print every SR under ``path`` as text; write image objects as PNG into ``png_dir``."""
    if not path.exists():
        print(f"pacs-agent show: {path} does not exist", file=sys.stderr)
        return 1
    shown = 0
    for file in _dicom_files(path):
        try:
            ds = dcmread(file)
        except (InvalidDicomError, OSError):
            continue
        modality = str(ds.get("Modality", ""))
        if modality == "SR":
            # An SR may come from anywhere: escape sequences and other controls printed visibly, line by line.
            print("\n".join(printable(line) for line in render_sr_text(ds).split("\n")))
            print()
            shown += 1
        elif "PixelData" in ds and png_dir is not None:
            out = write_png(ds, png_dir / f"{file.stem}.png")
            print(printable(f"image {ds.get('SeriesDescription', '')}: written to {out}"))
            shown += 1
    if not shown:
        print(f"pacs-agent show: no SR or image objects found under {path}", file=sys.stderr)
        return 1
    return 0
