"""Models for tabular input, compatible with Opacus (no BatchNorm, only Linear layers), and their weights on the wire.

A model travels in a Flower message as one flat float32 array (:func:`model_arrays`),
not one array per layer: the deployment engine moves every array of a message as
its own object, one request each between ServerApp, SuperLink and SuperNode, so a
round's transfer cost grows with the number of arrays (16 objects per message for
the MLP's six tensors, 6 for one).
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from .runconfig import MODELS

__all__ = ["WEIGHTS", "build_model", "load_model_arrays", "model_arrays", "n_weights"]

WEIGHTS = "weights"
"""The name of the one array of a model's :func:`model_arrays`."""


def build_model(name: str, n_features: int, seed: int = 0, outputs: int = 1) -> nn.Module:
    """A fresh model mapping (batch, n_features) float32 input to logits: shape
    (batch,) with ``outputs`` = 1 (a binary task), else (batch, outputs), one per class.

    ``mlp``: Linear(n, 64) - ReLU - Linear(64, 32) - ReLU - Linear(32, outputs).
    ``logistic``: Linear(n, outputs) (logistic regression; multinomial for outputs > 1).
    Weights are initialised from ``seed`` so every run with that seed starts alike.

    Raises
    ------
    ValueError
        For an unknown model name.
    """
    generator_state = torch.random.get_rng_state()
    # The CPU generator the layers draw from; torch.manual_seed would also queue a CUDA seeding, with its
    # stack trace, on every call in a process that has not initialised CUDA.
    torch.default_generator.manual_seed(seed)
    try:
        if name == "mlp":
            body = nn.Sequential(nn.Linear(n_features, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, outputs))
        elif name == "logistic":
            body = nn.Sequential(nn.Linear(n_features, outputs))
        else:
            raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    finally:
        torch.random.set_rng_state(generator_state)
    return nn.Sequential(body, nn.Flatten(0)) if outputs == 1 else nn.Sequential(body)


def n_weights(model: nn.Module) -> int:
    """The number of weights of ``model``: the length of its :func:`model_arrays` array."""
    return sum(p.numel() for p in model.parameters())


def model_arrays(model: nn.Module) -> ArrayRecord:
    """``model``'s weights as an ``ArrayRecord`` of one float32 array, shape (:func:`n_weights`,), named
    :data:`WEIGHTS`: its parameters flattened and concatenated in ``state_dict`` order
    (``torch.nn.utils.parameters_to_vector``)."""
    return ArrayRecord({WEIGHTS: Array(parameters_to_vector(model.parameters()).detach().cpu().numpy())})


def load_model_arrays(model: nn.Module, record: ArrayRecord) -> nn.Module:
    """Set ``model``'s weights from ``record`` (as :func:`model_arrays` writes it) and return the model.

    Raises
    ------
    ValueError
        When ``record`` holds anything but one float32 array named :data:`WEIGHTS` of :func:`n_weights` entries.
    """
    array = record.get(WEIGHTS) if list(record) == [WEIGHTS] else None
    if array is None or array.dtype != "float32" or list(array.shape) != [n_weights(model)]:
        found = [(name, list(a.shape), a.dtype) for name, a in record.items()]
        raise ValueError(f"arrays {found}; expected one float32 array {WEIGHTS!r} of {n_weights(model)} weights")
    vector_to_parameters(torch.from_numpy(array.numpy().copy()), model.parameters())
    return model
