"""Which columns of a features CSV are features: chosen explicitly, never a label in disguise.

A features CSV often carries more than features: ids, covariates, the label trained on, and other
labels of the same patients (a radiogenomics table has KRAS *and* EGFR). Taking "every other column"
as a feature silently turns another mutation's label into a predictor. :func:`select_feature_columns`
therefore takes features only

- **explicitly**: ``feature_columns`` (exact names), ``feature_prefixes`` (e.g. ``original_``,
  ``log-sigma-``, ``wavelet-``) and / or ``feature_regex`` (a Python regular expression that must
  match the whole name); other columns are then not used; or
- **by default**: every column named like a pyradiomics feature (:data:`PYRADIOMICS_NAME`,
  ``<image type>_<feature class>_<feature>``); any other column that is not an id, a covariate, a
  label, a ``diagnostics_*`` column of pyradiomics, a column that looks like a label, or listed in
  ``ignore_columns`` is an error that names it.

A column that looks like a label (:func:`looks_like_label`: one of the configured labels, or a name
whose words include a known gene / label name such as EGFR, KRAS, ALK, TP53, PD-L1, MSI, response)
is never a feature, whichever way the features were chosen: asking for one explicitly is an error.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from inference.errors import InputError

__all__ = [
    "ID_COLUMNS",
    "KNOWN_LABEL_NAMES",
    "PYRADIOMICS_NAME",
    "ColumnSelection",
    "FeatureColumnError",
    "is_pyradiomics_feature",
    "looks_like_label",
    "select_feature_columns",
]

ID_COLUMNS = ("patient_id", "study_uid", "lesion", "age", "sex", "smoking")
"""Id and covariate columns of the labels and features CSVs (never features)."""

KNOWN_LABEL_NAMES = frozenset(
    {
        # genes and biomarkers of the five papers and their neighbours
        "kras",
        "nras",
        "hras",
        "ras",
        "braf",
        "pik3ca",
        "egfr",
        "alk",
        "ros1",
        "tp53",
        "p53",
        "met",
        "her2",
        "erbb2",
        "ret",
        "ntrk",
        "stk11",
        "keap1",
        "msi",
        "mmr",
        "pd1",
        "pdl1",
        "pd",
        # endpoints and generic label words
        "lvi",
        "mutation",
        "mutant",
        "mutated",
        "wildtype",
        "label",
        "labels",
        "target",
        "outcome",
        "response",
        "responder",
        "insensitive",
        "sensitive",
        "recurrence",
        "survival",
        "os",
        "pfs",
        "status",
        "class",
        "diagnosis",
        "tstage",
        "stage",
        "grade",
    }
)
"""Words that make a column name look like a label (compared lower-case, per word of the name)."""

_GENES = ("kras", "nras", "hras", "braf", "pik3ca", "egfr", "alk", "ros1", "tp53", "erbb2", "her2", "stk11", "keap1")

_IMAGE_TYPE = (
    r"(?:original|log-sigma-\d+(?:-\d+)?-mm-[23]D|wavelet\d?-[HL]{2,3}|square|squareroot|logarithm|exponential"
    r"|gradient|lbp-[23]D(?:-[A-Za-z0-9]+)?)"
)
_FEATURE_CLASS = r"(?:shape|shape2D|firstorder|glcm|glrlm|glszm|gldm|ngtdm)"
PYRADIOMICS_NAME = re.compile(rf"^{_IMAGE_TYPE}_{_FEATURE_CLASS}_[A-Za-z0-9]+$")
"""A pyradiomics feature name, e.g. ``original_glcm_Contrast``, ``log-sigma-3-0-mm-3D_firstorder_Entropy``,
``wavelet-HLL_glszm_ZoneEntropy``."""


class FeatureColumnError(InputError):
    """The features CSV's columns cannot be used as asked (unknown columns, a label chosen as a feature)."""


def is_pyradiomics_feature(name: str) -> bool:
    """True when ``name`` is named like a pyradiomics feature (``<image type>_<class>_<feature>``)."""
    return bool(PYRADIOMICS_NAME.match(name))


