"""Pixel rendering of the Secondary Capture pages (pure numpy + Pillow, no DICOM).

A lesion page is a 1024 x 1024 RGB image (:data:`CANVAS`)::

    +--------------------------------------------------------------+  y = 0
    | header: red DEMO banner, or the title on dark grey            |
    +------------------------------------------+-------------------+  y = 64
    | key slice, square pixels, windowed;      | title, colour bar |
    | Grad-CAM overlay (alpha-blended "hot"    | (with a heat map),|
    | colour map), lesion contour in green,    | legend, window,   |
    | scale bar                                | field of view     |
    +------------------------------------------+-------------------+  y = 768
    | text panel: result, probability, threshold, lesion, model,    |
    | version, date                                                 |
    +--------------------------------------------------------------+  y = 1024

Text uses Pillow's built-in scalable font (``ImageFont.load_default(size=...)``, Pillow >= 10.1,
FreeType): no font file is read from the system or downloaded. Sizes of 24 px and more keep it
legible at 1:1. Nothing is cut off (:func:`layout_text`): a line too long for its column is set
up to a quarter smaller (not below 24 px) when that makes it fit, and is wrapped at spaces
otherwise; only when the wrapped lines are too many for the column height do all sizes shrink
together (not below 18 px).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "BACKGROUND",
    "CANVAS",
    "CONTOUR",
    "DEMO_RED",
    "HEADER_HEIGHT",
    "IMAGE_BOX",
    "TEXT_TOP",
    "Placement",
    "TextLine",
    "hot_colormap",
    "layout_text",
    "line_height",
    "mask_outline",
    "render_lesion_page",
    "render_summary_page",
    "text_width",
    "window_to_uint8",
]

CANVAS = 1024
"""Width and height of every page (pixels)."""
HEADER_HEIGHT = 64
IMAGE_SIZE = 704
IMAGE_BOX = (0, HEADER_HEIGHT, IMAGE_SIZE, HEADER_HEIGHT + IMAGE_SIZE)
"""(left, top, right, bottom) of the key-slice image on the page."""
TEXT_TOP = HEADER_HEIGHT + IMAGE_SIZE
SIDE_LEFT = IMAGE_SIZE + 24

BACKGROUND = (16, 16, 20)
HEADER_GREY = (44, 48, 58)
DEMO_RED = (200, 0, 0)
"""Colour of the DEMO banner: the only place pure-ish red is drawn outside the heat map."""
CONTOUR = (0, 255, 0)
"""Colour of the lesion contour (not in the heat-map colour map)."""
WHITE = (255, 255, 255)
GREY = (190, 190, 190)
RESULT_YELLOW = (255, 220, 90)
HEAT_ALPHA = 0.5
"""Opacity of the heat map where its value is 1 (it scales linearly with the value)."""


@dataclass(frozen=True)
class TextLine:
    """One line of the text panel: text, font size in pixels, RGB colour."""

    text: str
    size: int = 26
    colour: tuple[int, int, int] = WHITE


@dataclass(frozen=True)
class Placement:
    """Where the source slice landed on the page (axis-aligned: no rotation, no shear).

    Source pixel centre ``(r, c)`` is at page pixel
    ``(top + (r + 0.5 - row0) / step_r - 0.5, left + (c + 0.5 - col0) / step_c - 0.5)``.
    """

    row0: float
    col0: float
    step_r: float
    """Source rows per page pixel."""
    step_c: float
    """Source columns per page pixel."""
    top: int = IMAGE_BOX[1]
    left: int = IMAGE_BOX[0]
    size: int = IMAGE_SIZE
    mm_per_pixel: float = 1.0

    def to_page(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Page (y, x) of source pixel centres (rows, cols)."""
        y = self.top + (np.asarray(rows, dtype=float) + 0.5 - self.row0) / self.step_r - 0.5
        x = self.left + (np.asarray(cols, dtype=float) + 0.5 - self.col0) / self.step_c - 0.5
        return y, x

    def to_source(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source (row, col) coordinates of page pixel centres (y, x)."""
        rows = self.row0 + (np.asarray(y, dtype=float) - self.top + 0.5) * self.step_r - 0.5
        cols = self.col0 + (np.asarray(x, dtype=float) - self.left + 0.5) * self.step_c - 0.5
        return rows, cols


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def window_to_uint8(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear VOI window (PS3.3 C.11.2.1.2, simplified): ``center +- width/2`` -> 0..255."""
    if width <= 0:
        raise ValueError(f"window width must be positive, not {width}")
    low = center - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float64) - low) / width
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def hot_colormap(values: np.ndarray) -> np.ndarray:
    """Colour map "hot" (black -> red -> yellow -> white) of values in [0, 1], as uint8 RGB.

    It has no green or cyan, so the green contour stays distinguishable on top of it.
    """
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)[..., None]
    rgb = np.clip(np.concatenate([3.0 * v, 3.0 * v - 1.0, 3.0 * v - 2.0], axis=-1), 0.0, 1.0)
    return np.round(rgb * 255.0).astype(np.uint8)


