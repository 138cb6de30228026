"""Phantom studies for the integration tests, generated once per test process and shared read-only.

Each pytest-xdist worker is a process of its own with its own temporary folder, so workers never share
(or race on) a study; within a worker, tests asking for the same options get the same files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inference.phantom import PhantomStudy, generate_follow_up, generate_study

DEFAULT_OPTIONS: dict[str, Any] = {"seed": 21, "lesions": 1, "slices": 20, "rows": 64, "columns": 64}
"""A small CT with one lesion, its SEG and its RTSTRUCT: enough for receiving, access control and a quick job."""


class Phantoms:
    """Generated studies by their options. Tests must not change the files (copy them first)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._studies: dict[tuple[Any, ...], PhantomStudy] = {}

    def study(self, **options: Any) -> PhantomStudy:
        """``generate_study(folder, **options)``, written on the first call with these options."""
        return self._cached(("study", *sorted(options.items())), lambda out: generate_study(out, **options))

    def follow_up(self, baseline: PhantomStudy, **options: Any) -> PhantomStudy:
        """``generate_follow_up(baseline, folder, **options)``, written on the first call with these arguments."""
        key = ("follow-up", baseline.study_instance_uid, *sorted(options.items()))
        return self._cached(key, lambda out: generate_follow_up(baseline, out, **options))

    def _cached(self, key: tuple[Any, ...], make: Any) -> PhantomStudy:
        if key not in self._studies:
            self._studies[key] = make(self.root / f"study-{len(self._studies) + 1}")
        return self._studies[key]
