"""Pipelines: one per method, each ``(ct_paths, segmentation_path, **options) -> PipelineOutput``.

``radiomics`` takes no options. The model methods ``m1`` .. ``m4`` (:data:`MODEL_METHODS`) take
``model=`` (a verified :class:`~inference.registry.ModelPackage` or a package path; the worker
passes :func:`~inference.pipelines.model_methods.installed_package` of ``[models]``) and
``explain=`` (Grad-CAM heat maps, default on).
"""

from collections.abc import Callable

from inference.methods import load_pipeline, method_names
from inference.pipelines.model_methods import MODEL_METHODS, PACKAGED_METHODS
from inference.results import PipelineOutput

__all__ = ["MODEL_METHODS", "PACKAGED_METHODS", "PIPELINES", "Pipeline"]

Pipeline = Callable[..., PipelineOutput]

PIPELINES: dict[str, Pipeline] = {name: load_pipeline(name) for name in method_names(pair=False)}
"""Single-study method (``[jobs] methods``) -> pipeline, from the registry (:mod:`inference.methods`)."""