def _erode(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, constant_values=False)
    return padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, constant_values=False)
    return padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]


def mask_outline(mask: np.ndarray, thickness: int = 3) -> np.ndarray:
    """Pixels of a band ``thickness`` pixels wide straddling the boundary of a 2D mask."""
    mask = np.asarray(mask, dtype=bool)
    inner, outer = mask, mask
    for i in range(thickness):
        if i % 2 == 0:
            outer = _dilate(outer)
        else:
            inner = _erode(inner)
    return outer & ~inner if thickness > 1 else mask & ~_erode(mask)


def _sample(array: np.ndarray, rows: np.ndarray, cols: np.ndarray, *, linear: bool, fill: float) -> np.ndarray:
    """Separable resampling of a 2D array at row / column coordinates (outside -> ``fill``)."""
    data = np.asarray(array, dtype=np.float64)
    n_rows, n_cols = data.shape
    inside = (rows >= -0.5) & (rows <= n_rows - 0.5)
    inside_c = (cols >= -0.5) & (cols <= n_cols - 0.5)
    if linear:
        r = np.clip(rows, 0, n_rows - 1)
        c = np.clip(cols, 0, n_cols - 1)
        r0 = np.floor(r).astype(int)
        c0 = np.floor(c).astype(int)
        r1 = np.minimum(r0 + 1, n_rows - 1)
        c1 = np.minimum(c0 + 1, n_cols - 1)
        wr = (r - r0)[:, None]
        wc = (c - c0)[None, :]
        out = (
            data[np.ix_(r0, c0)] * (1 - wr) * (1 - wc)
            + data[np.ix_(r1, c0)] * wr * (1 - wc)
            + data[np.ix_(r0, c1)] * (1 - wr) * wc
            + data[np.ix_(r1, c1)] * wr * wc
        )
    else:
        r = np.clip(np.floor(rows + 0.5).astype(int), 0, n_rows - 1)
        c = np.clip(np.floor(cols + 0.5).astype(int), 0, n_cols - 1)
        out = data[np.ix_(r, c)]
    out[~inside, :] = fill
    out[:, ~inside_c] = fill
    return out


def _placement(
    mask: np.ndarray, pixel_spacing: tuple[float, float], fov_mm: float | None, shape: tuple[int, int]
) -> Placement:
    """Square field of view (mm) centred on the lesion: 2.5 x its extent, at least 100 mm."""
    dr, dc = pixel_spacing
    rows, cols = np.nonzero(mask)
    if fov_mm is None:
        extent = max((rows.max() - rows.min() + 1) * dr, (cols.max() - cols.min() + 1) * dc)
        full = max(shape[0] * dr, shape[1] * dc)
        fov_mm = min(max(100.0, 2.5 * extent), full)
    centre_r = (rows.min() + rows.max() + 1) / 2.0
    centre_c = (cols.min() + cols.max() + 1) / 2.0
    mm_per_pixel = fov_mm / IMAGE_SIZE
    step_r, step_c = mm_per_pixel / dr, mm_per_pixel / dc
    return Placement(
        row0=centre_r - IMAGE_SIZE * step_r / 2.0,
        col0=centre_c - IMAGE_SIZE * step_c / 2.0,
        step_r=step_r,
        step_c=step_c,
        mm_per_pixel=mm_per_pixel,
    )


def _slice_image(
    hu: np.ndarray,
    mask: np.ndarray,
    placement: Placement,
    window: tuple[float, float],
    heatmap: np.ndarray | None,
) -> np.ndarray:
    """The windowed key slice with heat map and contour, IMAGE_SIZE x IMAGE_SIZE x 3 uint8."""
    page_idx = np.arange(IMAGE_SIZE, dtype=float)
    rows, cols = placement.to_source(page_idx + placement.top, page_idx + placement.left)
    grey = window_to_uint8(_sample(hu, rows, cols, linear=True, fill=-1024.0), *window)
    rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.float64)
    if heatmap is not None:
        heat = np.clip(_sample(heatmap, rows, cols, linear=True, fill=0.0), 0.0, 1.0)
        alpha = (HEAT_ALPHA * heat)[..., None]
        rgb = rgb * (1.0 - alpha) + hot_colormap(heat).astype(np.float64) * alpha
    out = np.round(rgb).astype(np.uint8)
    display_mask = _sample(mask.astype(np.float64), rows, cols, linear=False, fill=0.0) > 0.5
    out[mask_outline(display_mask, thickness=3)] = CONTOUR
    return out


