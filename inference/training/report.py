"""Training reports: ``report.json`` (everything), ``report.md`` (readable) and ROC plots (PNG, Pillow).

Also the plain-text progress bar of ``pacs-agent train`` (stderr; no tqdm needed).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from inference.training.evaluate import LabelEvaluation

if TYPE_CHECKING:
    from inference.training.crossval import CVResult

__all__ = ["TextProgress", "draw_roc_png", "write_report"]

_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


class TextProgress:
    """A one-line progress bar on a text stream: ``stage [#####.....] 5/10 note``.

    On a terminal the line is redrawn in place; otherwise (logs, CI) a line is printed at most every
    ``interval`` seconds and at the end of each stage.
    """

    def __init__(self, stream: TextIO | None = None, *, width: int = 30, interval: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.interval = interval
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0.0

    def __call__(self, stage: str, done: int, total: int, note: str = "") -> None:
        """Report ``done`` of ``total`` steps of ``stage``."""
        now = time.monotonic()
        final = done >= total
        if not self._tty and not final and now - self._last < self.interval:
            return
        self._last = now
        filled = int(self.width * done / total) if total else self.width
        line = f"{stage:<14} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {note}".rstrip()
        if self._tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_roc_png(curves: Mapping[str, LabelEvaluation], path: str | Path, *, title: str = "", size: int = 560) -> Path:
    """Draw ROC curves (one per label, with AUC and 95% CI in the legend) to a PNG.

    Parameters
    ----------
    curves
        Label -> evaluation (its ``roc`` points and AUC).
    path
        Output file.
    title
        Heading above the plot.
    size
        Image width and height in pixels.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 70, 50, size - 25, size - 60
    font, small = _font(16), _font(13)

    def xy(fpr: float, tpr: float) -> tuple[float, float]:
        return left + fpr * (right - left), bottom - tpr * (bottom - top)

    for tick in range(6):
        v = tick / 5
        x, y = xy(v, v)
        draw.line([(x, top), (x, bottom)], fill=(225, 225, 225))
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((x - 10, bottom + 6), f"{v:.1f}", fill="black", font=small)
        draw.text((left - 34, y - 7), f"{v:.1f}", fill="black", font=small)
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.line([xy(0, 0), xy(1, 1)], fill=(150, 150, 150), width=1)
    draw.text(((left + right) / 2 - 80, bottom + 28), "1 - specificity (FPR)", fill="black", font=font)
    label_img = Image.new("RGB", (220, 22), "white")
    ImageDraw.Draw(label_img).text((0, 2), "sensitivity (TPR)", fill="black", font=font)
    img.paste(label_img.rotate(90, expand=True), (8, (top + bottom) // 2 - 110))
    if title:
        draw.text((left, 16), title, fill="black", font=font)
    texts = [
        f"{label}: AUC {ev.auc:.3f} ({_fmt(ev.auc_ci[0])}-{_fmt(ev.auc_ci[1])}), n={ev.n}"
        for label, ev in curves.items()
    ]
    widest = max((draw.textlength(t, font=small) for t in texts), default=0.0)
    lx = max(left + 8.0, right - 10.0 - widest - 32.0)  # legend in the lower right corner, inside the frame
    for i, (ev, text) in enumerate(zip(curves.values(), texts, strict=True)):
        colour = _COLOURS[i % len(_COLOURS)]
        points = [xy(f, t) for f, t in zip(ev.roc[0], ev.roc[1], strict=True)]
        draw.line(points, fill=colour, width=3)
        ly = bottom - 24 - 20 * (len(curves) - 1 - i)
        draw.line([(lx, ly + 8), (lx + 25, ly + 8)], fill=colour, width=3)
        draw.text((lx + 32, ly), text, fill="black", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
    return path


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _label_table(evaluations: Sequence[LabelEvaluation]) -> list[str]:
    lines = [
        "| label | n (positive) | AUC (95% CI, DeLong) | threshold | accuracy | sensitivity | specificity | F1 "
        "| Brier |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ev in evaluations:
        m = ev.metrics
        lines.append(
            f"| {ev.label} | {ev.n} ({ev.positives}) | {ev.auc:.3f} ({_fmt(ev.auc_ci[0])}-{_fmt(ev.auc_ci[1])}) | "
            f"{m.threshold:.3f} | {_fmt(m.accuracy)} | {_fmt(m.sensitivity)} | {_fmt(m.specificity)} | "
            f"{_fmt(m.f1)} | {ev.calibration.brier:.3f} |"
        )
    return lines


def _calibration_lines(ev: LabelEvaluation) -> list[str]:
    lines = [
        f"Reliability bins of {ev.label} (Brier {ev.calibration.brier:.3f}, ECE {ev.calibration.ece:.3f}):",
        "",
        "| predicted | n | mean predicted | observed rate |",
        "|---|---|---|---|",
    ]
    for b in ev.calibration.bins:
        if b.count:
            lines.append(
                f"| {b.lower:.1f}-{b.upper:.1f} | {b.count} | {b.mean_predicted:.3f} | {b.observed_rate:.3f} |"
            )
    return lines


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    summary: Mapping[str, Any],
    test: Sequence[LabelEvaluation],
    validation: Sequence[LabelEvaluation],
    cross_validation: Mapping[str, Any] | None = None,
    history: Sequence[Mapping[str, Any]] = (),
    repeated_cv: CVResult | None = None,
    final_fit: str = "",
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``roc-test.png`` and ``roc-validation.png``.

    Parameters
    ----------
    out_dir
        Folder (created).
    title
        Model name and version.
    summary
        Method, labels, data description, split sizes, thresholds, training settings.
    test, validation
        Per-label evaluations of the held-out test split and of the validation split.
    cross_validation
        Optional per-label cross-validation results (``{"folds": [...], "<label>": {...}}``).
    history
        Per-epoch training records.
    repeated_cv
        The repeated cross-validation (``scheme = "repeated-cv"``): its section replaces the held-out one.
    final_fit
        How the package's model was fit after the cross-validation (said in the report).

    Returns
    -------
    dict
        ``json``, ``markdown``, ``roc_test``, ``roc_validation``, ``roc_cv`` -> paths (those written).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "roc_test": out / "roc-test.png",
        "roc_validation": out / "roc-validation.png",
        "roc_cv": out / "roc-cv.png",
    }
    if repeated_cv is not None:
        draw_roc_png(
            {r.label: r.pooled for r in repeated_cv.labels},
            paths["roc_cv"],
            title=f"{title} - pooled out-of-fold",
        )
    if test:
        draw_roc_png({ev.label: ev for ev in test}, paths["roc_test"], title=f"{title} - held-out test")
    if validation:
        draw_roc_png({ev.label: ev for ev in validation}, paths["roc_validation"], title=f"{title} - validation")
    data = {
        "title": title,
        "summary": dict(summary),
        "test": [ev.as_dict() for ev in test],
        "validation": [ev.as_dict() for ev in validation],
        "cross_validation": dict(cross_validation or {}),
        "repeated_cv": None
        if repeated_cv is None
        else {
            "folds": repeated_cv.folds,
            "repeats": repeated_cv.plan.repeats,
            "permutations": repeated_cv.plan.permutations,
            "permutation_repeats": repeated_cv.plan.permutation_repeats,
            "seed": repeated_cv.plan.seed,
            "labels": [r.as_dict() for r in repeated_cv.labels],
        },
        "final_fit": final_fit,
        "history": list(history),
    }
    paths["json"].write_text(
        json.dumps(_finite(data), indent=1, allow_nan=False, default=_json_default) + "\n", encoding="utf-8"
    )
    lines = [f"# Training report: {title}", ""]
    for key, value in summary.items():
        if isinstance(value, Mapping):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        lines.append(f"- **{key}**: {value}")
    if repeated_cv is not None:
        lines += ["", *_repeated_cv_lines(repeated_cv)]
        if final_fit:
            lines += ["## The package", "", final_fit, ""]
    else:
        lines += ["", "## Held-out test split", ""]
        lines += _label_table(test) if test else ["(no test split)"]
    if test:
        lines += ["", "Thresholds were chosen by Youden's J on the validation split and applied unchanged.", ""]
        lines += ["![ROC, held-out test](roc-test.png)", ""]
        for ev in test:
            lines += [*_calibration_lines(ev), ""]
    if repeated_cv is None:
        lines += ["## Validation split (early stopping and thresholds)", ""]
        lines += _label_table(validation) if validation else ["(none)"]
    if cross_validation:
        lines += ["", "## Cross-validation on the development split (patient-level, stratified)", ""]
        lines += ["| label | folds | AUC mean | AUC SD | AUC min | AUC max |", "|---|---|---|---|---|---|"]
        for label, cv in cross_validation.items():
            if isinstance(cv, Mapping) and "auc_mean" in cv:
                lines.append(
                    f"| {label} | {cv['folds']} | {cv['auc_mean']:.3f} | {cv['auc_sd']:.3f} | "
                    f"{cv['auc_min']:.3f} | {cv['auc_max']:.3f} |"
                )
    if history:
        lines += ["", "## Training history", "", "| epoch | train loss | validation loss | validation AUC |"]
        lines.append("|---|---|---|---|")
        for h in history:
            lines.append(
                f"| {h['epoch']} | {_fmt(h.get('train_loss'))} | {_fmt(h.get('val_loss'))} | {_fmt(h.get('val_auc'))} |"
            )
    paths["markdown"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {k: v for k, v in paths.items() if v.exists()}


def _repeated_cv_lines(cv: CVResult) -> list[str]:
    plan = cv.plan
    lines = [
        f"## Repeated cross-validation ({cv.folds}-fold x {plan.repeats}, patient-grouped, label-stratified)",
        "",
        "Every patient is test data once per repeat; feature selection / early stopping happen inside each "
        "training part only (nested). The pooled AUC is that of each item's out-of-fold probability averaged "
        "over the repeats, with a DeLong 95% CI (lesions counted as independent).",
        "",
        "| label | n (positive) | pooled AUC (95% CI, DeLong) | AUC per repeat: mean (SD) [min-max] | "
        "permutation p | threshold | sensitivity | specificity | Brier |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in cv.labels:
        ev, m = r.pooled, r.pooled.metrics
        spread = (
            f"{r.repeat_mean:.3f} ({r.repeat_sd:.3f}) [{min(r.repeat_aucs):.3f}-{max(r.repeat_aucs):.3f}]"
            if r.repeat_aucs
            else "n/a"
        )
        p = f"{r.permutation_p:.3f} ({len(r.null)} permutations)" if r.null else "not run"
        lines.append(
            f"| {r.label} | {ev.n} ({ev.positives}) | {ev.auc:.3f} ({_fmt(ev.auc_ci[0])}-{_fmt(ev.auc_ci[1])}) | "
            f"{spread} | {p} | {r.threshold:.3f} | {_fmt(m.sensitivity)} | {_fmt(m.specificity)} | "
            f"{ev.calibration.brier:.3f} |"
        )
    lines += [
        "",
        "Permutation test: labels shuffled between patients and the whole cross-validation rerun "
        f"({plan.permutation_repeats} repeat per permutation); p = (1 + permutations with a mean pooled AUC at "
        "least the observed one) / (1 + permutations). The threshold is Youden's on the pooled out-of-fold "
        "probabilities, so sensitivity and specificity at it are optimistic.",
        "",
        "![ROC, pooled out-of-fold](roc-cv.png)",
        "",
    ]
    for r in cv.labels:
        if r.null:
            null = np.asarray(r.null)
            lines.append(
                f"- {r.label}: observed statistic {r.statistic:.3f}; under shuffled labels mean {null.mean():.3f}, "
                f"95th percentile {np.quantile(null, 0.95):.3f}"
            )
    lines.append("")
    for r in cv.labels:
        lines += [*_calibration_lines(r.pooled), ""]
    return lines


def _finite(value: Any) -> Any:
    """``value`` with every NaN / infinite float (e.g. an epoch AUC on a one-class validation split) as None.

    JSON has no NaN; ``null`` says "not defined" to every reader.
    """
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
