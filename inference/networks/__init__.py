"""The M1-M4 networks and their wrappers, and the factory the model registry builds them with.

One module per method: :mod:`~inference.networks.m1_resnet` (KRAS, 2D ResNet),
:mod:`~inference.networks.m2_multiview` (EGFR + KRAS, multi-view multi-task),
:mod:`~inference.networks.m3_efficientnet` (RAS family, EfficientNet-B0 + self-attention),
:mod:`~inference.networks.m4_deep_radscore` (Deep-RadScore, DenseNet121 + RadScores).
Every network is randomly initialised; weights come only from a verified model package.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from inference.networks.base import MethodModel, Probabilities, ZScore
from inference.networks.blocks import default_device
from inference.networks.m1_resnet import M1Model, ResNetKRAS
from inference.networks.m2_multiview import (
    Covariates,
    M2Model,
    MultiViewInput,
    MultiViewMultiTask,
    encode_covariates,
)
from inference.networks.m3_efficientnet import FIVE_LABELS, GROUPED_LABELS, EfficientNetAttention, M3Model
from inference.networks.m4_deep_radscore import DeepRadInput, DeepRadScoreNet, M4Model

__all__ = [
    "FIVE_LABELS",
    "GROUPED_LABELS",
    "NETWORK_METHODS",
    "NORMALISATION_KEYS",
    "Covariates",
    "DeepRadInput",
    "DeepRadScoreNet",
    "EfficientNetAttention",
    "M1Model",
    "M2Model",
    "M3Model",
    "M4Model",
    "MethodModel",
    "MultiViewInput",
    "MultiViewMultiTask",
    "Probabilities",
    "ResNetKRAS",
    "ZScore",
    "architecture_keys",
    "build_model",
    "build_network",
    "default_device",
    "encode_covariates",
    "head_parameter_names",
    "label_problem",
]

_NETWORKS: dict[str, type[nn.Module]] = {
    "m1": ResNetKRAS,
    "m2": MultiViewMultiTask,
    "m3": EfficientNetAttention,
    "m4": DeepRadScoreNet,
}
NETWORK_METHODS = tuple(_NETWORKS)
"""Methods whose model is a torch network."""

_LABEL_ARGUMENT = {"m2": "tasks", "m3": "num_labels", "m4": "num_labels"}
"""Constructor argument set from ``len(labels)`` (M1 always has 2 outputs for one label)."""

_OUTPUT_WEIGHT = {"m1": "fc.weight", "m2": "fusion_bias", "m3": "classifier.weight", "m4": "fc2.weight"}
"""State-dict entry whose first dimension is the number of outputs."""

_NEW_LAYERS: dict[str, tuple[str, ...]] = {
    "m1": ("fc.",),
    "m2": (".heads.", ".to_rgb.", "fusion_"),
    "m3": ("classifier.",),
    "m4": ("fc1.", "fc2."),
}
"""Parameter-name fragments of the layers a transfer-learned network adds on top of its trunk."""

NORMALISATION_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "m1": (frozenset({"mean", "std"}), frozenset()),
    "m2": (frozenset({"mean", "std", "age_mean", "age_std"}), frozenset()),
    "m3": (frozenset({"mean", "std"}), frozenset()),
    "m4": (frozenset({"mean", "std"}), frozenset({"radscore_mean", "radscore_std"})),
}
"""Per method: (required, optional) keys of the model package's ``[normalisation]`` table."""


def architecture_keys(method: str) -> frozenset[str]:
    """Keyword arguments of the method's network that a model package may set.

    Parameters
    ----------
    method
        ``"m1"`` .. ``"m4"``.

    Returns
    -------
    frozenset[str]
        Constructor parameter names, minus the one derived from the labels.
    """
    network = _network_class(method)
    names = set(inspect.signature(network.__init__).parameters) - {"self"}
    names.discard(_LABEL_ARGUMENT.get(method, ""))
    return frozenset(names)


def head_parameter_names(method: str, network: nn.Module) -> list[str]:
    """Names of the parameters of the layers added on top of the trunk (stage 1 of staged fine-tuning).

    M1 the final FC; M2 each branch's task heads (FC256, FC128, FC2), the 1 -> 3 channel 3x3 conv
    and the view fusion; M3 the classifier; M4 the two FC layers (the penultimate, where the
    RadScores enter, and the last).

    Returns
    -------
    list of str
        Never empty.
    """
    fragments = _NEW_LAYERS[_check_method(method)]
    names = [n for n, _ in network.named_parameters() if any(f in n or n.startswith(f) for f in fragments)]
    if not names:
        raise ValueError(f"the {method} network has no head parameters named {fragments}")
    return names