def _fit(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _header(draw: ImageDraw.ImageDraw, title: str, demo_warning: str | None) -> None:
    if demo_warning:
        draw.rectangle((0, 0, CANVAS - 1, HEADER_HEIGHT - 1), fill=DEMO_RED)
        font = _font(36)
        text = _fit(demo_warning, font, CANVAS - 32)
        draw.text((CANVAS / 2, HEADER_HEIGHT / 2), text, font=font, fill=WHITE, anchor="mm", stroke_width=1)
    else:
        draw.rectangle((0, 0, CANVAS - 1, HEADER_HEIGHT - 1), fill=HEADER_GREY)
        font = _font(32)
        draw.text((24, HEADER_HEIGHT / 2), _fit(title, font, CANVAS - 48), font=font, fill=WHITE, anchor="lm")


MIN_SHRUNK_SIZE = 24
"""Smallest size (px) a single too-long line is set in before it is wrapped instead."""
MIN_PANEL_SIZE = 18
"""Smallest size (px) when a whole column of text shrinks to fit its height."""


def text_width(text: str, size: int) -> float:
    """Width in pixels of ``text`` in the pages' font at ``size`` (to check that a cell fits its column)."""
    return float(_font(size).getlength(text))


def line_height(size: int) -> int:
    """Vertical advance (px) of a text line of ``size`` px."""
    return round(size * 1.3)


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> list[str]:
    """Greedy word wrap at spaces; a word wider than ``width`` is broken between characters."""
    rows: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            rows.append(current)
        while len(word) > 1 and font.getlength(word) > width:
            cut = len(word) - 1
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            rows.append(word[:cut])
            word = word[cut:]
        current = word
    rows.append(current)
    return rows


def _set_line(line: TextLine, size: int, width: float) -> list[TextLine]:
    """``line`` at ``size`` px: as is, a little smaller, or wrapped - always within ``width``."""
    if _font(size).getlength(line.text) <= width:
        return [TextLine(line.text, size, line.colour)]
    for smaller in range(size - 1, max(min(size, MIN_SHRUNK_SIZE), math.ceil(size * 0.75)) - 1, -1):
        if _font(smaller).getlength(line.text) <= width:
            return [TextLine(line.text, smaller, line.colour)]
    return [TextLine(row, size, line.colour) for row in _wrap(line.text, _font(size), width)]


def layout_text(lines: Sequence[TextLine], width: float, height: float) -> list[TextLine]:
    """The lines as drawn in a column ``width`` x ``height`` px: each fits the width, none is cut.

    A line wider than the column is set smaller (by up to a quarter, not below
    :data:`MIN_SHRUNK_SIZE`) when that makes it fit, else wrapped at spaces (a word wider than
    the column is broken between characters). When the result is taller than ``height``, all
    sizes shrink together in 5 % steps down to :data:`MIN_PANEL_SIZE`; if even that is too tall,
    the lines at that size are returned and the caller stops drawing at the bottom.

    Parameters
    ----------
    lines: Sequence[TextLine]
        The logical lines, top to bottom.
    width: float
        Column width in pixels.
    height: float
        Column height in pixels.

    Returns
    -------
    list[TextLine]
        The physical lines; the text of the wrapped rows of a line joined by spaces is the line.
    """
    scale = 1.0
    while True:
        laid: list[TextLine] = []
        for line in lines:
            size = line.size if scale == 1.0 else max(MIN_PANEL_SIZE, min(line.size, round(line.size * scale)))
            laid.extend(_set_line(line, size, width))
        fits = sum(line_height(line.size) for line in laid[:-1]) + (laid[-1].size if laid else 0) <= height
        if fits or all(line.size <= MIN_PANEL_SIZE for line in laid) or scale < 0.2:
            return laid
        scale -= 0.05


def _lines(draw: ImageDraw.ImageDraw, lines: Sequence[TextLine], left: int, top: int, width: int, bottom: int) -> int:
    y = top
    for line in layout_text(lines, width, bottom - top):
        font = _font(line.size)
        if y + line.size > bottom:
            break
        draw.text((left, y), _fit(line.text, font, width), font=font, fill=line.colour)
        y += line_height(line.size)
    return y


def _nice_length(mm: float) -> float:
    for candidate in (100.0, 50.0, 20.0, 10.0, 5.0, 2.0, 1.0):
        if candidate <= mm:
            return candidate
    return mm


def _scale_bar(draw: ImageDraw.ImageDraw, placement: Placement) -> None:
    length_mm = _nice_length(placement.size * placement.mm_per_pixel / 5.0)
    pixels = length_mm / placement.mm_per_pixel
    x0, y0 = placement.left + 24, placement.top + placement.size - 28
    draw.rectangle((x0, y0, x0 + pixels, y0 + 5), fill=WHITE)
    draw.text((x0, y0 - 30), f"{length_mm:g} mm", font=_font(24), fill=WHITE)


def _colour_bar(canvas: Image.Image, draw: ImageDraw.ImageDraw, top: int, title: str) -> int:
    """Vertical colour bar of :func:`hot_colormap` with ticks 0.0 / 0.5 / 1.0; returns the next y."""
    font = _font(24)
    draw.text((SIDE_LEFT, top), title, font=font, fill=WHITE)
    bar_top, bar_height, bar_left, bar_width = top + 40, 260, SIDE_LEFT, 32
    gradient = np.repeat(hot_colormap(np.linspace(1.0, 0.0, bar_height))[:, None, :], bar_width, axis=1)
    canvas.paste(Image.fromarray(gradient), (bar_left, bar_top))
    draw.rectangle((bar_left - 1, bar_top - 1, bar_left + bar_width, bar_top + bar_height), outline=GREY)
    for value in (1.0, 0.5, 0.0):
        y = bar_top + (1.0 - value) * (bar_height - 1)
        draw.line((bar_left + bar_width, y, bar_left + bar_width + 8, y), fill=GREY, width=2)
        draw.text((bar_left + bar_width + 14, y), f"{value:.1f}", font=font, fill=WHITE, anchor="lm")
    return bar_top + bar_height + 30


def render_lesion_page(
    hu: np.ndarray,
    mask: np.ndarray,
    pixel_spacing: tuple[float, float],
    *,
    window: tuple[float, float],
    title: str,
    lines: Sequence[TextLine],
    side_lines: Sequence[TextLine] = (),
    demo_warning: str | None = None,
    heatmap: np.ndarray | None = None,
    heatmap_title: str = "Grad-CAM",
    fov_mm: float | None = None,
) -> tuple[np.ndarray, Placement]:
    """Render one lesion page.

    Parameters
    ----------
    hu: numpy.ndarray
        Key slice in Hounsfield units, shape (rows, columns).
    mask: numpy.ndarray
        Lesion mask on that slice, same shape; must not be empty.
    pixel_spacing: tuple[float, float]
        (row spacing, column spacing) in mm (DICOM Pixel Spacing order); the page has square
        pixels whatever the source spacing.
    window: tuple[float, float]
        (center, width) in HU.
    title: str
        Header text (when not DEMO) and first line of the side column.
    lines: Sequence[TextLine]
        Text panel lines, top to bottom (cut to fit).
    side_lines: Sequence[TextLine], optional
        Extra lines for the side column (below the legend).
    demo_warning: str | None, optional
        When given, the header is a red banner with this text.
    heatmap: numpy.ndarray | None, optional
        Values in [0, 1] on the slice grid, alpha-blended with :func:`hot_colormap`; a colour
        bar is drawn when given.
    heatmap_title: str, optional
        Caption of the colour bar.
    fov_mm: float | None, optional
        Side of the square field of view; default 2.5 x the lesion extent, at least 100 mm.

    Returns
    -------
    tuple[numpy.ndarray, Placement]
        The page (CANVAS x CANVAS x 3, uint8) and where the slice landed on it.

    Raises
    ------
    ValueError
        Shapes differ, the mask is empty, spacing or window is not positive, heat map outside [0, 1].
    """
    hu = np.asarray(hu)
    mask = np.asarray(mask, dtype=bool)
    if hu.ndim != 2 or mask.shape != hu.shape:
        raise ValueError(f"the slice must be 2D and the mask of the same shape, not {hu.shape} and {mask.shape}")
    if not mask.any():
        raise ValueError("the lesion mask is empty on the key slice")
    if len(pixel_spacing) != 2 or not all(math.isfinite(s) and s > 0 for s in pixel_spacing):
        raise ValueError(f"pixel spacing must be two positive numbers, not {pixel_spacing}")
    if heatmap is not None:
        heatmap = np.asarray(heatmap, dtype=np.float64)
        if heatmap.shape != hu.shape:
            raise ValueError(f"the heat map must have the slice shape {hu.shape}, not {heatmap.shape}")
        if not np.all(np.isfinite(heatmap)) or heatmap.min() < 0.0 or heatmap.max() > 1.0:
            raise ValueError("heat map values must be finite and in [0, 1]")
    if fov_mm is not None and not (math.isfinite(fov_mm) and fov_mm > 0):
        raise ValueError(f"fov_mm must be a positive number, not {fov_mm}")
    placement = _placement(mask, (float(pixel_spacing[0]), float(pixel_spacing[1])), fov_mm, hu.shape)
    page = np.zeros((CANVAS, CANVAS, 3), dtype=np.uint8)
    page[...] = BACKGROUND
    left, top, right, bottom = IMAGE_BOX
    page[top:bottom, left:right] = _slice_image(hu, mask, placement, window, heatmap)

    canvas = Image.fromarray(page)
    draw = ImageDraw.Draw(canvas)
    _header(draw, title, demo_warning)
    _scale_bar(draw, placement)
    y = _lines(draw, [TextLine(title, 26)], SIDE_LEFT, top + 16, CANVAS - SIDE_LEFT - 12, bottom)
    y += 12
    if heatmap is not None:
        y = _colour_bar(canvas, draw, y, heatmap_title)
    draw.line((SIDE_LEFT, y + 14, SIDE_LEFT + 40, y + 14), fill=CONTOUR, width=4)
    draw.text((SIDE_LEFT + 52, y + 14), "lesion contour", font=_font(24), fill=WHITE, anchor="lm")
    y += 44
    fov = placement.size * placement.mm_per_pixel
    extra = [TextLine(f"Window C {window[0]:g} / W {window[1]:g}", 24, GREY), TextLine(f"FOV {fov:.0f} mm", 24, GREY)]
    _lines(draw, [*extra, *side_lines], SIDE_LEFT, y, CANVAS - SIDE_LEFT - 12, bottom - 8)
    draw.line((0, TEXT_TOP, CANVAS, TEXT_TOP), fill=HEADER_GREY, width=2)
    _lines(draw, lines, 24, TEXT_TOP + 14, CANVAS - 48, CANVAS - 4)
    return np.asarray(canvas.convert("RGB")).copy(), placement


def render_summary_page(
    *,
    title: str,
    heading: str,
    columns: Sequence[tuple[str, int]],
    rows: Sequence[Sequence[str]],
    footer: Sequence[TextLine],
    demo_warning: str | None = None,
) -> np.ndarray:
    """Render a summary page: header, heading, a table, footer lines.

    Parameters
    ----------
    title: str
        Header text when not DEMO.
    heading: str
        First line under the header.
    columns: Sequence[tuple[str, int]]
        Column captions and their left x position (pixels).
    rows: Sequence[Sequence[str]]
        Table cells, one sequence per row, as many as ``columns``; rows that do not fit are
        summarised as "... and N more".
    footer: Sequence[TextLine]
        Lines at the bottom (model, version, date).
    demo_warning: str | None, optional
        When given, the header is a red banner with this text.

    Returns
    -------
    numpy.ndarray
        The page, CANVAS x CANVAS x 3, uint8.
    """
    canvas = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    _header(draw, title, demo_warning)
    y = _lines(draw, [TextLine(heading, 32, WHITE)], 24, HEADER_HEIGHT + 20, CANVAS - 48, CANVAS)
    font, row_height = _font(24), 36
    edges = [*(x for _, x in columns[1:]), CANVAS - 24]
    y += 10
    for (caption, x), right in zip(columns, edges, strict=True):
        draw.text((x, y), _fit(caption, font, right - x - 12), font=font, fill=GREY)
    y += row_height
    draw.line((24, y - 6, CANVAS - 24, y - 6), fill=HEADER_GREY, width=2)
    footer_top = CANVAS - 24 - sum(round(line.size * 1.3) for line in footer)
    capacity = max(0, (footer_top - 20 - y) // row_height)
    shown = rows if len(rows) <= capacity else rows[: max(0, capacity - 1)]
    for row in shown:
        for (_, x), right, cell in zip(columns, edges, row, strict=True):
            draw.text((x, y), _fit(cell, font, right - x - 12), font=font, fill=WHITE)
        y += row_height
    if len(shown) < len(rows):
        draw.text((24, y), f"... and {len(rows) - len(shown)} more (see the SR)", font=font, fill=GREY)
    draw.line((0, footer_top - 10, CANVAS, footer_top - 10), fill=HEADER_GREY, width=2)
    _lines(draw, footer, 24, footer_top, CANVAS - 48, CANVAS)
    return np.asarray(canvas).copy()
