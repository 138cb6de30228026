"""Training and evaluation: datasets, patient-level splits, augmentation, training loops, metrics, reports.

``pacs-agent train {m1,m2,m3,m4,radiomics} --config TRAIN.toml --out PKG_DIR`` runs
:func:`~inference.training.train.train` (see ``inference.training.cli``). Importing this package
does not import torch; the training loop imports it when it runs.
"""

from inference.training.config import TrainConfig, load_train_config
from inference.training.evaluate import auc_ci, calibration, delong_auc_variance, roc_auc, youden_threshold
from inference.training.splits import assert_patient_disjoint, patient_kfold, patient_split

__all__ = [
    "TrainConfig",
    "assert_patient_disjoint",
    "auc_ci",
    "calibration",
    "delong_auc_variance",
    "load_train_config",
    "patient_kfold",
    "patient_split",
    "roc_auc",
    "youden_threshold",
]
