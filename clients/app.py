"""The campus side: a Flower ClientApp that trains with DP-SGD on the campus's own rows.

Where a campus's data comes from:

* deployment: the SuperNode's node config, ``--node-config "data-dir='DIR' campus='NAME'"``;
  the ClientApp reads only ``DIR``;
* simulation (``edufl simulate``): each virtual SuperNode's ``partition-id``
  picks one campus folder from the manifest in ``$EDUFL_SIM_DIR``, which holds
  one folder per campus with only that campus's rows.

Privacy is enforced here, not trusted from the coordinator: every requested
configuration is validated, the noise multiplier is calibrated by the campus
for the whole run, and a round whose steps would take this campus's ε past the
target is refused before any training.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federation.data import load_tables
from federation.models import build_model
from federation.privacy import DPSettings, calibrate_noise, epsilon, steps_per_epoch
from federation.runconfig import ARRAYS, CAMPUS, CONFIG, METRICS, NUM_EXAMPLES, SIM_ENV, SIM_MANIFEST, STATE_PRIVACY, RunConfig
from federation.tasks import TaskData, build_task, feature_names, split
from federation.training import evaluate, train

app = ClientApp()


class PrivacyBudgetExceeded(RuntimeError):
    """A requested round would take the campus's ε past its target, or change the run's privacy settings."""


@dataclass
class Campus:
    name: str
    train: TaskData
    test: TaskData


_CAMPUS_CACHE: dict[tuple, Campus] = {}


def campus_source(node_config: dict) -> tuple[str, Path]:
    """(campus name, data folder) for this SuperNode.

    Raises
    ------
    RuntimeError
        When the node config names no data folder and this is not an edufl simulation.
    """
    if "data-dir" in node_config:
        data_dir = Path(str(node_config["data-dir"]))
        return str(node_config.get("campus", data_dir.name)), data_dir
    if "partition-id" in node_config and os.environ.get(SIM_ENV):
        root = Path(os.environ[SIM_ENV])
        names = json.loads((root / SIM_MANIFEST).read_text())
        name = names[int(node_config["partition-id"])]
        return name, root / name
    raise RuntimeError("this SuperNode has no campus data: start it with --node-config \"data-dir='DIR' campus='NAME'\"")


def load_campus(node_config: dict, cfg: RunConfig) -> Campus:
    """This campus's train/test examples for ``cfg``'s task, cutoff and split (cached per process)."""
    name, data_dir = campus_source(node_config)
    key = (str(data_dir), cfg.task, cfg.cutoff_day, cfg.split, cfg.test_fraction, cfg.seed)
    if key not in _CAMPUS_CACHE:
        data = build_task(cfg.task, load_tables(data_dir), cfg.cutoff_day)
        train_part, test_part = split(data, cfg.split, cfg.test_fraction, cfg.seed)
        _CAMPUS_CACHE[key] = Campus(name, train_part, test_part)
    return _CAMPUS_CACHE[key]


def round_seed(cfg: RunConfig, campus: str, server_round: int) -> int:
    """Seed for one campus's local training in one round (reproducible, distinct per campus and round)."""
    return (cfg.seed * 1_000_003 + server_round * 1009 + zlib.crc32(campus.encode())) % 2**31


def _model(cfg: RunConfig, msg: Message):
    model = build_model(cfg.model, len(feature_names()))
    model.load_state_dict(msg.content[ARRAYS].to_torch_state_dict(), strict=True)
    return model


def _campus_record(campus: Campus) -> ConfigRecord:
    return ConfigRecord({"name": campus.name})


# Settings that fix this campus's privacy guarantee for a run: taken from the first
# round's request and never changed by a later one.
PRIVACY_CONTRACT = ("dp", "target-epsilon", "delta", "max-grad-norm", "num-rounds", "local-epochs", "batch-size")


