"""The papers' training recipes: staged fine-tuning, initial weights, M3 SimCLR pretraining, M2 augmentation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.errors import ConfigError
from inference.networks import build_network, head_parameter_names
from inference.registry import load_package, verify_package
from inference.training.augment import DEFAULT_AUGMENTATION, Augmentation
from inference.training.config import config_from_mapping
from inference.training.initialise import RANDOM_INIT, load_initial_weights
from inference.training.phantom_data import PhantomCohortSpec, make_phantom_cohort
from inference.training.simclr import PretrainSettings, augment_view, nt_xent, pretrain
from inference.training.train import train

TINY = {"rows": 96, "slices": 28, "pixel_spacing_mm": 3.4, "lesion_scale": 1.2}
M3_ARCH = {"width": 0.1, "depth": 0.1, "heads": 2, "drop_path": 0.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    spec = PhantomCohortSpec(planted={"KRAS": "texture", "EGFR": "attenuation"}, patients=8, seed=77, lesions=1, **TINY)
    return make_phantom_cohort(tmp_path_factory.mktemp("cohort"), spec)


def _config(cohort, method: str, labels: list[str], **extra):
    raw = {
        "method": method,
        "labels": labels,
        "seed": 5,
        "package": {
            "name": f"{method}-recipe-test",
            "version": "0.0.1",
            "validation_status": "DEMO",
            "intended_use": "unit test - NOT FOR CLINICAL USE",
        },
        "data": {"studies": str(cohort.studies_dir), "labels": str(cohort.labels_csv)},
        "split": {"scheme": "holdout", "test_fraction": 0.25, "val_fraction": 0.34},
    }
    for key, value in extra.items():
        raw[key] = value
    return config_from_mapping(raw)


# -------------------------------------------------------------------------------------------- NT-Xent


def test_nt_xent_matches_values_worked_by_hand():
    # two images, identical views, orthogonal to each other; t = 1:
    # each anchor: positive similarity 1, negatives 0 and 0 -> -log(e / (e + 2))
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(nt_xent(z, z.clone(), 1.0)) == pytest.approx(-math.log(math.e / (math.e + 2)), abs=1e-6)
    # t = 0.5 doubles the logits: -log(e^2 / (e^2 + 2))
    assert float(nt_xent(z, z.clone(), 0.5)) == pytest.approx(-math.log(math.e**2 / (math.e**2 + 2)), abs=1e-6)
    # all 2N projections equal: the positive is one of 2N - 1 equal logits -> log(2N - 1)
    same = torch.ones(3, 4)
    assert float(nt_xent(same, same.clone(), 0.7)) == pytest.approx(math.log(5), abs=1e-6)
    # lengths do not matter (cosine similarity)
    assert float(nt_xent(3 * z, z.clone(), 1.0)) == pytest.approx(float(nt_xent(z, z.clone(), 1.0)), abs=1e-6)
    # views that agree score lower than views swapped between images
    assert float(nt_xent(z, z.flip(0), 0.5)) > float(nt_xent(z, z.clone(), 0.5))
    with pytest.raises(ValueError, match="N >= 2"):
        nt_xent(z[:1], z[:1])


def test_simclr_views_differ_stay_in_range_and_are_reproducible():
    image = np.random.default_rng(0).uniform(0, 255, (32, 32)).astype(np.float32)
    settings = PretrainSettings()
    a = augment_view(image, np.random.default_rng(1), settings)
    b = augment_view(image, np.random.default_rng(1), settings)
    c = augment_view(image, np.random.default_rng(2), settings)
    assert a.shape == image.shape and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 255
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ------------------------------------------------------------------------------------- SimCLR stage


@pytest.fixture(scope="module")
def checkpoint(cohort, tmp_path_factory):
    config = _config(
        cohort,
        "m3",
        ["KRAS"],
        input={"shape": [32, 32]},
        architecture=M3_ARCH,
        # mild views so that six epochs of a tiny encoder can learn to tell 8 lesions' crops apart
        pretrain={
            "epochs": 6,
            "batch_size": 8,
            "lr": 0.02,
            "crop_scale": [0.85, 1.0],
            "jitter": 0.0,
            "blur_probability": 0.0,
        },
    )
    return pretrain(config, tmp_path_factory.mktemp("simclr") / "ckpt")


def test_simclr_pretraining_lowers_the_contrastive_loss(checkpoint):
    losses = checkpoint.losses
    assert len(losses) == 6 and checkpoint.crops > checkpoint.lesions >= 8
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    # the same fixed view pairs score lower after training than before
    assert checkpoint.probe_after < checkpoint.probe_before
    assert (checkpoint.folder / "encoder.pt").is_file()
    text = (checkpoint.folder / "simclr.toml").read_text()
    assert "sha256" in text and "nt_xent_per_epoch" in text


def test_simclr_checkpoint_loads_into_the_supervised_m3_network(checkpoint):
    network = build_network("m3", ["KRAS", "EGFR"], M3_ARCH)
    loaded = load_initial_weights(network, checkpoint.folder)
    encoder = torch.load(checkpoint.folder / "encoder.pt", weights_only=True)
    assert not any(k.startswith("projection.") for k in encoder)
    state = network.state_dict()
    for key, value in encoder.items():
        assert torch.equal(state[key], value), key
    # everything but the new classifier came from the checkpoint
    assert loaded.how == "name" and loaded.source == "SimCLR checkpoint"
    assert loaded.total - loaded.matched == 2  # classifier.weight, classifier.bias
    # a tampered checkpoint is refused
    bad = checkpoint.folder.parent / "tampered"
    bad.mkdir()
    (bad / "simclr.toml").write_text((checkpoint.folder / "simclr.toml").read_text())
    (bad / "encoder.pt").write_bytes((checkpoint.folder / "encoder.pt").read_bytes() + b"x")
    with pytest.raises(ConfigError, match="sha256"):
        load_initial_weights(network, bad)


def test_m3_fine_tunes_from_the_simclr_checkpoint_and_the_package_says_so(cohort, checkpoint, tmp_path):
    config = _config(
        cohort,
        "m3",
        ["KRAS"],
        input={"shape": [32, 32]},
        architecture=M3_ARCH,
        training={"epochs": 1, "batch_size": 8, "init_from": str(checkpoint.folder)},
    )
    result = train(config, tmp_path / "pkg")
    assert verify_package(result.package) == []
    init = load_package(result.package).training_data["initialisation"]
    assert init["source"] == "SimCLR checkpoint" and init["file"] == "encoder.pt" and init["tensors_loaded"] > 10
    assert "SimCLR checkpoint encoder.pt" in (result.package / "report" / "report.md").read_text()


def test_cli_pretrain_simclr_writes_a_checkpoint(cohort, tmp_path, capsys):
    from pacs_agent.cli import main

    config = tmp_path / "train.toml"
    config.write_text(
        "\n".join(
            [
                'method = "m3"',
                'labels = ["KRAS"]',
                "[package]",
                'name = "m3-cli"',
                'version = "0.1"',
                'intended_use = "unit test - NOT FOR CLINICAL USE"',
                "[data]",
                f'studies = "{cohort.studies_dir}"',
                f'labels = "{cohort.labels_csv}"',
                "[input]",
                "shape = [24, 24]",
                "[architecture]",
                *(f"{k} = {v}" for k, v in M3_ARCH.items()),
                "[pretrain]",
                "epochs = 1",
                "batch_size = 16",
            ]
        )
        + "\n"
    )
    out = tmp_path / "ckpt"
    assert main(["train", "m3", "--pretrain", "simclr", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"checkpoint: {out}" in printed and "--init-from" in printed
    assert (out / "simclr.toml").is_file()
    assert main(["train", "m1", "--pretrain", "simclr", "--config", str(config), "--out", str(out)]) == 1


def test_pretrain_table_is_checked(cohort):
    with pytest.raises(ConfigError, match="m3 stage"):
        _config(cohort, "m1", ["KRAS"], pretrain={"epochs": 2})
    config = _config(cohort, "m3", ["KRAS"], pretrain={"epochs": 0, "colour": 1})
    with pytest.raises(ConfigError, match="colour"):
        pretrain(config, "/nonexistent/out")


# ----------------------------------------------------------------------------------- initial weights


def test_weights_file_matched_by_name_or_by_trunk_order(tmp_path):
    source = build_network("m4", ["KRAS"], {"width": 0.1, "blocks": [1, 1], "in_channels": 3})
    # a torchvision-like file: other key names, same trunk order, an RGB stem, its own classifier
    renamed = {
        f"features.t{n}.{k.rsplit('.', 1)[-1]}": v for n, (k, v) in enumerate(source.backbone.state_dict().items())
    }
    renamed["classifier.weight"] = torch.zeros(1000, 8)
    path = tmp_path / "imagenet-style.pth"
    torch.save({"state_dict": renamed}, path)
    target = build_network("m4", ["KRAS", "EGFR"], {"width": 0.1, "blocks": [1, 1]})  # 1-channel input
    loaded = load_initial_weights(target, path)
    assert loaded.how == "order (trunk)"
    stem_rgb = source.backbone.features[0].weight
    assert torch.allclose(target.backbone.features[0].weight, stem_rgb.sum(dim=1, keepdim=True))
    assert torch.equal(target.backbone.features[1].running_mean, source.backbone.features[1].running_mean)
    # by name: a state dict of the same network (e.g. from another package), with a "module." prefix
    own = tmp_path / "own.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, own)
    again = build_network("m4", ["KRAS"], {"width": 0.1, "blocks": [1, 1], "in_channels": 3})
    assert load_initial_weights(again, own).how == "name"
    assert torch.equal(again.fc2.weight, source.fc2.weight)
    # nothing fits: refused with the reason
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"a.weight": torch.zeros(3, 3)}, unrelated)
    with pytest.raises(ConfigError, match="no tensor"):
        load_initial_weights(target, unrelated)
    (tmp_path / "notes.pt").write_text("not weights")
    with pytest.raises(ConfigError, match="not a torch weights file"):
        load_initial_weights(target, tmp_path / "notes.pt")


# ------------------------------------------------------------------------------------------------ M2


def test_m2_defaults_are_the_papers_recipe(cohort):
    config = _config(cohort, "m2", ["EGFR", "KRAS"])
    t = config.training
    assert (t.optimizer, t.lr, t.batch_size, t.patience, t.stages, t.init_from) == (
        "sgd",
        1e-3,
        16,
        5,
        "staged",
        None,
    )
    aug = DEFAULT_AUGMENTATION["m2"]
    assert aug.flips and aug.quarter_turns and aug.translate_axes == "one" and aug.independent_views
    assert aug.rotate_deg == (0.0, 0.0)  # only multiples of 90 degrees


def test_m2_augmentation_transforms_each_view_on_its_own():
    views = np.zeros((1, 9, 8, 8), dtype=np.float32)
    views[0, :, 0, 0] = 1.0  # a marker in the same corner of every view
    aug = Augmentation(probability=1.0, flips=True, quarter_turns=True, independent_views=True)
    out = aug.apply(views, np.random.default_rng(3))[0]
    corners = {tuple(np.argwhere(v == 1.0)[0]) for v in out}
    assert len(corners) > 1  # views went different ways
    assert np.allclose(out.sum(axis=(1, 2)), 1.0)  # lossless
    one_axis = Augmentation(probability=1.0, translate_px=(2,), translate_axes="one")
    grid = np.arange(64, dtype=np.float32).reshape(1, 8, 8)
    for seed in range(6):
        shifted = one_axis.apply(grid, np.random.default_rng(seed))[0]
        rows_intact = np.allclose(np.diff(shifted, axis=1), 1)  # moved up / down: every row is an input row
        cols_intact = np.allclose(np.diff(shifted, axis=0), 8)  # moved left / right
        assert rows_intact != cols_intact  # along one axis only
    with pytest.raises(ValueError, match="translate_axes"):
        Augmentation.from_mapping({"translate_axes": "diagonal"}, Augmentation())


def test_staged_fine_tuning_trains_new_layers_first_then_everything(cohort, tmp_path):
    arch = {"width": 0.1, "blocks": 1, "convs_per_block": 1}
    config = _config(
        cohort,
        "m1",
        ["KRAS"],
        input={"shape": [16, 16], "margin_px": 2},
        architecture=arch,
        training={"epochs": 2, "head_epochs": 2, "batch_size": 4, "patience": 5, "stages": "staged"},
    )
    result = train(config, tmp_path / "pkg")
    import json

    history = json.loads((result.package / "report" / "report.json").read_text())["history"]
    assert [h["stage"] for h in history] == ["new layers", "new layers", "all layers", "all layers"]
    package = load_package(result.package)
    assert package.training_data["fine_tuning"] == "staged"
    assert package.training_data["initialisation"]["source"] == RANDOM_INIT
    assert "staged: new FC layers first" in (result.package / "report" / "report.md").read_text()
    assert head_parameter_names("m1", build_network("m1", ["KRAS"], arch)) == ["fc.weight", "fc.bias"]
    net = build_network("m2", ["EGFR", "KRAS"], {"width": 0.05, "repeats": [1, 1, 1], "shared_views": True})
    names = head_parameter_names("m2", net)
    assert "fusion_weight" in names and any(".heads." in n for n in names) and not any(".trunk." in n for n in names)


def test_frozen_layers_do_not_move_in_stage_one(cohort, tmp_path):
    from inference.training.train import _NetworkFit

    config = _config(
        cohort,
        "m1",
        ["KRAS"],
        input={"shape": [16, 16], "margin_px": 2},
        architecture={"width": 0.1, "blocks": 1, "convs_per_block": 1},
        training={"epochs": 1, "batch_size": 4, "stages": "staged", "head_epochs": 1, "augment": {"enabled": False}},
    )
    from inference.training.datasets import build_caseset

    cases = build_caseset(
        "m1", ["KRAS"], cohort.studies_dir, cohort.labels_csv, input_spec={"shape": [16, 16], "margin_px": 2}
    )
    fit = _NetworkFit(config, lambda *a: None)
    torch.manual_seed(5)
    before = build_network("m1", ["KRAS"], config.architecture).state_dict()
    seen: list[dict[str, torch.Tensor]] = []
    original = fit._run_stage

    def spy(stage, params, epochs, history):
        out = original(stage, params, epochs, history)
        seen.append({k: v.clone() for k, v in fit._network.state_dict().items()})
        return out

    fit._run_stage = spy  # type: ignore[method-assign]
    fit.fit(cases.subset(range(6)), cases.subset([6, 7]))
    after_stage_one = seen[0]
    assert torch.equal(after_stage_one["stem.0.weight"], before["stem.0.weight"])
    assert not torch.equal(after_stage_one["fc.weight"], before["fc.weight"])


def test_init_from_must_exist(cohort, tmp_path):
    with pytest.raises(ConfigError, match="init_from"):
        _config(cohort, "m1", ["KRAS"], training={"init_from": str(tmp_path / "missing.pt")})
    with pytest.raises(ConfigError, match="stages"):
        _config(cohort, "m1", ["KRAS"], training={"stages": "three"})


# ------------------------------------------------------------------------------------------------ M4

SMALL_RADIOMICS = """setting:
  binWidth: 25
  label: 1
  minimumROIDimensions: 2
