"""The Overview's charts as geometry for inline SVG, drawn by the server (no script: the CSP allows none).

Each function returns plain numbers and labels; ``overview.html`` turns them into ``<rect>``,
``<line>`` and ``<text>`` elements (Jinja escapes every label).
"""

from __future__ import annotations

from typing import Any

WIDTH = 480
"""Width of a chart's drawing box (the SVG viewBox), in its own units."""
BASELINE = 110
"""y of an hourly chart's baseline: bars grow up to 10."""


def hourly(points: list[dict[str, Any]], series: tuple[str, ...]) -> dict[str, Any]:
    """Stacked bars per hour: for each point and each key of ``series`` a rect (x, y, w, h, key, label).

    ``points`` are ``{"hour": ISO time, key: count, ...}``, oldest first (as :mod:`.data` gives them).
    """
    totals = [sum(int(p.get(key, 0)) for key in series) for p in points]
    top = max(totals, default=0) or 1
    width = WIDTH / max(len(points), 1)
    rects = []
    for i, point in enumerate(points):
        y = float(BASELINE)
        for key in series:
            n = int(point.get(key, 0))
            if n == 0 and len(series) > 1:
                continue
            height = round(n / top * 100, 1)
            y = round(y - height, 1)
            rects.append(
                {
                    "x": round(i * width + 1, 1),
                    "y": y,
                    "w": round(width - 2, 1),
                    "h": height,
                    "key": key,
                    "label": f"{point['hour'][11:16]} UTC: {n} {key.replace('_', ' ')}",
                }
            )
    return {
        "rects": rects,
        "top": max(totals, default=0),
        "first": points[0]["hour"][11:16] if points else "",
        "last": points[-1]["hour"][11:16] if points else "",
    }


def durations(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Horizontal bars per method: the median run time as the bar, the longest as a tick.

    ``rows`` are ``{"method", "jobs", "median_seconds", "max_seconds"}``; the scale is the longest run.
    """
    top = max((r["max_seconds"] for r in rows), default=0.0) or 1.0
    left, span, pitch = 90, WIDTH - 90 - 70, 22
    bars = []
    for i, row in enumerate(rows):
        y = 6 + i * pitch
        bars.append(
            {
                "method": row["method"],
                "y": y,
                "text_y": y + 11,
                "x": left,
                "w": max(round(row["median_seconds"] / top * span, 1), 1.0),
                "max_x": round(left + row["max_seconds"] / top * span, 1),
                "label": f"{row['method']}: {row['jobs']} job(s), median {row['median_seconds']:.1f} s, "
                f"longest {row['max_seconds']:.1f} s",
                "value": f"{row['median_seconds']:.1f} s (max {row['max_seconds']:.0f})",
                "value_x": left + span + 4,
            }
        )
    return {"bars": bars, "height": max(len(rows), 1) * pitch + 8}
