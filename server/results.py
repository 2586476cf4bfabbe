"""The results folder every training run writes (the ServerApp, and the research baselines).

It holds summary.json, rounds.csv, campuses.csv, fairness.csv, model.pt and plot.png.

The run's ε is the maximum over campuses (each campus's guarantee is about its
own rows; averaging would understate the weakest one). Global metrics are
weighted by each campus's number of test rows, and so is each subgroup's
metric in the fairness table, over the campuses that reported the group.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console

from edufl.federation.metrics import PRIMARY_METRIC, SUBGROUPS, evaluate_metrics
from edufl.federation.privacy import ACCOUNTANT, PRIVACY_SCOPE, PRIVACY_UNIT, PRIVACY_UNIT_SHORT, client_level_epsilon
from edufl.federation.randomness import REPRODUCIBLE_WARNING
from edufl.federation.schema import FederationSchema, schema_from_text
from edufl.federation.training import Subgroup
from edufl.federation.wire import NUM_EXAMPLES

__all__ = [
    "load_plotting",
    "METRIC_NAMES",
    "BASE_RATE_NOTE",
    "NO_DP_WARNING",
    "SECRET_NOISE",
    "Report",
    "code_version",
    "combined_interval",
    "global_metrics",
    "primary_metric",
    "task_metrics",
    "versions",
    "weighted",
    "worst_metric",
]

METRIC_NAMES = {"auc": "AUC", "macro_f1": "macro-F1"}
"""How the console and plots name each task's primary metric."""
NO_DP_WARNING = "DIFFERENTIAL PRIVACY IS OFF: model updates are released without clipping or noise; no ε applies."
SECRET_NOISE = "secret: drawn on each campus from OS entropy for every release, never from the run config"
BASE_RATE_NOTE = (
    "base_rate: the share of positive rows among a campus's test rows, exact, in the centralized and local "
    "baselines (the researcher's own rows); empty in federated runs: a campus releases no count of its positives "
    "(an exact one is not among the declared metrics; a DP one is `edufl analytics run` with a count query)"
)
"""What ``base_rate`` in campuses.csv and summary.json is, and why federated runs leave it empty."""


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries that determine results."""
    out = {"python": platform.python_version()}
    for package in ("edufl", "flwr", "torch", "opacus", "numpy", "pandas", "scikit-learn"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def code_version() -> dict:
    """The git commit the running edufl code comes from: ``commit`` (40 hex digits), ``dirty`` (uncommitted
    changes to tracked or untracked files), and ``source`` (the checkout's folder). Both are None, with
    ``source`` saying why, when the code does not run from a git checkout (an installed wheel, an app
    bundle on a coordinator) or git cannot be run; never raises."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:  # a folder inside some other repository
            raise ValueError
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain")), "source": str(root)}
    except (OSError, ValueError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "source": f"not a git checkout ({root}): no commit recorded"}


def _clean(value):
    """JSON-safe: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def task_metrics(task: str, schema: FederationSchema) -> tuple[str, ...]:
    """The metrics a run of ``task`` under ``schema`` reports per campus and weighted: its released evaluation
    metrics (:func:`~federation.metrics.evaluate_metrics`) but the loss, underscored, the primary metric first."""
    return tuple(k.replace("-", "_") for k in evaluate_metrics(task, schema) if k not in (NUM_EXAMPLES, "loss"))


def primary_metric(task: str) -> str:
    """``task``'s primary metric (underscored): ``auc`` for the binary tasks, ``macro_f1`` for ``final_result``."""
    return PRIMARY_METRIC[task].replace("-", "_")


def worst_metric(task: str) -> str:
    """The key of the lowest campus value of ``task``'s primary metric: ``worst_campus_auc``, ``worst_campus_macro_f1``."""
    return f"worst_campus_{primary_metric(task)}"


def weighted(rows: list[dict], key: str, weight: str = "n_test") -> float:
    """Mean of ``key`` over ``rows`` weighted by ``weight``, skipping NaN values (NaN if none)."""
    pairs = [(r[key], r[weight]) for r in rows if r.get(key) is not None and math.isfinite(r[key]) and r[weight] > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else float("nan")


def global_metrics(rows: list[dict], task: str, schema: FederationSchema) -> dict[str, float]:
    """Test-row-weighted :func:`task_metrics` of ``task`` over campus ``rows`` and the lowest campus value
    of its primary metric (:func:`worst_metric`)."""
    key = primary_metric(task)
    values = [r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    metrics = task_metrics(task, schema)
    return {**{m: weighted(rows, m) for m in metrics}, worst_metric(task): min(values) if values else float("nan")}


def _interval(low: float, high: float) -> str:
    return f"[{low:.2f}, {high:.2f}]" if math.isfinite(low) and math.isfinite(high) else "(no interval)"


def combined_interval(groups: list[dict], key: str) -> tuple[float, float]:
    """95 % interval of the test-row-weighted mean of ``key`` over the campuses' ``groups`` (each with
    ``n_test``, ``key`` and its bootstrap interval ``low``, ``high``): one campus's own interval; for several, a
    normal approximation: each campus's standard error taken as its interval's width over 2 × 1.96, the
    campuses independent, clipped to [0, 1]. NaN when no group, or one group's interval, is known."""
    if len(groups) == 1:
        return groups[0]["low"], groups[0]["high"]
    total = sum(g["n_test"] for g in groups)
    spread = [(g["n_test"] / total) * (g["high"] - g["low"]) / (2 * 1.96) for g in groups] if total else [math.nan]
    centre, se = weighted(groups, key), math.sqrt(sum(s * s for s in spread))
    if not (math.isfinite(centre) and math.isfinite(se)):
        return math.nan, math.nan
    return max(0.0, centre - 1.96 * se), min(1.0, centre + 1.96 * se)


def load_plotting() -> None:
    """Start importing what :meth:`Report.figure` needs (matplotlib: about 1 s of CPU) in a daemon thread: a
    coordinator spends most of a run waiting for campuses, so the plot at the run's end finds it imported."""

    def load() -> None:
        import matplotlib.figure  # noqa: F401
        import matplotlib.ticker  # noqa: F401

    threading.Thread(target=load, name="edufl-load-plotting", daemon=True).start()


@dataclass
class Report:
    """Collects per-round, per-campus results of one run and writes the results folder.

    ``config`` is stored as given under ``summary["config"]`` and names the run's
    ``task`` (and ``reproducible-noise``, when the run asked for it); ``dp`` says
    whether DP was on. A DP run with reproducible noise is marked
    (:data:`~federation.randomness.REPRODUCIBLE_WARNING`) on the console, in
    summary.json, in the CSVs and on the plot.
    """

    config: dict
    dp: bool
    delta: float
    console: Console = field(default_factory=lambda: Console(soft_wrap=True))
    train: dict[str, dict] = field(default_factory=dict)
    evaluation: dict[str, dict] = field(default_factory=dict)
    groups: dict[str, list[dict]] = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    receipts: list[dict] = field(default_factory=list)
    _round_failures: list[dict] = field(default_factory=list)
    _evaluated_now: set[str] = field(default_factory=set)
    _started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if not self.dp:
            self.console.print(f"[bold red]WARNING: --no-dp: {NO_DP_WARNING}[/bold red]")
        if self.reproducible_noise:
            self.console.print(f"[bold red]WARNING: --reproducible-noise: {REPRODUCIBLE_WARNING}[/bold red]")

    @property
    def reproducible_noise(self) -> bool:
        """Whether DP noise and sampling followed the run's seed (research only; never private against the coordinator)."""
        return self.dp and bool(self.config.get("reproducible-noise", False))

    @property
    def noise(self) -> str | None:
        """Where the DP noise came from, as outputs state it (None without DP)."""
        if not self.dp:
            return None
        return REPRODUCIBLE_WARNING if self.reproducible_noise else SECRET_NOISE

    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def schema(self) -> FederationSchema:
        """The run's federation schema (from ``config``'s ``federation-schema``)."""
        return schema_from_text(str(self.config.get("federation-schema", "")))

    @property
    def metrics(self) -> tuple[str, ...]:
        """The run's reported metrics (:func:`task_metrics` of its task)."""
        return task_metrics(self.task, self.schema)

    @property
    def primary(self) -> str:
        """The run's primary metric (:func:`primary_metric` of its task)."""
        return primary_metric(self.task)

    def add_train(
        self, campus: str, *, n_train: int, loss: float, epsilon: float, noise_multiplier: float, sample_rate: float, steps: int
    ) -> None:
        """Record a campus's training reply (ε is its total so far; ``inf`` without DP)."""
        self.train[campus] = dict(
            n_train=int(n_train),
            train_loss=loss,
            epsilon=epsilon,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=int(steps),
        )

    def add_evaluation(
        self,
        campus: str,
        *,
        n_test: int,
        metrics: dict[str, float],
        groups: dict[tuple[str, str], Subgroup],
        base_rate: float | None = None,
    ) -> None:
        """Record a campus's evaluation of the current global model on its test rows: ``metrics`` (at
        least :attr:`metrics`), the subgroups it reported, ``(attribute, value) -> Subgroup(test rows,
        primary metric, interval low, interval high)`` (as from :func:`federation.training.subgroup_metrics`),
        and, where the caller holds the campus's test rows (the research baselines), their ``base_rate``: the
        share of positive rows (binary tasks). Campuses do not release it (see :data:`BASE_RATE_NOTE`)."""
        self.evaluation[campus] = dict(n_test=int(n_test), base_rate=base_rate, **{k: float(metrics[k]) for k in self.metrics})
        self.groups[campus] = [
            dict(
                attribute=a,
                value=v,
                n_test=int(g.n),
                **{self.primary: float(g.value), "low": float(g.low), "high": float(g.high)},
            )
            for (a, v), g in groups.items()
        ]
        self._evaluated_now.add(campus)

    def add_failure(self, server_round: int, phase: str, reason: str, refused: bool = False) -> None:
        """Record a campus that did not reply, or replied with an error, in ``phase``
        (``refused``: the campus declined by its own rules, as opposed to a fault)."""
        entry = dict(round=server_round, phase=phase, reason=reason, refused=refused)
        self.failures.append(entry)
        self._round_failures.append(entry)
        self.console.print(f"[yellow]round {server_round} {phase}: {reason}[/yellow]")

    def add_receipt(self, server_round: int, phase: str, campus: str, payload_bytes: int, payload_sha256: str) -> None:
        """Record what the coordinator received from a campus (digest as in :func:`federation.audit.payload_digest`)."""
        self.receipts.append(
            dict(round=server_round, phase=phase, campus=campus, payload_bytes=payload_bytes, payload_sha256=payload_sha256)
        )

    def end_round(self, server_round: int, num_rounds: int) -> dict:
        """Close a round: its row (metrics over the campuses that evaluated in it) and progress line."""
        rows = [r for r in self.campus_rows() if r["campus"] in self._evaluated_now]
        train = [t for t in self.train.values() if t["n_train"] > 0]
        loss_total = sum(t["n_train"] for t in train)
        row = {
            "round": server_round,
            "train_loss": sum(t["train_loss"] * t["n_train"] for t in train) / loss_total if loss_total else float("nan"),
            **global_metrics(rows, self.task, self.schema),
            "epsilon_max": self.epsilon_max(),
            "campuses_evaluated": len(rows),
            "failures": len(self._round_failures),
            "elapsed_s": time.perf_counter() - self._started,
        }
        self._round_failures = []
        self._evaluated_now = set()
        self.rounds.append(row)
        eps = f"max ε {row['epsilon_max']:.3f}" if self.dp else "[bold red]NO DP[/bold red]"
        eps += f" [bold red]({REPRODUCIBLE_WARNING})[/bold red]" if self.reproducible_noise else ""
        key, name = self.primary, METRIC_NAMES[self.primary]
        self.console.print(
            f"round {server_round:>3}/{num_rounds}  loss {row['train_loss']:.4f}  "
            f"{name} {row[key]:.4f}  worst-campus {name} {row[worst_metric(self.task)]:.4f}  {eps}"
        )
        return row

    def state(self) -> dict:
        """What the report has collected so far (plain values), for a checkpoint; ``elapsed_s`` in seconds."""
        return dict(
            train=self.train,
            evaluation=self.evaluation,
            groups=self.groups,
            rounds=self.rounds,
            failures=self.failures,
            receipts=self.receipts,
            elapsed_s=time.perf_counter() - self._started,
        )

    def restore(self, state: dict) -> None:
        """Continue from :meth:`state`'s output: later rounds add to it, elapsed time counts on from it."""
        self.train, self.evaluation, self.groups, self.rounds = (
            state["train"],
            state["evaluation"],
            state["groups"],
            state["rounds"],
        )
        self.failures, self.receipts = state["failures"], state["receipts"]
        self._started = time.perf_counter() - state["elapsed_s"]

    def epsilon_max(self) -> float:
        """The run's ε: the maximum over campuses (``inf`` without DP, 0 before any release)."""
        if not self.dp:
            return float("inf")
        return max((t["epsilon"] for t in self.train.values()), default=0.0)

    def client_level(self) -> dict | None:
        """Central DP on the coordinator (``central-dp`` in ``config``), None when off: its settings and the
        client-level ε after the rounds run so far (every campus takes part in every round: sampling rate 1)."""
        if self.config.get("central-dp", "off") == "off":
            return None
        sigma, rounds = self.config["central-noise-multiplier"], len(self.rounds)
        return {
            "mechanism": "server-side fixed clipping of each campus's update, equal-weight mean, Gaussian noise "
            "(flwr DifferentialPrivacyServerSideFixedClipping)",
            "noise_multiplier": sigma,
            "clipping_norm": self.config["central-clipping-norm"],
            "sample_rate": 1.0,
            "rounds": rounds,
            "epsilon": client_level_epsilon(sigma, 1.0, rounds, self.delta),
            "delta": self.delta,
            "accountant": ACCOUNTANT,
            "unit": "one campus (all of its rows), added or removed",
        }

    def campus_rows(self) -> list[dict]:
        """One row per campus that evaluated: latest metrics, counts and privacy spent."""
        rows = []
        for campus in sorted(self.evaluation):
            t = self.train.get(campus, {})
            rows.append(
                {
                    "campus": campus,
                    "n_train": t.get("n_train", 0),
                    **self.evaluation[campus],
                    "epsilon": t.get("epsilon", 0.0) if self.dp else float("inf"),
                    "delta": self.delta if self.dp else None,
                    "noise_multiplier": t.get("noise_multiplier"),
                    "sample_rate": t.get("sample_rate"),
                    "steps": t.get("steps", 0),
                }
            )
        return rows

    def fairness(self) -> list[dict]:
        """The fairness table: one row per subgroup (``attribute``, ``value``) reported by at least one campus
        in its latest evaluation, with the number of those ``campuses`` and of the campuses that withheld it
        (``withheld_by``: fewer than their ``release.min_cohort_size`` test rows in it, or complementary
        suppression), the reported test rows in the group (``n_test``), the primary metric weighted by those
        rows and its 95 % interval (``<metric>_low``, ``<metric>_high``; :func:`combined_interval`)."""
        key = self.primary
        table = []
        for attribute in SUBGROUPS:
            for value in self.schema.vocabulary(attribute):
                reported = [
                    g for groups in self.groups.values() for g in groups if (g["attribute"], g["value"]) == (attribute, value)
                ]
                if not reported:
                    continue
                low, high = combined_interval(reported, key)
                table.append(
                    dict(
                        attribute=attribute,
                        value=value,
                        campuses=len(reported),
                        withheld_by=len(self.groups) - len(reported),
                        n_test=sum(g["n_test"] for g in reported),
                        **{key: weighted(reported, key), f"{key}_low": low, f"{key}_high": high},
                    )
                )
        return table

    def write(self, out: Path, state_dict: dict[str, torch.Tensor] | None, wall_time_s: float) -> dict:
        """Write the results folder ``out`` and return the summary dict."""
        out.mkdir(parents=True, exist_ok=True)
        rows, fairness = self.campus_rows(), self.fairness()
        summary = {
            "config": self.config,
            "versions": versions(),
            "code": code_version(),
            "privacy": {
                "dp": self.dp,
                **({"warning": NO_DP_WARNING} if not self.dp else {}),
                "noise": self.noise,
                "epsilon": self.epsilon_max(),
                "epsilon_is": "maximum over campuses",
                "delta": self.delta if self.dp else None,
                "accountant": ACCOUNTANT if self.dp else None,
                "unit": PRIVACY_UNIT,
                **({"scope": PRIVACY_SCOPE} if self.dp else {}),
                "client_level": self.client_level(),
            },
            "rounds": self.rounds,
            "campuses": rows,
            "base_rate_is": BASE_RATE_NOTE,
            "global": global_metrics(rows, self.task, self.schema),
            "fairness": {
                "metric": self.primary,
                "groups": fairness,
                "how": "each campus reports the metric on each subgroup of at least its release.min_cohort_size (k) "
                "test rows, with its 95 % percentile bootstrap interval over that group's rows; smaller groups are "
                "not sent (withheld_by counts the campuses that sent none), nor, per attribute, its smallest groups "
                "while fewer than k test rows would lie outside the groups sent; a group's value is the mean over "
                "the campuses that reported it, weighted by their test rows in the group, its interval that of "
                "one campus, or for several a normal approximation from the campuses' intervals",
            },
            "failures": self.failures,
            "receipts": self.receipts,
            "wall_time_s": wall_time_s,
        }
        (out / "summary.json").write_text(json.dumps(_clean(summary), indent=2) + "\n")
        # As in summary.json, no ε applies without DP: an empty cell, not "inf".
        for name, table in (("rounds.csv", self.rounds), ("campuses.csv", rows)):
            frame = pd.DataFrame(table).replace([math.inf, -math.inf], math.nan)
            frame.assign(
                dp=self.dp,
                privacy_unit=PRIVACY_UNIT_SHORT if self.dp else None,
                noise="reproducible" if self.reproducible_noise else ("secret" if self.dp else None),
            ).to_csv(out / name, index=False)
        columns = [
            "attribute",
            "value",
            "campuses",
            "withheld_by",
            "n_test",
            self.primary,
            f"{self.primary}_low",
            f"{self.primary}_high",
        ]
        pd.DataFrame(fairness, columns=columns).to_csv(out / "fairness.csv", index=False)
        if state_dict is not None:
            torch.save(state_dict, out / "model.pt")
        self._plot(out / "plot.png")
        g = summary["global"]
        privacy = (
            f"ε = {self.epsilon_max():.3f} (max over campuses, δ = {self.delta:g}, per {PRIVACY_UNIT_SHORT})"
            if self.dp
            else "[bold red]NO DP[/bold red]"
        )
        privacy += f" [bold red]({REPRODUCIBLE_WARNING})[/bold red]" if self.reproducible_noise else ""
        if central := summary["privacy"]["client_level"]:
            privacy += f", client-level ε = {central['epsilon']:.3f} (central DP, δ = {self.delta:g}, per campus)"
        key, name = self.primary, METRIC_NAMES[self.primary]
        self.console.print(
            f"done: weighted {name} {g[key]:.4f}, worst-campus {name} {g[worst_metric(self.task)]:.4f}, {privacy} -> {out}"
        )
        for attribute in SUBGROUPS:
            groups = [
                f"{r['value']} {r[key]:.3f} {_interval(r[f'{key}_low'], r[f'{key}_high'])} (n {r['n_test']}, "
                f"{r['campuses']} campus{'es' if r['campuses'] > 1 else ''}"
                f"{f', withheld by {w}' if (w := r['withheld_by']) else ''})"
                for r in fairness
                if r["attribute"] == attribute
            ]
            self.console.print(f"  {name} by {attribute}: {', '.join(groups) or 'no group reported'}")
        return summary

    def title(self) -> str:
        """The settings that produced the run, in two lines, for its plot's title."""
        c = self.config
        n = len(c["campuses"]) if "campuses" in c else len(self.train | self.evaluation)
        campuses = f"{n} campuses" + (f" by {c['campus-by']}" if "campuses" in c else "")
        privacy = f"DP-SGD ε ≤ {c.get('target-epsilon'):g}, δ = {self.delta:g}" if self.dp else "NO DIFFERENTIAL PRIVACY"
        return (
            f"{c.get('mode', 'federated')}, {campuses}, task {self.task} at day {c.get('cutoff-day')}\n"
            f"{c.get('model')}, {c.get('strategy')}, {c.get('num-rounds')} rounds, {privacy}, seed {c.get('seed')}"
        )

    def figure(self):
        """The run's plot (a matplotlib Figure): left, the test primary metric per round, weighted and of the worst
        campus, with the chance level of AUC (0.5); right, the ε spent so far (maximum over campuses) against
        the run's target. The title holds the settings (:meth:`title`)."""
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        frame = pd.DataFrame(self.rounds)
        key, name = self.primary, METRIC_NAMES[self.primary]
        fig = Figure(figsize=(10, 4.2), layout="constrained")
        metric, spent = fig.subplots(1, 2)
        metric.plot(frame["round"], frame[key], marker="o", label=f"weighted {name}")
        metric.plot(frame["round"], frame[worst_metric(self.task)], marker=".", linestyle="--", label=f"worst-campus {name}")
        if key == "auc":
            metric.axhline(0.5, color="grey", linestyle=":", label="chance (AUC 0.5)")
            metric.set_ylim(min(0.45, frame[worst_metric(self.task)].min() - 0.02), max(0.55, frame[key].max() + 0.02))
        metric.set_ylabel(f"test {name}")
        metric.set_title(f"test {name} of the global model")
        if self.dp:
            spent.plot(frame["round"], frame["epsilon_max"], color="tab:red", marker="s", label="ε spent (max over campuses)")
            spent.axhline(self.config["target-epsilon"], color="black", linestyle="--", label="target ε")
            spent.set_ylim(0, self.config["target-epsilon"] * 1.15)
            spent.set_ylabel(f"ε per {PRIVACY_UNIT_SHORT}")
            spent.set_title(f"privacy spent so far (δ = {self.delta:g})")
        else:
            spent.text(0.5, 0.5, "no DP: no ε applies", ha="center", va="center", color="red", transform=spent.transAxes)
            spent.set_title("privacy spent")
        for ax in (metric, spent):
            ax.set_xlabel("round")
            ax.set_xlim(0.5, frame["round"].max() + 0.5)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            if ax.lines:
                ax.legend(loc="lower right", fontsize="small")
        warning = f"\n{REPRODUCIBLE_WARNING}" if self.reproducible_noise else ""
        fig.suptitle(self.title() + warning, color="red" if warning or not self.dp else "black", fontsize="medium")
        return fig

    def _plot(self, path: Path) -> None:
        self.figure().savefig(path, dpi=110)