imageType:
  Original: {}
featureClass:
  firstorder: [Mean, Variance, Entropy, Skewness]
  glcm: [Contrast, JointEntropy]
"""


def test_m4_radiomics_default_is_the_papers_851_features():
    from ruamel.yaml import YAML

    from inference.training.datasets import M4_RADIOMICS_SETTINGS

    path = Path(__file__).parents[2] / "config" / "radiomics" / "m4_deep_radscore.yaml"
    shipped = YAML(typ="safe").load(path.read_text())
    assert shipped == M4_RADIOMICS_SETTINGS
    assert set(shipped["imageType"]) == {"Original", "Wavelet"}


def test_final_classifier_selection_picks_by_cross_validated_auc():
    from inference.training.final_classifier import CLASSIFIERS, select_classifier

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 20)
    groups = [f"p{i // 2}" for i in range(40)]  # two items per patient
    features = np.column_stack([y * 3.0 + rng.normal(0, 0.5, 40), rng.normal(0, 1, (40, 3))])
    choice = select_classifier(features, y, groups, folds=5, repeats=2, seed=1)
    assert choice.name in CLASSIFIERS and set(choice.cv_auc) == set(CLASSIFIERS)
    assert choice.cv_auc[choice.name] == max(choice.cv_auc.values()) > 0.9
    assert choice.folds == 10 and choice.repeats == 2
    assert choice.estimator.predict_proba(features)[:, 1][y == 1].mean() > 0.5
    only = select_classifier(features, y, groups, candidates=("NB",))
    assert only.name == "NB" and only.cv_auc == {} and only.repeats == 0
    with pytest.raises(ValueError, match="unknown classifier"):
        select_classifier(features, y, groups, candidates=("XGB",))
    with pytest.raises(ValueError, match="both classes"):
        select_classifier(features, np.zeros(40), groups)


def test_m4_trains_radscores_per_endpoint_and_a_selected_final_classifier(cohort, tmp_path):
    from inference.pipelines import PIPELINES
    from inference.training.datasets import index_studies
    from inference.training.final_classifier import CLASSIFIERS
    from inference.training.predict import Predictor, evaluate_package

    params = tmp_path / "small.yaml"
    params.write_text(SMALL_RADIOMICS)
    config = _config(
        cohort,
        "m4",
        ["KRAS", "EGFR"],
        input={"shape": [32, 32]},
        architecture={"width": 0.1, "blocks": [1, 1], "hidden": 8},
        training={"epochs": 1, "batch_size": 4, "classifier_cv_folds": 2, "classifier_cv_repeats": 1},
        radiomics={"params": str(params), "cv_folds": 2},
        split={"scheme": "holdout", "test_fraction": 0.0, "val_fraction": 0.25},
    )
    assert config.training.final_classifier == "select"
    result = train(config, tmp_path / "pkg")
    assert verify_package(result.package) == []
    package = load_package(result.package)
    spec = package.input_spec
    assert set(spec["radscore"]) == {"KRAS", "EGFR"}
    assert all(set(spec["radscore"][label]) == {"tumour", "peritumoral"} for label in ("KRAS", "EGFR"))
    assert package.architecture["radscores"] == 4 and len(package.normalisation["radscore_mean"]) == 4
    assert set(spec["final_classifier"]) == {"KRAS", "EGFR"} and set(spec["final_classifier"].values()) <= set(
        CLASSIFIERS
    )
    assert set(package.training_data["final_classifier"]["KRAS"]["cv_auc"]) <= set(CLASSIFIERS)
    # inference uses the chosen classifiers on the deep features
    model = package.model
    assert set(model.final_classifiers) == {"KRAS", "EGFR"}
    cases, p, _ = evaluate_package(result.package, cohort.studies_dir, cohort.labels_csv)
    predictor = Predictor.from_package(package)
    from inference.networks import DeepRadInput

    h = model.features(DeepRadInput(cases.arrays["patch"], predictor.radscore_matrix(cases)))
    expected = model.final_classifiers["EGFR"].predict_proba(h)[:, 1]
    np.testing.assert_allclose(p[:, 1], expected, atol=1e-6)
    # and the node's pipeline runs the package on a DICOM study
    study = next(iter(index_studies(cohort.studies_dir).values()))
    output = PIPELINES["m4"](list(study.ct_files), study.segmentation, model=result.package, explain=False)
    assert "KRAS/tumour" in output.result.provenance["radscores"]
