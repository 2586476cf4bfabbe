"""Models for tabular input, compatible with Opacus (no BatchNorm, only Linear layers)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .runconfig import MODELS


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
    torch.manual_seed(seed)
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


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters by name, as numpy arrays (Opacus's ``_module.`` prefix removed)."""
    return {k.removeprefix("_module."): v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Load ``weights`` (as returned by :func:`get_weights`) into ``model``; names and shapes must match."""
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}, strict=True)
