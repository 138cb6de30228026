"""Training configuration (``TRAIN.toml``): read once, validated, frozen.

Example (every table optional except ``[package]`` and a data source)::

    method = "m1"                   # or given on the command line
    labels = ["KRAS"]
    seed = 0
    threads = 1                     # torch CPU threads (1 = reproducible, bit for bit)

    [package]
    name = "m1-kras-crc"
    version = "1.0.0"
    validation_status = "RESEARCH"  # DEMO | RESEARCH | VALIDATED
    intended_use = "..."
    description = "..."

    [data]                          # one of: studies + labels | features | [data.phantom]
    studies = "/data/crc"           # DICOM folder tree (relative paths: to this file)
    labels = "/data/crc/labels.csv"
    min_lesion_ml = 0.05
    # features = "features.csv"     # radiomics only; feature columns: pyradiomics-named by default, or
    # feature_columns = [...]       # exact names, and / or
    # feature_prefixes = ["original_", "log-sigma-", "wavelet-"]
    # feature_regex = "wavelet-.*_glszm_.*"
    # ignore_columns = ["scanner"]  # other non-feature columns to tolerate (default mode)

    [input]                         # method input parameters (docs/models.md); defaults: the papers'
    roi_set = "A2"                  # M1: ROI | A1 | A2 | A3 (He et al.: ROI + 0 / 10 / 20 / 30 px in all)
    shape = [80, 80]                # (set by roi_set unless given)
    margin_px = 10                  # M1: pixels on each side (set by roi_set unless given)

    [architecture]                  # network keyword arguments (width, blocks, ...)
    width = 0.5

    [training]
    epochs = 50
    batch_size = 40
    optimizer = "adam"              # adam | sgd
    lr = 1e-3
    patience = 8                    # early stopping on the validation split
    monitor = "loss"                # loss | auc
    balance = "sampler"             # none | sampler | loss | median
    stages = "single"               # single | staged (M2 default: new FC layers first, then all layers)
    head_epochs = 10                # staged: at most this many epochs of stage 1
    init_from = "/site/weights.pt"  # optional: trunk weights file or SimCLR checkpoint folder (never downloaded)
    final_classifier = "select"     # M4: select (best of LDA SVM RF NB LR KNN MLP by CV) | network | one name
    classifier_cv_folds = 5         # M4 selection: repeated k-fold on the training split (paper 5 x 10)
    classifier_cv_repeats = 10
    [training.augment]
    probability = 0.8
    translate_px = [5, 10, 15, 20]
    rotate_deg = [1, 15]

    [split]
    scheme = "auto"                 # auto | holdout | repeated-cv (auto: repeated-cv below 200 patients)
    test_fraction = 0.2             # holdout: held-out patients
    val_fraction = 0.2              # of the rest (networks, also inside each CV fold): early stopping
    cv_folds = 5                    # repeated-cv: outer folds (default 5); holdout: optional k-fold on dev
    cv_repeats = 10                 # repeated-cv default: 10 (radiomics), 3 (networks)
    permutations = 100              # repeated-cv permutation test (default: 100 radiomics, 20 networks)
    permutation_repeats = 1         # CV repeats per permutation

    [pretrain]                      # M3 only: pacs-agent train m3 --pretrain simclr (docs/models.md)
    studies = "/data/unlabelled"    # any folder of CT + SEG / RTSTRUCT (default: [data] studies)
    epochs = 1000
    temperature = 0.5

    [radiomics]                     # radiomics comparator and M4 RadScores
    params = "../radiomics/comparator.yaml"   # comparator default; features CSV: the settings it was made with
    selection = "lasso"             # lasso (He 2020: t-test, LASSO, RF 200 x 4) | rfe (Dong 2021: RFE, RF 100)
    p_value = 0.05
    test = "ttest"                  # the comparator's default (He 2020); M4: mannwhitney
    cv_folds = 10
    n_trees = 200                   # rfe default: 100
    max_depth = 4                   # rfe default: 0 (unlimited)
    rfe_features = 10               # selection = "rfe": features kept
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from inference.errors import ConfigError
from inference.methods import METHODS as REGISTRY
from inference.training.augment import DEFAULT_AUGMENTATION, Augmentation
from inference.training.phantom_data import PhantomCohortSpec

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from inference.comparator import UnivariateTest
    from inference.training.crossval import CVPlan

_Settings = TypeVar("_Settings", bound="DataclassInstance")

__all__ = [
    "METHODS",
    "SCHEMES",
    "DataSettings",
    "RadiomicsSettings",
    "SplitSettings",
    "TrainConfig",
    "TrainingSettings",
    "load_train_config",
]

METHODS = tuple(dict.fromkeys(spec.package for spec in REGISTRY if spec.package and not spec.pair))
"""Package methods ``pacs-agent train`` trains (the registry's; the response score has its own command)."""

_PAPER_TRAINING: dict[str, dict[str, Any]] = {
    "m1": {"optimizer": "adam", "lr": 1e-3, "batch_size": 40, "balance": "sampler"},
    "m2": {
        "optimizer": "sgd",
        "lr": 1e-3,
        "momentum": 0.0,
        "batch_size": 16,
        "epochs": 100,
        "patience": 5,
        "balance": "loss",
        "stages": "staged",
    },
    "m3": {
        "optimizer": "sgd",
        "lr": 1e-3,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "batch_size": 16,
        "balance": "median",
    },
    "m4": {"optimizer": "adam", "lr": 1e-3, "batch_size": 16, "balance": "loss", "final_classifier": "select"},
    "radiomics": {},
}
"""The papers' optimiser settings per method (METHODS.md) where they give them."""


@dataclass(frozen=True)
class TrainingSettings:
    """``[training]``: optimiser, epochs, early stopping, class balancing, augmentation."""

    epochs: int = 30
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    patience: int = 8
    min_delta: float = 1e-4
    min_epochs: int = 1
    monitor: str = "loss"
    balance: str = "sampler"
    augment: Augmentation = field(default_factory=Augmentation)
    stages: str = "single"
    head_epochs: int = 10
    init_from: Path | None = None
    final_classifier: str = "network"
    classifier_cv_folds: int = 5
    classifier_cv_repeats: int = 10


SCHEMES = ("auto", "holdout", "repeated-cv")


@dataclass(frozen=True)
class SplitSettings:
    """``[split]``: the evaluation scheme (held-out split or repeated cross-validation) and its sizes.

    ``scheme = "auto"`` (default) is ``"repeated-cv"`` below
    :data:`~inference.training.crossval.REPEATED_CV_BELOW` patients and ``"holdout"`` from there on.
    ``cv_repeats`` / ``permutations`` left unset take the method's default (:meth:`cv_plan`).
    """

    scheme: str = "auto"
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    cv_folds: int = 0
    cv_repeats: int | None = None
    permutations: int | None = None
    permutation_repeats: int = 1

    def resolved_scheme(self, patients: int) -> str:
        """``"holdout"`` or ``"repeated-cv"`` for a cohort of ``patients``."""
        from inference.training.crossval import REPEATED_CV_BELOW

        if self.scheme != "auto":
            return self.scheme
        return "repeated-cv" if patients < REPEATED_CV_BELOW else "holdout"

    def cv_plan(self, method: str, seed: int) -> CVPlan:
        """The repeated-CV plan: 5 folds; 10 repeats and 100 permutations for the comparator, 3 and 20 for networks."""
        from inference.training.crossval import CVPlan

        network = method != "radiomics"
        repeats = self.cv_repeats if self.cv_repeats is not None else (3 if network else 10)
        return CVPlan(
            folds=self.cv_folds or 5,
            repeats=repeats,
            permutations=self.permutations if self.permutations is not None else (20 if network else 100),
            permutation_repeats=min(self.permutation_repeats, repeats),
            seed=seed,
        )


@dataclass(frozen=True)
class RadiomicsSettings:
    """``[radiomics]``: feature extraction and the comparator / RadScore fit."""

    params: Path | None = None
    selection: str = "lasso"
    p_value: float = 0.05
    test: UnivariateTest = "mannwhitney"
    cv_folds: int = 10
    n_trees: int = 200
    max_depth: int = 4
    rfe_features: int = 10
    radscore_label: str | None = None


@dataclass(frozen=True)
class DataSettings:
    """``[data]``: where the labelled cases come from."""

    studies: Path | None = None
    labels: Path | None = None
    features: Path | None = None
    feature_columns: tuple[str, ...] | None = None
    feature_prefixes: tuple[str, ...] | None = None
    feature_regex: str | None = None
    ignore_columns: tuple[str, ...] = ()
    phantom: PhantomCohortSpec | None = None
    min_lesion_ml: float = 0.05

    @property
    def source(self) -> str:
        """``"phantom"``, ``"features"`` or ``"dicom"``."""
        return "phantom" if self.phantom else "features" if self.features else "dicom"


@dataclass(frozen=True)
class TrainConfig:
    """A validated training configuration."""

    method: str
    labels: tuple[str, ...]
    package: Mapping[str, Any]
    data: DataSettings
    input: Mapping[str, Any] = field(default_factory=dict)
    architecture: Mapping[str, Any] = field(default_factory=dict)
    training: TrainingSettings = TrainingSettings()
    split: SplitSettings = SplitSettings()
    radiomics: RadiomicsSettings = RadiomicsSettings()
    seed: int = 0
    threads: int = 1
    path: Path | None = None
    pretrain: Mapping[str, Any] = field(default_factory=dict)


def _table(data: Mapping[str, Any], key: str, problems: list[str]) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        problems.append(f"{key}: must be a table")
        return {}
    return dict(value)


def _known(table: Mapping[str, Any], allowed: set[str], where: str, problems: list[str]) -> None:
    for key in sorted(set(table) - allowed):
        problems.append(f"{where}.{key}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _settings(
    cls: type[_Settings], table: Mapping[str, Any], where: str, problems: list[str], **defaults: Any
) -> _Settings:
    fields = set(cls.__dataclass_fields__)
    _known(table, fields, where, problems)
    values = {**defaults, **{k: v for k, v in table.items() if k in fields}}
    try:
        return cls(**values)
    except TypeError as exc:
        problems.append(f"{where}: {exc}")
        return cls()


def load_train_config(path: str | Path, method: str | None = None) -> TrainConfig:
    """Read and validate a training configuration file.

    Parameters
    ----------
    path
        The TOML file. Relative data paths are resolved against its folder.
    method
        The method given on the command line; must agree with ``method`` in the file if both are set.

    Returns
    -------
    TrainConfig

    Raises
    ------
    ConfigError
        Listing every problem found.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: training configuration not found"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return config_from_mapping(data, method=method, base=path.parent, path=path)


def config_from_mapping(
    data: Mapping[str, Any], *, method: str | None = None, base: Path | None = None, path: Path | None = None
) -> TrainConfig:
    """Validate a parsed training configuration (see :func:`load_train_config`)."""
    problems: list[str] = []
    top = {"method", "labels", "seed", "threads", "package", "data", "input", "architecture", "training", "split"}
    _known(data, top | {"radiomics", "pretrain"}, "config", problems)
    file_method = data.get("method")
    if method and file_method and method != file_method:
        problems.append(f"method: the file says {file_method!r} but {method!r} was asked for")
    chosen = str(method or file_method or "")
    if chosen not in METHODS:
        problems.append(f"method: must be one of {', '.join(METHODS)}, got {chosen!r}")
        raise ConfigError(problems)
    labels = data.get("labels")
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) and x for x in labels)):
        problems.append("labels: must be a non-empty list of label column names")
        labels = ["?"]
    elif len(set(labels)) != len(labels):
        problems.append("labels: must be unique")
    if chosen in ("m1", "radiomics") and len(labels) != 1:
        problems.append(f"labels: {chosen} predicts exactly one label, got {labels}")
    package = _table(data, "package", problems)
    _known(
        package,
        {"name", "version", "validation_status", "intended_use", "description", "label_names"},
        "package",
        problems,
    )
    for key in ("name", "version", "intended_use"):
        if not isinstance(package.get(key), str) or not package[key].strip():
            problems.append(f"package.{key}: required (a non-empty string)")
    package.setdefault("validation_status", "RESEARCH")
    package.setdefault("description", "")

    base = base or Path.cwd()

    def resolve(value: Any) -> Path | None:
        return None if value in (None, "") else (base / str(value)).resolve()

    data_table = _table(data, "data", problems)
    _known(
        data_table,
        {
            "studies",
            "labels",
            "features",
            "feature_columns",
            "feature_prefixes",
            "feature_regex",
            "ignore_columns",
            "phantom",
            "min_lesion_ml",
        },
        "data",
        problems,
    )
    phantom = None
    if "phantom" in data_table:
        try:
            phantom = PhantomCohortSpec.from_mapping(data_table["phantom"])
        except (TypeError, ValueError) as exc:
            problems.append(f"data.phantom: {exc}")
        else:
            missing = [label for label in labels if label not in phantom.planted]
            if missing:
                problems.append(f"data.phantom.planted: no planted property for label(s) {missing}")
    columns = data_table.get("feature_columns")
    prefixes = data_table.get("feature_prefixes")
    regex = data_table.get("feature_regex")
    ignore = data_table.get("ignore_columns", [])
    for key, value in (("feature_columns", columns), ("feature_prefixes", prefixes), ("ignore_columns", ignore)):
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
            problems.append(f"data.{key}: must be a list of column names / prefixes (strings)")
    if regex is not None:
        import re

        try:
            re.compile(str(regex))
        except re.error as exc:
            problems.append(f"data.feature_regex: not a valid regular expression ({exc})")
    if (columns or prefixes or regex) and not data_table.get("features"):
        problems.append("data.feature_columns / feature_prefixes / feature_regex: only with a features CSV")
    data_settings = DataSettings(
        studies=resolve(data_table.get("studies")),
        labels=resolve(data_table.get("labels")),
        features=resolve(data_table.get("features")),
        feature_columns=tuple(columns) if isinstance(columns, list) and columns else None,
        feature_prefixes=tuple(prefixes) if isinstance(prefixes, list) and prefixes else None,
        feature_regex=str(regex) if regex else None,
        ignore_columns=tuple(ignore) if isinstance(ignore, list) else (),
        phantom=phantom,
        min_lesion_ml=float(data_table.get("min_lesion_ml", 0.05)),
    )
    sources = [bool(phantom), bool(data_settings.features), bool(data_settings.studies or data_settings.labels)]
    if sum(sources) != 1:
        problems.append("data: give exactly one source: studies + labels, features (radiomics only), or [data.phantom]")
    elif data_settings.source == "dicom" and not (data_settings.studies and data_settings.labels):
        problems.append("data: studies and labels go together")
    if data_settings.features and chosen != "radiomics":
        problems.append("data.features: a features CSV trains only the radiomics comparator")

    training_table = _table(data, "training", problems)
    augment_table = training_table.pop("augment", None)
    if training_table.get("init_from"):
        training_table["init_from"] = resolve(training_table["init_from"])
    paper = _PAPER_TRAINING[chosen]
    training = _settings(TrainingSettings, training_table, "training", problems, **paper)
    try:
        augment = Augmentation.from_mapping(augment_table, DEFAULT_AUGMENTATION.get(chosen, Augmentation()))
        training = TrainingSettings(**{**training.__dict__, "augment": augment})
    except (TypeError, ValueError) as exc:
        problems.append(f"training.augment: {exc}")
    if training.optimizer not in ("adam", "sgd"):
        problems.append(f"training.optimizer: adam or sgd, got {training.optimizer!r}")
    if training.monitor not in ("loss", "auc"):
        problems.append(f"training.monitor: loss or auc, got {training.monitor!r}")
    if training.balance not in ("none", "sampler", "loss", "median"):
        problems.append(f"training.balance: none, sampler, loss or median, got {training.balance!r}")
    if training.stages not in ("single", "staged"):
        problems.append(f"training.stages: single or staged, got {training.stages!r}")
    if training.stages == "staged" and (chosen == "radiomics" or training.head_epochs < 1):
        problems.append("training.stages: staged needs a network method and head_epochs >= 1")
    if training.final_classifier not in ("network", "select", "LDA", "SVM", "RF", "NB", "LR", "KNN", "MLP"):
        problems.append(
            f"training.final_classifier: network, select or one of LDA SVM RF NB LR KNN MLP, "
            f"got {training.final_classifier!r}"
        )
    elif training.final_classifier != "network" and chosen != "m4":
        problems.append("training.final_classifier: only M4 replaces its last layer by a classical classifier")
    if training.classifier_cv_folds < 2 or training.classifier_cv_repeats < 1:
        problems.append("training: classifier_cv_folds must be >= 2 and classifier_cv_repeats >= 1")
    if training.init_from is not None and not training.init_from.exists():
        problems.append(f"training.init_from: {training.init_from} does not exist")
    if training.epochs < 1 or training.batch_size < 1 or training.lr <= 0 or training.patience < 1:
        problems.append("training: epochs, batch_size, patience must be >= 1 and lr > 0")

    split = _settings(SplitSettings, _table(data, "split", problems), "split", problems)
    if not 0 <= split.test_fraction < 1 or not 0 < split.val_fraction < 1:
        problems.append("split: test_fraction must be in [0, 1) and val_fraction in (0, 1)")
    if split.cv_folds == 1 or split.cv_folds < 0 or (split.cv_repeats is not None and split.cv_repeats < 1):
        problems.append("split: cv_folds must be 0 (off / default) or >= 2, cv_repeats >= 1")
    if split.scheme not in SCHEMES:
        problems.append(f"split.scheme: one of {', '.join(SCHEMES)}, got {split.scheme!r}")
    if (split.permutations is not None and split.permutations < 0) or split.permutation_repeats < 1:
        problems.append("split: permutations must be >= 0 and permutation_repeats >= 1")

    radiomics_table = _table(data, "radiomics", problems)
    if "params" in radiomics_table:
        radiomics_table["params"] = resolve(radiomics_table["params"])
    paper_radiomics: dict[str, Any] = {"test": "ttest"} if chosen == "radiomics" else {}
    if chosen == "radiomics" and radiomics_table.get("selection") == "rfe":  # Dong 2021: RFE + 100 trees
        paper_radiomics.update(n_trees=100, max_depth=0)
    radiomics = _settings(RadiomicsSettings, radiomics_table, "radiomics", problems, **paper_radiomics)
    if radiomics.test not in ("mannwhitney", "ttest"):
        problems.append(f"radiomics.test: mannwhitney or ttest, got {radiomics.test!r}")
    if radiomics.selection not in ("lasso", "rfe"):
        problems.append(f"radiomics.selection: lasso or rfe, got {radiomics.selection!r}")
    if radiomics.selection == "rfe" and chosen != "radiomics":
        problems.append("radiomics.selection: rfe is an option of the radiomics comparator only")
    if radiomics.rfe_features < 1 or radiomics.n_trees < 1:
        problems.append("radiomics: rfe_features and n_trees must be >= 1")
    if radiomics.params is not None and not radiomics.params.is_file():
        problems.append(f"radiomics.params: {radiomics.params} does not exist")
    if radiomics.radscore_label is not None and radiomics.radscore_label not in labels:
        problems.append(f"radiomics.radscore_label: {radiomics.radscore_label!r} is not one of the labels")

    input_table = _table(data, "input", problems)
    if chosen == "m1" and input_table.get("roi_set", "A2") not in ("custom", "ROI", "A1", "A2", "A3"):
        problems.append(f"input.roi_set: ROI, A1, A2, A3 (He et al. 2020) or custom, got {input_table['roi_set']!r}")
    architecture = _table(data, "architecture", problems)
    if architecture and chosen == "radiomics":
        problems.append("architecture: the radiomics comparator has no network")
    elif architecture:
        from inference.networks import architecture_keys

        _known(architecture, set(architecture_keys(chosen)), "architecture", problems)
    pretrain_table = _table(data, "pretrain", problems)
    if pretrain_table and chosen != "m3":
        problems.append("pretrain: SimCLR pretraining is an m3 stage")
    seed, threads = data.get("seed", 0), data.get("threads", 1)
    if not isinstance(seed, int) or seed < 0 or not isinstance(threads, int) or threads < 1:
        problems.append("seed must be an integer >= 0 and threads an integer >= 1")
    if problems:
        raise ConfigError(problems)
    return TrainConfig(
        method=chosen,
        labels=tuple(labels),
        package=package,
        data=data_settings,
        input=input_table,
        architecture=architecture,
        training=training,
        split=split,
        radiomics=radiomics,
        seed=seed,
        threads=threads,
        path=path,
        pretrain=pretrain_table,
    )
