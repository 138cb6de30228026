"""Train a method on labelled data and write a model package with its evaluation report.

The flow of :func:`train`:

1. **Data**: a DICOM folder + labels CSV, a features CSV (radiomics), or a planted-label phantom
   cohort generated on the spot (:mod:`inference.training.phantom_data`); lesions become cases
   with their method inputs (:mod:`inference.training.datasets`).
2. **Evaluation scheme** (``[split] scheme``), all splits patient-level and stratified
   (:mod:`inference.training.splits`): ``holdout`` - a held-out test split, then training /
   validation, optionally a k-fold cross-validation on the development patients reported beside;
   ``repeated-cv`` (default below 200 patients, :mod:`inference.training.crossval`) - repeated
   nested k-fold with pooled out-of-fold AUC, DeLong CI, spread across repeats, calibration and a
   permutation test, then the package is fit on all patients with the same recipe.
3. **Fit** on the training split only: normalisation statistics (and M4 RadScores) from the
   training split; class balancing; augmentation; early stopping on the validation split (the
   weights of the best validation epoch are kept).
4. **Thresholds** per label by Youden's J on the validation split.
5. **Evaluation** on the held-out test split with those thresholds: AUC with DeLong 95% CI,
   accuracy, sensitivity, specificity, F1, Brier score and reliability bins.
6. **Package** (``registry.write_package``, verified after writing) and the report
   (``report/report.json``, ``report.md``, ROC PNGs) inside the package folder.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from inference.comparator import RadiomicsComparator, RadScore, fit_radscore
from inference.radiomics.features import (
    canonical_settings,
    comparator_params,
    settings_mismatch,
    uncomputable_features,
)
from inference.training.config import TrainConfig
from inference.training.crossval import CVResult, repeated_cv
from inference.training.datasets import (
    M4_RADIOMICS_SETTINGS,
    REGIONS,
    CaseSet,
    TrainingDataError,
    build_caseset,
    read_features_csv,
    resolve_input_spec,
)
from inference.training.evaluate import LabelEvaluation, evaluate_label, roc_auc, youden_threshold
from inference.training.initialise import RANDOM_INIT, load_initial_weights
from inference.training.phantom_data import cohort_folder, make_phantom_cohort
from inference.training.predict import Predictor, package_regions
from inference.training.report import write_report
from inference.training.splits import assert_patient_disjoint, patient_kfold, patient_split

__all__ = ["EarlyStopping", "TrainResult", "epoch_order", "train"]

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int, str], None]


def _no_progress(stage: str, done: int, total: int, note: str = "") -> None:
    return None


@dataclass
class EarlyStopping:
    """Stop when the monitored validation value has not improved for ``patience`` epochs.

    Parameters
    ----------
    patience
        Epochs without improvement before stopping.
    mode
        ``"min"`` (loss) or ``"max"`` (AUC).
    min_delta
        Smallest change that counts as an improvement.
    min_epochs
        Never stop before this many epochs.
    """

    patience: int
    mode: str = "min"
    min_delta: float = 0.0
    min_epochs: int = 1
    best: float = math.nan
    best_epoch: int = 0
    epochs: int = 0
    stale: int = 0

    def step(self, value: float) -> bool:
        """Record one epoch's value; True when it is the best so far (keep these weights)."""
        self.epochs += 1
        if math.isnan(value):
            self.stale += 1
            return False
        better = (
            math.isnan(self.best)
            or (self.mode == "min" and value < self.best - self.min_delta)
            or (self.mode == "max" and value > self.best + self.min_delta)
        )
        if better:
            self.best, self.best_epoch, self.stale = value, self.epochs, 0
        else:
            self.stale += 1
        return better

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` epochs in a row brought no improvement (and ``min_epochs`` are done)."""
        return self.stale >= self.patience and self.epochs >= self.min_epochs


def _strata(y: np.ndarray) -> list[str]:
    return ["|".join("-" if math.isnan(v) else str(int(v)) for v in row) for row in y]


def epoch_order(y: np.ndarray, balance: str, rng: np.random.Generator) -> np.ndarray:
    """Item order for one epoch, with class balancing.

    Parameters
    ----------
    y
        (items, labels) 0 / 1 / NaN targets.
    balance
        ``"none"`` / ``"loss"``: a permutation. ``"sampler"``: items drawn with replacement with
        probability inversely proportional to the frequency of their label pattern (every pattern
        equally likely). ``"median"`` (M3, median-based re-sampling): per label the number of
        positive items; an item positive for labels rarer than the median of those counts is
        drawn ``median / count`` times as often (the largest factor over its labels).
    rng
        Random generator.

    Returns
    -------
    numpy.ndarray
        ``len(y)`` item indices.
    """
    n = len(y)
    if balance in ("none", "loss"):
        return rng.permutation(n)
    if balance == "sampler":
        strata = _strata(y)
        counts: dict[str, int] = {}
        for s in strata:
            counts[s] = counts.get(s, 0) + 1
        weights = np.array([1.0 / counts[s] for s in strata])
    elif balance == "median":
        positives = np.nansum(y, axis=0)
        present = positives[positives > 0]
        median = float(np.median(present)) if present.size else 1.0
        weights = np.ones(n)
        for j, count in enumerate(positives):
            if count > 0:
                factor = max(1.0, median / count)
                weights = np.where(y[:, j] == 1, np.maximum(weights, factor), weights)
    else:
        raise ValueError(f"unknown balance {balance!r}")
    return rng.choice(n, size=n, replace=True, p=weights / weights.sum())


def _pos_weight(y: np.ndarray) -> np.ndarray:
    pos = np.nansum(y, axis=0)
    neg = np.sum(y == 0, axis=0)
    return np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)


def _mean_auc(y: np.ndarray, p: np.ndarray) -> float:
    aucs = []
    for j in range(y.shape[1]):
        keep = ~np.isnan(y[:, j])
        yj = y[keep, j]
        if 0 < yj.sum() < yj.size:
            aucs.append(roc_auc(yj, p[keep, j]))
    return float(np.mean(aucs)) if aucs else math.nan


def _bce(y: np.ndarray, p: np.ndarray) -> float:
    keep = ~np.isnan(y)
    if not keep.any():
        return math.nan
    q = np.clip(p[keep], 1e-7, 1 - 1e-7)
    t = y[keep]
    return float(-np.mean(t * np.log(q) + (1 - t) * np.log(1 - q)))


# --------------------------------------------------------------------------------------- trainers


@dataclass
class Fitted:
    """A trained model, ready to predict and to be packaged."""

    predictor: Predictor
    normalisation: dict[str, Any] = field(default_factory=dict)
    input_extra: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, tuple[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_epoch: int = 0
    best_epoch: int = 0
    initialisation: str = ""
    init_table: dict[str, Any] = field(default_factory=dict)
    architecture: dict[str, Any] = field(default_factory=dict)
    final_classifier: dict[str, Any] = field(default_factory=dict)
    stages: str = ""


def _skops_bytes(estimator: Any) -> bytes:
    """A scikit-learn object as compressed skops bytes (a 200-tree forest: ~0.3 MB instead of 3.5 MB)."""
    import zipfile

    import skops.io as sio

    return sio.dumps(estimator, compression=zipfile.ZIP_DEFLATED, compresslevel=9)


def _fit_comparator(config: TrainConfig, train: CaseSet, val: CaseSet, progress: Progress) -> Fitted:
    r = config.radiomics
    y = train.y[:, 0]
    keep = ~np.isnan(y)
    progress(
        "fitting", 0, 1, "RFE, random forest" if r.selection == "rfe" else "univariate filter, LASSO, random forest"
    )
    comparator = RadiomicsComparator(
        p_value=r.p_value,
        test=r.test,
        cv_folds=r.cv_folds,
        n_trees=r.n_trees,
        max_depth=r.max_depth,
        seed=config.seed,
        selection_method="rfe" if r.selection == "rfe" else "lasso",
        rfe_features=r.rfe_features,
    ).fit(
        train.features["tumour"][keep],
        y[keep],
        train.feature_names["tumour"],
        groups=[p for p, k in zip(train.patients, keep, strict=True) if k],
    )
    progress("fitting", 1, 1, f"{len(comparator.features)} feature(s) selected")
    predictor = Predictor("radiomics", config.labels, comparator)
    return Fitted(
        predictor=predictor,
        input_extra=comparator.input_table(train.radiomics_settings or "", region="tumour"),
        weights={"classifier": ("classifier.skops", _skops_bytes(comparator.forest))},
    )


class _NetworkFit:
    """Training loop shared by M1-M4: batches through the method wrapper's ``pre_process``."""

    def __init__(self, config: TrainConfig, progress: Progress) -> None:
        self.config = config
        self.method = config.method
        self.labels = config.labels
        self.progress = progress
        self.rng = np.random.default_rng([config.seed, 101])

    # -- data of the training items (M3: slices, others: lesions)
    def _items(self, cases: CaseSet) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of the training items."""
        key = {"m1": "image", "m2": "views", "m3": "slices", "m4": "patch"}[self.method]
        x = cases.arrays[key]
        y = cases.y[cases.slice_owner] if self.method == "m3" else cases.y
        return x, y

    def _normalisation(self, train: CaseSet) -> dict[str, Any]:
        x, _ = self._items(train)
        x = np.asarray(x, dtype=np.float64)
        norm: dict[str, Any] = {"mean": float(x.mean()), "std": float(max(x.std(), 1e-6))}
        if self.method == "m2":
            ages = np.array([c.covariates.age for c in train.cases if c.covariates.age is not None], dtype=float)
            norm["age_mean"] = float(ages.mean()) if ages.size else 60.0
            norm["age_std"] = float(max(ages.std(), 1.0)) if ages.size > 1 else 10.0
        return norm

    def _radscores(self, train: CaseSet) -> tuple[dict[str, RadScore], dict[str, Any]]:
        """Tumour and peritumoral RadScores per endpoint (the paper), or one shared pair (``radscore_label``).

        Returns
        -------
        tuple
            ``(columns, tables)``: RadScore per column key (``"<label>/<region>"``, or ``"<region>"``
            for a shared pair) in network input order, and the package's ``[input.radscore]`` tables.
        """
        r = self.config.radiomics
        targets = [r.radscore_label] if r.radscore_label else list(self.labels)
        columns: dict[str, RadScore] = {}
        tables: dict[str, Any] = {}
        for label in targets:
            j = self.labels.index(label)
            y = train.y[:, j]
            keep = ~np.isnan(y)
            groups = [p for p, k in zip(train.patients, keep, strict=True) if k]
            per_region: dict[str, Any] = {}
            for region in REGIONS:
                sel = fit_radscore(
                    train.features[region][keep],
                    y[keep],
                    train.feature_names[region],
                    groups=groups,
                    p_value=r.p_value,
                    test=r.test,
                    cv_folds=r.cv_folds,
                    seed=self.config.seed,
                )
                key = region if r.radscore_label else f"{label}/{region}"
                columns[key] = sel.radscore
                per_region[region] = {
                    **sel.radscore.as_table(),
                    "filtered": list(sel.filtered),
                    "fallback": sel.fallback,
                }
            if r.radscore_label:
                tables = per_region
            else:
                tables[label] = per_region
        return columns, tables

    def _batch_inputs(self, cases: CaseSet, x: np.ndarray, idx: np.ndarray, raw_scores: np.ndarray | None) -> Any:
        from inference.networks import DeepRadInput, MultiViewInput

        if self.method in ("m1", "m3"):
            return x
        if self.method == "m2":
            return MultiViewInput(x, tuple(cases.cases[i].covariates for i in idx))
        assert raw_scores is not None
        return DeepRadInput(x, raw_scores[idx])

    def fit(self, train: CaseSet, val: CaseSet) -> Fitted:
        """Train with early stopping; returns the best validation epoch's model."""
        import torch

        from inference.networks import M4Model, build_model, build_network, head_parameter_names

        cfg = self.config.training
        torch.manual_seed(self.config.seed)
        norm = self._normalisation(train)
        radscores: dict[str, RadScore] = {}
        input_extra: dict[str, Any] = {}
        raw_scores = None
        architecture = dict(self.config.architecture)
        if self.method == "m4":
            radscores, tables = self._radscores(train)
            scorer = Predictor("m4", self.labels, None, radscores)
            raw_scores = scorer.radscore_matrix(train)
            norm["radscore_mean"] = [float(v) for v in raw_scores.mean(axis=0)]
            norm["radscore_std"] = [float(max(v, 1e-6)) for v in raw_scores.std(axis=0)]
            architecture.setdefault("radscores", len(radscores))
            input_extra = {
                "radiomics_settings": train.radiomics_settings,
                "radscores": "shared" if self.config.radiomics.radscore_label else "per endpoint",
                "radscore": tables,
            }
            if self.config.radiomics.radscore_label:
                input_extra["radscore_label"] = self.config.radiomics.radscore_label
        self.architecture = architecture
        network = build_network(self.method, self.labels, architecture)
        initialisation = RANDOM_INIT
        init_table: dict[str, Any] = {"source": RANDOM_INIT}
        if cfg.init_from is not None:
            loaded = load_initial_weights(network, cfg.init_from)
            initialisation, init_table = loaded.describe(), loaded.as_table()
        model = build_model(self.method, network, self.labels, norm)
        predictor = Predictor(self.method, self.labels, model, radscores)
        self._model, self._network, self._predictor = model, network, predictor
        self._train, self._val, self._raw_scores = train, val, raw_scores
        _, y_all = self._items(train)
        known = ~np.all(np.isnan(y_all), axis=1)
        self._item_index = np.flatnonzero(known)
        self._pos_weight = torch.tensor(_pos_weight(y_all[self._item_index]), dtype=torch.float32, device=model.device)
        history: list[dict[str, Any]] = []
        stages: list[tuple[str, list[Any], int]] = []
        if cfg.stages == "staged":
            head = set(head_parameter_names(self.method, network))
            stages.append(
                (
                    "new layers",
                    [p for n, p in network.named_parameters() if n in head],
                    min(cfg.head_epochs, cfg.epochs),
                )
            )
        stages.append(("all layers", list(network.parameters()), cfg.epochs))
        best_epochs = []
        for name, params, epochs in stages:
            stopper = self._run_stage(name, params, epochs, history)
            best_epochs.append(f"{name}: {stopper.epochs} epochs, best {stopper.best_epoch}")
        network.eval()
        weights: dict[str, tuple[str, Any]] = {"model": ("model.pt", network)}
        extra: dict[str, Any] = {}
        if self.method == "m4" and cfg.final_classifier != "network":
            chosen, extra = self._final_classifiers(model, train)
            assert isinstance(model, M4Model)
            model.final_classifiers = chosen
            weights["final_classifier"] = ("final-classifiers.skops", _skops_bytes(chosen))
            input_extra["final_classifier"] = {label: extra[label]["chosen"] for label in chosen}
        return Fitted(
            predictor=predictor,
            normalisation=norm,
            input_extra=input_extra,
            weights=weights,
            history=history,
            stopped_epoch=len(history),
            best_epoch=stopper.best_epoch,
            final_classifier=extra,
            initialisation=initialisation,
            init_table=init_table,
            architecture=architecture,
            stages="; ".join(best_epochs),
        )

    def _final_classifiers(self, model: Any, train: CaseSet) -> tuple[dict[str, Any], dict[str, Any]]:
        """M4: per endpoint, the best of the paper's seven classifiers on the deep features (training split)."""
        from inference.networks import DeepRadInput
        from inference.training.final_classifier import CLASSIFIERS, select_classifier

        cfg = self.config.training
        candidates = CLASSIFIERS if cfg.final_classifier == "select" else (cfg.final_classifier,)
        assert self._raw_scores is not None
        h = model.features(DeepRadInput(train.arrays["patch"], self._raw_scores))
        chosen: dict[str, Any] = {}
        table: dict[str, Any] = {}
        for j, label in enumerate(self.labels):
            y = train.y[:, j]
            keep = ~np.isnan(y)
            self.progress("final classifier", j, len(self.labels), f"{label}: {', '.join(candidates)}")
            choice = select_classifier(
                h[keep],
                y[keep],
                [p for p, k in zip(train.patients, keep, strict=True) if k],
                candidates=candidates,
                folds=cfg.classifier_cv_folds,
                repeats=cfg.classifier_cv_repeats,
                seed=self.config.seed,
            )
            chosen[label] = choice.estimator
            table[label] = {
                "chosen": choice.name,
                "cv_auc": {k: round(v, 4) for k, v in choice.cv_auc.items() if not math.isnan(v)},
                "cv": f"{choice.repeats} x {choice.folds // max(choice.repeats, 1)}-fold, patient-grouped"
                if choice.repeats
                else "none (one candidate)",
            }
        self.progress("final classifier", len(self.labels), len(self.labels), "chosen")
        return chosen, table

    def _run_stage(self, stage: str, params: list[Any], epochs: int, history: list[dict[str, Any]]) -> EarlyStopping:
        """Train ``params`` (the rest frozen) with early stopping; the network ends at the stage's best epoch."""
        import torch

        cfg = self.config.training
        network, model, predictor = self._network, self._model, self._predictor
        train, val = self._train, self._val
        device = model.device
        trainable = {id(p) for p in params}
        for p in network.parameters():
            p.requires_grad_(id(p) in trainable)
        if cfg.optimizer == "sgd":
            optimiser: Any = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            optimiser = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        x_all, y_all = self._items(train)
        item_index = self._item_index
        y_items = y_all[item_index]
        stopper = EarlyStopping(
            cfg.patience, "min" if cfg.monitor == "loss" else "max", cfg.min_delta, min_epochs=cfg.min_epochs
        )
        best_state = copy.deepcopy(network.state_dict())
        owner = train.slice_owner
        for epoch in range(1, epochs + 1):
            started = time.monotonic()
            network.train()
            order = item_index[epoch_order(y_items, cfg.balance, self.rng)]
            losses = []
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                if len(idx) < 2:  # batch norm needs two items
                    continue
                x = cfg.augment.apply(x_all[idx], self.rng) if cfg.augment.active else x_all[idx]
                case_idx = owner[idx] if self.method == "m3" and owner is not None else idx
                batch = self._batch_inputs(train, x, case_idx, self._raw_scores)
                tensors = [t.to(device) for t in model.pre_process(batch)]
                target = torch.tensor(y_all[idx], dtype=torch.float32, device=device)
                logits = network(*tensors)
                loss = self._loss(logits, target, self._pos_weight if cfg.balance == "loss" else None)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                losses.append(float(loss.detach()))
            p_val = predictor.predict(val)
            y_val = val.y
            record: dict[str, Any] = {
                "epoch": len(history) + 1,
                "stage": stage,
                "train_loss": float(np.mean(losses)) if losses else math.nan,
                "val_loss": _bce(y_val, p_val),
                "val_auc": _mean_auc(y_val, p_val),
                "seconds": round(time.monotonic() - started, 2),
            }
            history.append(record)
            if stopper.step(record["val_loss"] if cfg.monitor == "loss" else record["val_auc"]):
                best_state = copy.deepcopy(network.state_dict())
            self.progress(
                "epochs",
                epoch,
                epochs,
                f"{stage}: loss {record['train_loss']:.3f} val loss {record['val_loss']:.3f} "
                f"val AUC {record['val_auc']:.3f}",
            )
            if stopper.should_stop:
                logger.info("%s: early stopping after epoch %d (best epoch %d)", stage, epoch, stopper.best_epoch)
                self.progress("epochs", epochs, epochs, f"early stop, best epoch {stopper.best_epoch}")
                break
        network.load_state_dict(best_state)
        for p in network.parameters():
            p.requires_grad_(True)
        return stopper

    def _loss(self, logits: Any, target: Any, pos_weight: Any) -> Any:
        import torch
        import torch.nn.functional as F

        if self.method == "m1":
            y = target[:, 0].long()
            weight = None
            if pos_weight is not None:
                weight = torch.stack([torch.ones_like(pos_weight[0]), pos_weight[0]])
            return F.cross_entropy(logits, y, weight=weight)
        mask = ~torch.isnan(target)
        safe = torch.where(mask, target, torch.zeros_like(target))
        loss = F.binary_cross_entropy_with_logits(logits, safe, pos_weight=pos_weight, reduction="none")
        return (loss * mask).sum() / mask.sum().clamp(min=1)


def _fit(config: TrainConfig, train: CaseSet, val: CaseSet, progress: Progress) -> Fitted:
    if config.method == "radiomics":
        return _fit_comparator(config, train, val, progress)
    return _NetworkFit(config, progress).fit(train, val)


# -------------------------------------------------------------------------------------------- data


@contextlib.contextmanager
def _work_dir(work_dir: str | Path | None) -> Iterator[Path]:
    if work_dir is not None:
        path = Path(work_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="pacs-agent-train-") as tmp:
        yield Path(tmp)


def _csv_settings(config: TrainConfig, cases: CaseSet) -> str:
    """The pyradiomics settings a features CSV was computed with (``[radiomics] params`` / ``--params``).

    Checked against the CSV's ``diagnostics_Configuration_*`` columns when it has them, and every
    feature name must be one the node computes with those settings. Without parameters the package
    records no settings and the DICOM pipeline refuses it (the report says so).

    Raises
    ------
    TrainingDataError
        The parameters disagree with the CSV's diagnostics, or name features they would not compute.
    """
    params = config.radiomics.params
    if params is None:
        logger.warning(
            "features CSV without [radiomics] params / --params: the package cannot run on DICOM studies; "
            "give the pyradiomics parameter file the features were computed with"
        )
        return ""
    try:
        settings = canonical_settings(params)
    except (OSError, ValueError) as exc:
        raise TrainingDataError(f"radiomics parameters {params}: {exc}") from None
    mismatch = settings_mismatch(settings, cases.diagnostics)
    if mismatch:
        raise TrainingDataError(f"the features CSV was not computed with {params.name}: " + "; ".join(mismatch))
    names = [n for names in cases.feature_names.values() for n in names]
    missing = uncomputable_features(settings, names)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise TrainingDataError(
            f"{len(missing)} feature column(s) of the CSV cannot be computed by the node with {params.name}: {shown}; "
            "give the parameter file the CSV was computed with, or leave those columns out of the features"
        )
    return settings


def _load_cases(config: TrainConfig, work: Path, progress: Progress) -> tuple[CaseSet, dict[str, Any]]:
    data = config.data
    method = config.method
    spec = resolve_input_spec(method, config.input)
    regions = package_regions(method)
    params: Path | Mapping[str, Any] | None = config.radiomics.params
    if params is None and method == "radiomics":
        params = comparator_params()
    elif params is None and method == "m4":
        params = M4_RADIOMICS_SETTINGS  # the paper's 851 features per region
    described: dict[str, Any] = {"source": data.source}
    if data.source == "features":
        assert data.features is not None
        cases = read_features_csv(
            data.features,
            config.labels,
            features=data.feature_columns,
            prefixes=data.feature_prefixes,
            regex=data.feature_regex,
            ignore=data.ignore_columns,
        )
        described["description"] = f"radiomic features from {data.features.name}"
        selection = cases.column_selection
        if selection is not None:
            described["feature_columns"] = f"{len(selection.features)} ({selection.rule})"
            if selection.label_like:
                described["label-like columns never used as features"] = ", ".join(selection.label_like)
        cases.radiomics_settings = _csv_settings(config, cases)
        if not cases.radiomics_settings:
            described["deployable on DICOM"] = "no: the pyradiomics parameters of the CSV were not given (--params)"
        return cases, described
    if data.source == "phantom":
        assert data.phantom is not None
        cohort = make_phantom_cohort(
            cohort_folder(work, data.phantom),
            data.phantom,
            progress=lambda d, t: progress("phantoms", d, t, "synthetic studies"),
        )
        studies, labels_csv = cohort.studies_dir, cohort.labels_csv
        described["description"] = data.phantom.describe()
        described["phantom"] = data.phantom.as_dict()
    else:
        assert data.studies is not None and data.labels is not None
        studies, labels_csv = data.studies, data.labels
        described["description"] = f"labelled DICOM studies ({data.labels.name})"
    cases = build_caseset(
        method,
        config.labels,
        studies,
        labels_csv,
        input_spec=spec,
        regions=regions,
        radiomics_params=params,
        min_volume_ml=data.min_lesion_ml,
        progress=lambda d, t: progress("loading", d, t, "studies"),
    )
    return cases, described


# ----------------------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced."""

    package: Path
    report: dict[str, Path]
    test: tuple[LabelEvaluation, ...]
    validation: tuple[LabelEvaluation, ...]
    thresholds: dict[str, float]
    seconds: float
    cross_validation: CVResult | None = None
    """The repeated cross-validation (``scheme = "repeated-cv"``), else None."""


def _evaluate(
    labels: tuple[str, ...], y: np.ndarray, p: np.ndarray, thresholds: Mapping[str, float]
) -> list[LabelEvaluation]:
    out = []
    for j, label in enumerate(labels):
        known = ~np.isnan(y[:, j])
        if 0 < y[known, j].sum() < known.sum():
            out.append(evaluate_label(label, y[:, j], p[:, j], thresholds[label]))
        else:
            logger.warning("label %s: the split lacks one class; no evaluation", label)
    return out


def _thresholds(labels: tuple[str, ...], y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    out = {}
    for j, label in enumerate(labels):
        known = ~np.isnan(y[:, j])
        yj = y[known, j]
        out[label] = youden_threshold(yj, p[known, j]) if 0 < yj.sum() < yj.size else 0.5
    return {k: round(float(v), 6) for k, v in out.items()}


def _cross_validate(config: TrainConfig, cases: CaseSet, dev: np.ndarray, progress: Progress) -> dict[str, Any]:
    split = config.split
    patients = [cases.patients[i] for i in dev]
    y = cases.y[dev]
    folds = list(patient_kfold(patients, y, k=split.cv_folds, repeats=split.cv_repeats or 1, seed=config.seed))
    per_label: dict[str, list[float]] = {label: [] for label in config.labels}
    for n, fold in enumerate(folds, start=1):
        fold_train, fold_test = dev[fold.train], dev[fold.test]
        inner_patients = [cases.patients[i] for i in fold_train]
        inner_train, inner_val = patient_split(
            inner_patients, cases.y[fold_train], fraction=split.val_fraction, seed=config.seed + 1000 + n
        )
        assert_patient_disjoint(cases.patients, fold_train[inner_train], fold_train[inner_val], fold_test)
        fitted = _fit(config, cases.subset(fold_train[inner_train]), cases.subset(fold_train[inner_val]), _no_progress)
        test = cases.subset(fold_test)
        p = fitted.predictor.predict(test)
        for j, label in enumerate(config.labels):
            known = ~np.isnan(test.y[:, j])
            yj = test.y[known, j]
            if 0 < yj.sum() < yj.size:
                per_label[label].append(roc_auc(yj, p[known, j]))
        progress("cross-val", n, len(folds), f"repeat {fold.repeat + 1} fold {fold.fold + 1}")
    out: dict[str, Any] = {}
    for label, aucs in per_label.items():
        if aucs:
            a = np.array(aucs)
            out[label] = {
                "folds": int(a.size),
                "auc_mean": float(a.mean()),
                "auc_sd": float(a.std(ddof=1)) if a.size > 1 else 0.0,
                "auc_min": float(a.min()),
                "auc_max": float(a.max()),
                "aucs": [round(float(v), 4) for v in a],
            }
    return out


def _relabelled(cases: CaseSet, y: np.ndarray) -> CaseSet:
    """The same cases with the labels ``y`` (the permutation test's shuffled labels)."""
    if np.array_equal(y, cases.y, equal_nan=True):
        return cases
    return replace(
        cases, cases=[replace(c, labels=tuple(float(v) for v in row)) for c, row in zip(cases.cases, y, strict=True)]
    )


def _repeated_cv(config: TrainConfig, cases: CaseSet, progress: Progress) -> CVResult:
    """Repeated patient-grouped stratified k-fold CV of the configured recipe, with a permutation test.

    Model selection is nested: the comparator chooses its LASSO penalty (or RFE features) inside each
    outer training part; networks stop early on a validation split of the outer training part.
    """
    plan = config.split.cv_plan(config.method, config.seed)
    all_patients = cases.patients

    def fit_predict(train_items: np.ndarray, test_items: np.ndarray, y: np.ndarray) -> np.ndarray:
        labelled = _relabelled(cases, y)
        if config.method == "radiomics":
            inner_train, inner_val = train_items, np.zeros(0, dtype=int)
        else:
            a, b = patient_split(
                [all_patients[i] for i in train_items],
                y[train_items],
                fraction=config.split.val_fraction,
                seed=config.seed + 1000 + int(test_items[0]),
            )
            inner_train, inner_val = train_items[a], train_items[b]
        assert_patient_disjoint(all_patients, inner_train, inner_val, test_items)
        fitted = _fit(config, labelled.subset(inner_train), labelled.subset(inner_val), _no_progress)
        return fitted.predictor.predict(labelled.subset(test_items))

    try:
        return repeated_cv(all_patients, cases.y, config.labels, fit_predict, plan, progress=progress)
    except ValueError as exc:
        raise TrainingDataError(f"repeated cross-validation is not possible on this data: {exc}") from None


def _split_description(config: TrainConfig, scheme: str, cv: CVResult | None) -> str:
    if cv is None:
        return "patient-level, stratified; held-out test, then training / validation"
    plan = cv.plan
    return (
        f"repeated cross-validation: {cv.folds}-fold x {plan.repeats} repeats, patient-grouped, label-stratified, "
        f"nested model selection; permutation test with {plan.permutations} label permutations "
        f"({plan.permutation_repeats} repeat each)"
        + (" (scheme auto: fewer than 200 patients)" if config.split.scheme == "auto" else "")
    )


def _final_fit_description(config: TrainConfig, cv: CVResult | None, counts: Mapping[str, int]) -> str:
    if cv is None:
        return ""
    if config.method == "radiomics":
        return (
            f"The package's model was then fit on all {counts['patients']} patients ({counts['lesions']} lesions) "
            "with the same recipe (feature selection inside); its threshold is the Youden threshold of the pooled "
            "out-of-fold probabilities. The cross-validated numbers above estimate how this recipe performs on "
            "new patients; the package itself has no held-out evaluation."
        )
    return (
        f"The package's network was then trained on {counts['train_patients']} of the {counts['patients']} patients, "
        f"early stopping on the other {counts['validation_patients']} (validation fraction "
        f"{config.split.val_fraction}); its threshold is the Youden threshold of the pooled out-of-fold "
        "probabilities. The cross-validated numbers above estimate how this recipe performs on new patients."
    )


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    work_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train ``config.method`` and write a verified model package with its report to ``out_dir``.

    Parameters
    ----------
    config
        A validated configuration (:func:`~inference.training.config.load_train_config`).
    out_dir
        The package folder to create (must not hold a package yet).
    work_dir
        Where phantom cohorts are generated (kept and reused); default a temporary folder.
    progress
        ``progress(stage, done, total, note)``, e.g. :class:`~inference.training.report.TextProgress`.

    Returns
    -------
    TrainResult

    Raises
    ------
    TrainingDataError
        The data cannot be split or has a label with a single class in the training split.
    pacs_agent.errors.ModelPackageError
        ``out_dir`` already holds a package.
    """
    from inference.registry import MANIFEST, write_package

    started = time.monotonic()
    progress = progress or _no_progress
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        from inference.errors import ModelPackageError

        raise ModelPackageError(f"{out} already holds a model package; choose a new folder")
    if config.method != "radiomics":
        _set_threads(config.threads)
    with _work_dir(work_dir) as work:
        cases, described = _load_cases(config, work, progress)
    y, patients = cases.y, cases.patients
    for j, label in enumerate(config.labels):
        known = y[~np.isnan(y[:, j]), j]
        if not 0 < known.sum() < known.size:
            raise TrainingDataError(f"label {label} has a single class in the data; cannot train")
    scheme = config.split.resolved_scheme(len(set(patients)))
    cv_result: CVResult | None = None
    cross_validation: dict[str, Any] = {}
    if scheme == "repeated-cv":
        cv_result = _repeated_cv(config, cases, progress)
        # the final package: every patient (networks keep a validation part for early stopping)
        everyone = np.arange(len(cases))
        if config.method == "radiomics":
            train_idx, val_idx = everyone, np.zeros(0, dtype=int)
        else:
            rel_train, rel_val = patient_split(patients, y, fraction=config.split.val_fraction, seed=config.seed + 1)
            train_idx, val_idx = everyone[rel_train], everyone[rel_val]
        test_idx = np.zeros(0, dtype=int)
    else:
        if config.split.test_fraction > 0:
            dev, test_idx = patient_split(patients, y, fraction=config.split.test_fraction, seed=config.seed)
        else:
            dev, test_idx = np.arange(len(cases)), np.zeros(0, dtype=int)
        rel_train, rel_val = patient_split(
            [patients[i] for i in dev], y[dev], fraction=config.split.val_fraction, seed=config.seed + 1
        )
        train_idx, val_idx = dev[rel_train], dev[rel_val]
        cross_validation = _cross_validate(config, cases, dev, progress) if config.split.cv_folds else {}
    assert_patient_disjoint(patients, train_idx, val_idx, test_idx)
    train_set, val_set, test_set = cases.subset(train_idx), cases.subset(val_idx), cases.subset(test_idx)
    fitted = _fit(config, train_set, val_set, progress)
    if cv_result is not None:
        thresholds = cv_result.thresholds
        validation: list[LabelEvaluation] = []
        test: list[LabelEvaluation] = []
    else:
        p_val = fitted.predictor.predict(val_set)
        thresholds = _thresholds(config.labels, val_set.y, p_val)
        validation = _evaluate(config.labels, val_set.y, p_val, thresholds)
        test = (
            _evaluate(config.labels, test_set.y, fitted.predictor.predict(test_set), thresholds)
            if len(test_set)
            else []
        )
    counts = {
        "patients": len(set(patients)),
        "lesions": len(cases),
        "train_patients": len(set(train_set.patients)),
        "validation_patients": len(set(val_set.patients)),
        "test_patients": len(set(test_set.patients)),
        "train_lesions": len(train_set),
        "validation_lesions": len(val_set),
        "test_lesions": len(test_set),
    }
    positives = {label: int(np.nansum(y[:, j])) for j, label in enumerate(config.labels)}
    training_data = {
        **described,
        **counts,
        "positives": positives,
        "split": _split_description(config, scheme, cv_result),
        "seed": config.seed,
    }
    metrics: dict[str, Any] = {r.label: r.summary() for r in cv_result.labels} if cv_result else {}
    evaluated = test or validation
    for ev in evaluated:
        table = {"split": "held-out test" if test else "validation", **ev.summary()}
        val_ev = next((v for v in validation if v.label == ev.label), None)
        if val_ev is not None and test:
            table["validation_auc"] = round(val_ev.auc, 4)
        if ev.label in cross_validation:
            cv = cross_validation[ev.label]
            table["cv_auc_mean"] = round(cv["auc_mean"], 4)
            table["cv_auc_sd"] = round(cv["auc_sd"], 4)
            table["cv_folds"] = cv["folds"]
        metrics[ev.label] = table
    spec = {**resolve_input_spec(config.method, config.input), **fitted.input_extra}
    if config.method == "m2":
        spec["covariates"] = ["age", "sex", "smoking"]
    if config.method == "m3":
        spec["aggregation"] = "mean of the slice probabilities per lesion"
    pkg = config.package
    metadata: dict[str, Any] = {
        "name": pkg["name"],
        "version": pkg["version"],
        "method": config.method,
        "labels": list(config.labels),
        "validation_status": pkg["validation_status"],
        "intended_use": pkg["intended_use"],
        "description": pkg.get("description", ""),
        "input": spec,
        "thresholds": thresholds,
        "training_data": training_data,
        "metrics": metrics,
    }
    if config.method != "radiomics":
        metadata["architecture"] = fitted.architecture
        metadata["normalisation"] = fitted.normalisation
        training_data["initialisation"] = fitted.init_table
        training_data["fine_tuning"] = config.training.stages
        if fitted.final_classifier:
            training_data["final_classifier"] = fitted.final_classifier
    if pkg.get("label_names"):
        metadata["label_names"] = dict(pkg["label_names"])
    package_dir = write_package(out, metadata, fitted.weights)
    cfg = config.training
    summary: dict[str, Any] = {
        "method": config.method,
        "labels": ", ".join(config.labels),
        "validation status": pkg["validation_status"],
        "intended use": pkg["intended_use"],
        "training data": described["description"],
        "evaluation": training_data["split"],
        "patients (train / validation / test)": (
            f"{counts['train_patients']} / {counts['validation_patients']} / {counts['test_patients']}"
        ),
        "lesions (train / validation / test)": (
            f"{counts['train_lesions']} / {counts['validation_lesions']} / {counts['test_lesions']}"
        ),
        "evaluation unit": "lesion" + (" (mean of its slice probabilities)" if config.method == "m3" else ""),
        f"thresholds (Youden, {'pooled out-of-fold' if cv_result else 'validation'})": thresholds,
        "seed": config.seed,
    }
    if config.method != "radiomics":
        summary["optimiser"] = (
            f"{cfg.optimizer} lr {cfg.lr}, batch {cfg.batch_size}, up to {cfg.epochs} epochs, early stopping on "
            f"validation {cfg.monitor} (patience {cfg.patience}); stopped after {fitted.stopped_epoch}, "
            f"best epoch {fitted.best_epoch}; balance {cfg.balance}"
        )
        summary["architecture"] = dict(config.architecture) or "paper-sized defaults"
        summary["initialisation"] = fitted.initialisation
        if fitted.final_classifier:
            summary["final classifier (last FC replaced; mean CV AUC on the training split)"] = "; ".join(
                f"{label}: {t['chosen']} ({t['cv']}; " + ", ".join(f"{k} {v:.3f}" for k, v in t["cv_auc"].items()) + ")"
                for label, t in fitted.final_classifier.items()
            )
        if cfg.stages == "staged":
            summary["fine-tuning"] = f"staged: new FC layers first, then all layers ({fitted.stages})"
    else:
        sel = fitted.input_extra
        summary["selected features"] = ", ".join(sel["features"])
        for key in ("feature_columns", "label-like columns never used as features", "deployable on DICOM"):
            if key in described:
                summary[key] = described[key]
    report = write_report(
        package_dir / "report",
        title=f"{pkg['name']} {pkg['version']}",
        summary=summary,
        test=test,
        validation=validation,
        cross_validation=cross_validation,
        history=fitted.history,
        repeated_cv=cv_result,
        final_fit=_final_fit_description(config, cv_result, counts),
    )
    seconds = time.monotonic() - started
    logger.info("trained %s in %.0f s", pkg["name"], seconds)
    return TrainResult(package_dir, report, tuple(test), tuple(validation), thresholds, seconds, cv_result)
