"""Pipelines: one per method, each ``(ct_paths, segmentation_path, **options) -> PipelineOutput``.

``radiomics`` takes no options. The model methods ``m1`` .. ``m4`` (:data:`MODEL_METHODS`) take
``model=`` (a verified :class:`~inference.registry.ModelPackage` or a package path; the worker
passes :func:`~inference.pipelines.model_methods.installed_package` of ``[models]``) and
``explain=`` (Grad-CAM heat maps, default on).
"""

from collections.abc import Callable

from inference.pipelines.comparator import METHOD as COMPARATOR
from inference.pipelines.comparator import run_comparator
from inference.pipelines.m1_kras import METHOD as M1
from inference.pipelines.m1_kras import run_m1
from inference.pipelines.m2_egfr_kras import METHOD as M2
from inference.pipelines.m2_egfr_kras import run_m2
from inference.pipelines.m3_ras import METHOD as M3
from inference.pipelines.m3_ras import run_m3
from inference.pipelines.m4_radscore import METHOD as M4
from inference.pipelines.m4_radscore import run_m4
from inference.pipelines.model_methods import MODEL_METHODS, PACKAGED_METHODS
from inference.pipelines.radiomics import METHOD as RADIOMICS
from inference.pipelines.radiomics import run_radiomics
from inference.results import PipelineOutput

__all__ = ["MODEL_METHODS", "PACKAGED_METHODS", "PIPELINES", "Pipeline"]

Pipeline = Callable[..., PipelineOutput]

PIPELINES: dict[str, Pipeline] = {
    RADIOMICS: run_radiomics,
    M1: run_m1,
    M2: run_m2,
    M3: run_m3,
    M4: run_m4,
    COMPARATOR: run_comparator,
}
"""Method name (``[jobs] methods``) -> pipeline."""