def build_network(method: str, labels: Sequence[str], architecture: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a randomly initialised network for a method.

    Parameters
    ----------
    method
        ``"m1"`` .. ``"m4"``.
    labels
        Output labels (their number sets the output size; M1 takes exactly one).
    architecture
        Keyword arguments of the network class (``width``, ``blocks``, ...).

    Returns
    -------
    torch.nn.Module
        The network in training mode on the CPU.

    Raises
    ------
    ValueError
        Unknown method, unknown architecture key, or labels the method cannot have.
    """
    network = _network_class(method)
    kwargs = dict(architecture or {})
    unknown = set(kwargs) - architecture_keys(method)
    if unknown:
        raise ValueError(
            f"unknown architecture key(s) {sorted(unknown)} for {method}; allowed: {sorted(architecture_keys(method))}"
        )
    for key in ("repeats", "mask_depths", "blocks", "head_dims"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    if method == "m1":
        if len(labels) != 1:
            raise ValueError(f"m1 predicts one gene (wild type / mutant), got labels {list(labels)}")
    else:
        kwargs[_LABEL_ARGUMENT[method]] = len(labels)
    return network(**kwargs)


def label_problem(method: str, labels: Sequence[str], state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Check labels against the number of outputs stored in a state dict.

    Parameters
    ----------
    method
        ``"m1"`` .. ``"m4"``.
    labels
        Labels declared by the model package.
    state_dict
        Weights of the network.

    Returns
    -------
    str or None
        A description of the mismatch, or None when they agree.
    """
    key = _OUTPUT_WEIGHT[_check_method(method)]
    if key not in state_dict:
        return f"the weights have no {key!r} entry, so they are not an {method} network"
    outputs = int(state_dict[key].shape[0])
    expected = 2 if method == "m1" else len(labels)
    if method == "m1" and len(labels) != 1:
        return f"m1 takes exactly one label (wild type / mutant of one gene), got {list(labels)}"
    if outputs != expected:
        return f"labels {list(labels)} need {expected} network outputs but the weights have {outputs} ({key})"
    return None


def build_model(
    method: str,
    network: nn.Module,
    labels: Sequence[str],
    normalisation: Mapping[str, Any],
    *,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
) -> MethodModel[Any]:
    """Wrap a network (with its weights loaded) for inference.

    Parameters
    ----------
    method
        ``"m1"`` .. ``"m4"``.
    network
        The method's network.
    labels
        Output labels in network order.
    normalisation
        The package's ``[normalisation]`` table (see :data:`NORMALISATION_KEYS`).
    device
        Default: CUDA when available, else CPU.
    batch_size
        Items per forward pass (default: the wrapper's).

    Returns
    -------
    MethodModel
        The wrapper, network in eval mode.
    """
    if not isinstance(network, _network_class(method)):
        raise TypeError(f'Argument "network" must be a {_NETWORKS[method].__name__} for {method}.')
    required, optional = NORMALISATION_KEYS[method]
    missing = required - set(normalisation)
    unknown = set(normalisation) - required - optional
    if missing or unknown:
        raise ValueError(f"normalisation for {method}: missing {sorted(missing)}, unknown {sorted(unknown)}")
    kwargs: dict[str, Any] = {"device": device}
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    image = ZScore(float(normalisation["mean"]), float(normalisation["std"]))
    labels = tuple(labels)
    if method == "m1":
        return M1Model(cast(ResNetKRAS, network), labels, normalisation=image, **kwargs)
    if method == "m2":
        age = ZScore(float(normalisation["age_mean"]), float(normalisation["age_std"]))
        return M2Model(cast(MultiViewMultiTask, network), labels, normalisation=image, age=age, **kwargs)
    if method == "m3":
        return M3Model(cast(EfficientNetAttention, network), labels, normalisation=image, **kwargs)
    net = cast(DeepRadScoreNet, network)
    radscore = None
    if "radscore_mean" in normalisation or "radscore_std" in normalisation:
        means = list(normalisation.get("radscore_mean", [0.0] * net.radscores))
        stds = list(normalisation.get("radscore_std", [1.0] * net.radscores))
        if len(means) != net.radscores or len(stds) != net.radscores:
            raise ValueError(f"radscore_mean / radscore_std must have {net.radscores} values each")
        radscore = tuple(ZScore(float(m), float(s)) for m, s in zip(means, stds, strict=True))
    return M4Model(net, labels, normalisation=image, radscore_normalisation=radscore, **kwargs)


def _check_method(method: str) -> str:
    if method not in _NETWORKS:
        raise ValueError(f"unknown network method {method!r}; known: {', '.join(NETWORK_METHODS)}")
    return method


def _network_class(method: str) -> type[nn.Module]:
    return _NETWORKS[_check_method(method)]