def _check_contract(cfg: RunConfig, state: ConfigRecord, campus: str, server_round: int) -> None:
    values = cfg.to_flower()
    requested = {k: values[k] for k in PRIVACY_CONTRACT}
    agreed = {k: state[f"contract.{k}"] for k in PRIVACY_CONTRACT if f"contract.{k}" in state}
    changed = {k: (agreed[k], v) for k, v in requested.items() if k in agreed and agreed[k] != v}
    if changed:
        detail = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise PrivacyBudgetExceeded(f"campus {campus} refuses round {server_round}: the run's privacy settings changed ({detail})")
    for k, v in requested.items():
        state[f"contract.{k}"] = v


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received global model locally; reply with weights, counts, loss and ε so far."""
    cfg = RunConfig.from_flower(dict(msg.content[CONFIG]))
    server_round = int(msg.content[CONFIG]["server-round"])
    campus = load_campus(context.node_config, cfg)
    model = _model(cfg, msg)
    state = context.state.get(STATE_PRIVACY, ConfigRecord())
    _check_contract(cfg, state, campus.name, server_round)
    history = list(zip(state.get("sigma", []), state.get("q", []), state.get("steps", [])))
    n = len(campus.train)
    sigma = q = float("nan")
    steps_total = int(sum(state.get("steps", [])))
    loss = float("nan")
    eps = epsilon(history, cfg.delta) if cfg.dp else math.inf
    if n > 0:
        steps_round = cfg.local_epochs * steps_per_epoch(n, cfg.batch_size)
        q = 1.0 / steps_per_epoch(n, cfg.batch_size)
        if cfg.dp:
            settings = DPSettings(cfg.target_epsilon, cfg.delta, cfg.max_grad_norm)
            sigma = float(state["noise-multiplier"]) if "noise-multiplier" in state else calibrate_noise(
                settings, q, cfg.num_rounds * steps_round
            )
            projected = epsilon([*history, (sigma, q, steps_round)], cfg.delta)
            if projected > cfg.target_epsilon:
                raise PrivacyBudgetExceeded(
                    f"campus {campus.name} refuses round {server_round}: its ε would reach {projected:.3f}, "
                    f"above target-epsilon {cfg.target_epsilon} (spent so far {epsilon(history, cfg.delta):.3f})"
                )
        result = train(
            model, campus.train, epochs=cfg.local_epochs, batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate, seed=round_seed(cfg, campus.name, server_round),
            noise_multiplier=sigma if cfg.dp else None, max_grad_norm=cfg.max_grad_norm,
            history=history, proximal_mu=cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0,
        )
        loss, history, steps_total = result.loss, result.history, steps_total + result.steps
        eps = epsilon(history, cfg.delta) if cfg.dp else math.inf
        if cfg.dp and eps > cfg.target_epsilon:  # fail closed: never released
            raise PrivacyBudgetExceeded(f"campus {campus.name}: accounted ε exceeds the target after round {server_round}")
        state.update({
            "noise-multiplier": sigma,
            "sigma": [float(h[0]) for h in history],
            "q": [float(h[1]) for h in history],
            "steps": [int(h[2]) for h in history],
        })
    context.state[STATE_PRIVACY] = state
    metrics = MetricRecord({
        NUM_EXAMPLES: n, "train-loss": loss, "epsilon": eps, "delta": cfg.delta,
        "noise-multiplier": sigma, "sample-rate": q, "steps": steps_total,
    })
    content = RecordDict({ARRAYS: ArrayRecord(model.state_dict()), METRICS: metrics, CAMPUS: _campus_record(campus)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this campus's held-out test rows."""
    cfg = RunConfig.from_flower(dict(msg.content[CONFIG]))
    campus = load_campus(context.node_config, cfg)
    scores = evaluate(_model(cfg, msg), campus.train, campus.test)
    metrics = MetricRecord({NUM_EXAMPLES: len(campus.test), **{k.replace("_", "-"): v for k, v in scores.items() if k != "threshold"}})
    return Message(content=RecordDict({METRICS: metrics, CAMPUS: _campus_record(campus)}), reply_to=msg)
