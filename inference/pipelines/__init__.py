"""Pipelines: one per method, each ``(ct_paths, segmentation_path) -> PipelineOutput``."""

from collections.abc import Callable, Sequence
from pathlib import Path

from inference.pipelines.radiomics import METHOD as RADIOMICS
from inference.pipelines.radiomics import run_radiomics
from inference.results import PipelineOutput

Pipeline = Callable[[Sequence[Path], Path], PipelineOutput]

PIPELINES: dict[str, Pipeline] = {RADIOMICS: run_radiomics}
"""Method name (``[jobs] methods``) -> pipeline."""