def _words(name: str) -> set[str]:
    """Lower-case words of a column name; ``PD-L1`` and ``pd_l1`` also give ``pdl1``, ``T-stage`` gives ``tstage``."""
    parts = [p for p in re.split(r"[^A-Za-z0-9]+", name.lower()) if p]
    words = set(parts)
    words.update(a + b for a, b in itertools.pairwise(parts))
    # camelCase and digits glued to letters: "KRASstatus" -> kras, status; "EGFR2" -> egfr
    words.update(t.lower() for t in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+", name))
    # a gene name at the start of a word, glued to more text: "KRASmutation", "egfrstatus"
    compact = re.sub(r"[^a-z0-9]", "", name.lower())
    words.update(g for g in _GENES if re.search(rf"(?:^|[^a-z0-9]){g}", name.lower()) or compact.startswith(g))
    return words


def looks_like_label(name: str, labels: Sequence[str] = ()) -> bool:
    """True when a column name is one of ``labels`` or contains a known label / gene word.

    Pyradiomics feature names never look like labels (their words are image types, classes and
    feature names).

    Parameters
    ----------
    name
        Column name.
    labels
        The configured labels (any name is a label when it equals one, case-insensitively).
    """
    if is_pyradiomics_feature(name):
        return False
    if name.strip().lower() in {label.strip().lower() for label in labels}:
        return True
    return bool(_words(name) & KNOWN_LABEL_NAMES)


@dataclass(frozen=True)
class ColumnSelection:
    """The feature columns chosen and why the others were not."""

    features: tuple[str, ...]
    rule: str
    """How they were chosen, for the report (``"pyradiomics-named columns"``, ``"prefixes original_, ..."``)."""
    label_like: tuple[str, ...] = ()
    """Columns skipped because they look like labels (other mutations, outcomes)."""
    ignored: tuple[str, ...] = ()
    """Other columns not used (ids, covariates, diagnostics, ``ignore_columns``, or outside an explicit choice)."""


def select_feature_columns(
    columns: Sequence[str],
    labels: Sequence[str],
    *,
    feature_columns: Sequence[str] | None = None,
    feature_prefixes: Sequence[str] | None = None,
    feature_regex: str | None = None,
    ignore_columns: Sequence[str] = (),
    source: str = "the features CSV",
) -> ColumnSelection:
    """Choose the feature columns of a features CSV.

    Parameters
    ----------
    columns
        The CSV header.
    labels
        The labels trained on (these columns must exist and are never features).
    feature_columns, feature_prefixes, feature_regex
        Explicit choice (any combination; a column is a feature when any of them selects it).
    ignore_columns
        Extra non-feature columns to tolerate in the default mode (e.g. a site's own ``scanner``).
    source
        Name of the CSV in messages.

    Returns
    -------
    ColumnSelection

    Raises
    ------
    FeatureColumnError
        A label column is missing; an explicit feature column is missing or looks like a label; in
        the default mode, a column that is neither a pyradiomics feature nor a known non-feature
        (the message names it and says how to choose features explicitly); or no feature at all.
    """
    columns = [str(c) for c in columns]
    missing_labels = [label for label in labels if label not in columns]
    if missing_labels:
        raise FeatureColumnError(f"{source} lacks the label column(s) {missing_labels}")
    explicit = bool(feature_columns) or bool(feature_prefixes) or bool(feature_regex)
    pattern = None
    if feature_regex:
        try:
            pattern = re.compile(feature_regex)
        except re.error as exc:
            raise FeatureColumnError(
                f"feature_regex {feature_regex!r} is not a valid regular expression: {exc}"
            ) from None
    fixed = {"patient_id", "study_uid", "lesion", "age", "sex", "smoking", *labels, *ignore_columns}
    if explicit:
        wanted = list(feature_columns or [])
        absent = [c for c in wanted if c not in columns]
        if absent:
            raise FeatureColumnError(f"{source} lacks the feature column(s) {absent} named in feature_columns")
        chosen = []
        for c in columns:
            if c in fixed and c not in wanted:
                continue
            if (
                c in wanted
                or any(c.startswith(p) for p in feature_prefixes or ())
                or (pattern is not None and pattern.fullmatch(c))
            ):
                chosen.append(c)
        bad = [c for c in chosen if c in labels or c in ID_COLUMNS or looks_like_label(c, labels)]
        if bad:
            raise FeatureColumnError(
                f"{source}: column(s) {bad} look like labels, ids or covariates and are never used as features; "
                "remove them from feature_columns / narrow feature_prefixes or feature_regex"
            )
        rule = "; ".join(
            part
            for part in (
                f"listed columns ({len(wanted)})" if wanted else "",
                f"prefixes {', '.join(feature_prefixes)}" if feature_prefixes else "",
                f"regex {feature_regex}" if feature_regex else "",
            )
            if part
        )
        ignored = tuple(c for c in columns if c not in chosen)
        label_like = tuple(c for c in ignored if c not in labels and looks_like_label(c, labels))
    else:
        chosen, label_like_list, unknown, ignored_list = [], [], [], []
        for c in columns:
            if c in fixed or c.startswith("diagnostics_"):
                ignored_list.append(c)
            elif is_pyradiomics_feature(c):
                chosen.append(c)
            elif looks_like_label(c, labels):
                label_like_list.append(c)
            else:
                unknown.append(c)
        if unknown:
            raise FeatureColumnError(
                f"{source}: column(s) {unknown} are neither pyradiomics features (<image type>_<class>_<feature>), "
                "ids, covariates nor labels; choose the features explicitly ([data] feature_columns, "
                "feature_prefixes or feature_regex) or list such columns in [data] ignore_columns"
            )
        rule = "pyradiomics-named columns"
        label_like, ignored = tuple(label_like_list), tuple(ignored_list)
    if not chosen:
        raise FeatureColumnError(f"{source} has no feature column ({rule or 'default rule'})")
    return ColumnSelection(features=tuple(chosen), rule=rule, label_like=label_like, ignored=ignored)
