"""The radiomics comparator as a worker method, with the committed DEMO package."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference.phantom import generate_study
from inference.pipelines import PIPELINES
from inference.pipelines.comparator import run_comparator
from inference.pipelines.model_methods import installed_package
from pacs_agent.config import DEMO_MODELS_DIR, KNOWN_METHODS

PACKAGE = DEMO_MODELS_DIR / "radiomics-kras-crc-demo"


@pytest.mark.parametrize(("texture", "mutant"), [("coarse", True), ("smooth", False)])
def test_planted_texture_is_recognised(tmp_path: Path, texture: str, mutant: bool) -> None:
    study = generate_study(
        tmp_path, seed=900, lesions=2, slices=40, rows=128, columns=128, lesion_texture=texture, segmentation="seg"
    )
    output = run_comparator(study.ct_files, study.seg_file, model=PACKAGE)
    result = output.result
    assert result.algorithm.is_demo and result.algorithm.weights_sha256
    assert output.result_kind == "KRAS RF"
    for lesion in result.lesions:
        (prediction,) = result.predictions[lesion.tracking_uid]
        assert prediction.label == "KRAS"
        assert (prediction.status == "mutant") is mutant, prediction
        assert f"contributions {lesion.tracking_id}" in result.provenance
    again = run_comparator(study.ct_files, study.seg_file, model=PACKAGE).result
    assert again.predictions == result.predictions  # deterministic


def test_comparator_is_a_configurable_method_found_among_installed_packages() -> None:
    assert "comparator" in KNOWN_METHODS and PIPELINES["comparator"] is run_comparator
    assert installed_package("comparator", [DEMO_MODELS_DIR]).name == "radiomics-kras-crc-demo"
