"""Patient-level splits: a patient's lesions, slices and studies always stay in one fold.

Stratification is on the patient's label pattern (for multi-label data the combination of all
labels, e.g. ``"1|0|1"``; a patient with lesions of both classes takes the majority), so every fold
keeps roughly the class balance of the whole set. Splits are reproducible for a seed.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Fold",
    "assert_patient_disjoint",
    "patient_kfold",
    "patient_split",
    "patient_strata",
]


@dataclass(frozen=True)
class Fold:
    """Item indices of one split; ``repeat`` and ``fold`` number it within a repeated k-fold."""

    train: np.ndarray
    test: np.ndarray
    repeat: int = 0
    fold: int = 0


def patient_strata(patients: Sequence[str], labels: np.ndarray) -> dict[str, str]:
    """One stratum string per patient: its majority value of each label (missing labels as ``-``).

    Parameters
    ----------
    patients
        Patient id of each item.
    labels
        (items, labels) array of 0 / 1 / NaN, or (items,) for one label.

    Returns
    -------
    dict
        Patient id -> stratum, e.g. ``"1|0"``.
    """
    y = np.asarray(labels, dtype=float)
    if y.ndim == 1:
        y = y[:, None]
    if y.shape[0] != len(patients):
        raise ValueError(f"{len(patients)} patient ids for {y.shape[0]} label rows")
    rows: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(patients):
        rows[p].append(i)
    strata = {}
    for p, idx in rows.items():
        parts = []
        for column in y[idx].T:
            known = column[~np.isnan(column)]
            parts.append("-" if known.size == 0 else str(round(float(known.mean()) + 1e-9)))
        strata[p] = "|".join(parts)
    return strata


def _assign(groups: dict[str, list[str]], k: int, rng: np.random.Generator) -> dict[str, int]:
    """Deal the patients of each stratum round-robin over ``k`` folds, after a shuffle."""
    fold_of: dict[str, int] = {}
    sizes = np.zeros(k, dtype=int)
    for stratum in sorted(groups):
        members = list(groups[stratum])
        rng.shuffle(members)
        start = int(np.argmin(sizes))  # start where the folds are smallest, keeps the totals even
        for j, patient in enumerate(members):
            f = (start + j) % k
            fold_of[patient] = f
            sizes[f] += 1
    return fold_of


def _by_stratum(strata: dict[str, str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for patient in sorted(strata):
        groups[strata[patient]].append(patient)
    return groups


def patient_kfold(
    patients: Sequence[str], labels: np.ndarray, *, k: int = 5, repeats: int = 1, seed: int = 0
) -> Iterator[Fold]:
    """Stratified k-fold over patients, repeated with different shuffles.

    Parameters
    ----------
    patients
        Patient id of each item (lesion, slice, ...).
    labels
        (items, labels) or (items,) array of 0 / 1 / NaN.
    k
        Number of folds (>= 2, at most the number of patients).
    repeats
        Repetitions, each with its own shuffle (seed ``seed + repeat``).
    seed
        Base seed.

    Yields
    ------
    Fold
        ``train`` / ``test`` item indices; each patient is in the test part of exactly one fold
        per repeat and never in both parts.
    """
    strata = patient_strata(patients, labels)
    if not 2 <= k <= len(strata):
        raise ValueError(f"k must be between 2 and the number of patients ({len(strata)}), got {k}")
    ids = np.asarray(patients, dtype=object)
    for r in range(repeats):
        fold_of = _assign(_by_stratum(strata), k, np.random.default_rng([seed, r]))
        item_fold = np.array([fold_of[p] for p in ids])
        for f in range(k):
            yield Fold(np.flatnonzero(item_fold != f), np.flatnonzero(item_fold == f), repeat=r, fold=f)


def patient_split(
    patients: Sequence[str], labels: np.ndarray, *, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split items in two by patient, stratified: about ``fraction`` of each stratum's patients go right.

    Parameters
    ----------
    patients
        Patient id of each item.
    labels
        (items, labels) or (items,) array of 0 / 1 / NaN.
    fraction
        Share of patients in the second part, in (0, 1).
    seed
        Shuffle seed.

    Returns
    -------
    tuple of numpy.ndarray
        ``(first, second)`` item indices. Each stratum with at least two patients puts at least one
        in each part.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    strata = patient_strata(patients, labels)
    if len(strata) < 2:
        raise ValueError("a split needs at least two patients")
    rng = np.random.default_rng(seed)
    right: set[str] = set()
    for _stratum, members in sorted(_by_stratum(strata).items()):
        members = list(members)
        rng.shuffle(members)
        n = round(len(members) * fraction)
        if len(members) >= 2:
            n = min(max(n, 1), len(members) - 1)
        right.update(members[:n])
    in_right = np.array([p in right for p in patients])
    return np.flatnonzero(~in_right), np.flatnonzero(in_right)


def assert_patient_disjoint(patients: Sequence[str], *parts: np.ndarray) -> None:
    """Raise ValueError when any patient has items in two of ``parts``.

    Parameters
    ----------
    patients
        Patient id of each item.
    parts
        Item index arrays (train, validation, test, ...).
    """
    seen: Counter[str] = Counter()
    for part in parts:
        seen.update({patients[int(i)] for i in part})
    shared = sorted(p for p, n in seen.items() if n > 1)
    if shared:
        raise ValueError(f"{len(shared)} patient(s) appear in more than one split")
