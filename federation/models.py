"""Models for tabular input, compatible with Opacus (no BatchNorm, only Linear layers)."""

from __future__ import annotations

import torch
from torch import nn

from .runconfig import MODELS

__all__ = ["build_model"]


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
