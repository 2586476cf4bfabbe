"""Reproducible studies: a TOML config expands into a grid of runs ("cells"), each run once.

``edufl experiment run CONFIG [--out DIR]`` runs every cell not already done
(so an interrupted study resumes where it stopped), then writes:

* ``rows.csv``: one row per cell (one seed), global metrics and ε spent;
* ``campus_rows.csv``: one row per cell and campus;
* ``summary.csv`` and ``summary.md``: mean ± standard deviation over seeds;
* ``privacy_utility.png``, ``<metric>_vs_cutoff.png``, ``campus_<metric>_<ε>.png``,
  with the task's primary metric (``auc`` for the binary tasks, ``macro_f1``
  for ``final_result``);
* ``manifest.json``: config, seeds, git commit and dirty flag (``code``), library versions, data file
  hashes, privacy parameters and accountant.

``edufl experiment report DIR`` rebuilds the tables and plots from the saved
rows alone (no data needed). Each cell's own results folder is kept under
``cells/<cell id>/``.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pandas as pd
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    field_validator,
    model_validator,
)
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from edufl.federation.privacy import ACCOUNTANT
from edufl.federation.runconfig import CampusBy, ConfigError, LocalEpochs, Model, Rounds, RunConfig, Strategy, Task
from edufl.federation.schema import FederationSchema, SchemaError, load_schema, schema_from_text
from edufl.federation.tables import load_tables
from edufl.federation.tomlfile import listed, load_model
from edufl.server.results import METRIC_NAMES, code_version, primary_metric, task_metrics, versions, worst_metric

from .simulate import FOLDERS, Mode, campus_spec, data_provenance, engine, load_campuses, simulate

__all__ = ["KEYS", "NO_DP", "Axis", "Cell", "Epsilon", "Study", "report", "run", "summarise"]

NO_DP = "none"
KEYS = ["campus_by", "cutoff_day", "mode", "strategy", "epsilon"]

# Run settings each cell sets from the study's own keys (or from `edufl experiment run --out`):
# not allowed in `settings`, where the cell's value would silently replace them.
_CELL_SETTINGS = {
    "task": "the study key task",
    "num-rounds": "the study key rounds",
    "local-epochs": "the study key local_epochs",
    "model": "the study key model",
    "campus-by": "the study key campus_by",
    "cutoff-day": "the study key cutoff_days",
    "seed": "the study key seeds",
    "strategy": "the study key strategies",
    "dp": 'the study key epsilons ("none": no DP)',
    "target-epsilon": "the study key epsilons",
    "out": "edufl experiment run --out (each cell's folder is OUT/cells/<cell>)",
    "federation-schema": "the study key schema (a schema file)",
    "server-round": "the coordinator, each round",
}
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


_RUN = RunConfig()  # the study's defaults are the run configuration's
T = TypeVar("T")


def _distinct(values: tuple[T, ...]) -> tuple[T, ...]:
    """Each value of a grid axis once: a repeated value would repeat cells under one cell id."""
    repeated = sorted({repr(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{', '.join(repeated)} listed more than once")
    return values


def _folder_name(value: str) -> str:
    if not _FOLDER_NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a safe folder name (1 to 100 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit); the study's default folder is results/<name>"
        )
    return value


def _epsilon(value: object) -> int | float | str:
    if value == NO_DP or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        return value  # as written: ε 3 stays 3, so that cell ids, rows and file names read "3"
    raise ValueError(f'epsilons holds {value!r}; expected numbers > 0 or "{NO_DP}"')


Axis = Annotated[tuple[T, ...], BeforeValidator(listed), Field(min_length=1), AfterValidator(_distinct)]
"""A grid axis: a non-empty TOML list of distinct values."""
Epsilon = Annotated[int | float | str, PlainValidator(_epsilon)]
"""A target ε as written (a number > 0), or ``"none"``: no DP."""


class Study(BaseModel):
    """A study's grid: the ``[study]`` table of a study config, validated (unknown keys refused, strict types).

    ``epsilons`` holds target ε values and ``"none"`` for no DP; ``settings``
    holds any other run setting (dashed keys, as in ``[tool.flwr.app.config]``),
    e.g. ``settings = {"reproducible-noise" = true}`` (research only: each
    cell's DP noise and batch sampling follow its seed), validated as a run
    configuration. ``ray_address`` (``HOST:PORT`` of a Ray cluster's head) runs the
    federated cells on that cluster instead of a Ray started for the study.
    ``schema`` names a federation schema file (default: OULAD's) that every cell runs under; ``campuses``
    lists campus folders (``NAME=DIR`` or ``NAME=DIR:MAPPING``, as ``edufl simulate --campus``), the study's
    campuses instead of a release's campuses formed by ``campus_by`` (its cells' ``campus_by`` reads
    ``folders``). Paths are relative to the config file's folder. Lists are TOML lists, each value once, none
    empty.

    Raises
    ------
    pydantic.ValidationError
        When built from invalid values (:meth:`load` reports them as ConfigError).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: Annotated[str, AfterValidator(_folder_name)]
    task: Task = _RUN.task
    campus_by: Axis[CampusBy] = (_RUN.campus_by,)
    cutoff_days: Axis[int] = (_RUN.cutoff_day,)
    modes: Axis[Mode] = ("centralized", "local", "federated")
    strategies: Axis[Strategy] = (_RUN.strategy,)
    epsilons: Axis[Epsilon] = (_RUN.target_epsilon,)
    seeds: Axis[Annotated[int, Field(ge=0, lt=2**31)]] = (_RUN.seed,)
    rounds: Rounds = _RUN.num_rounds
    local_epochs: LocalEpochs = _RUN.local_epochs
    model: Model = _RUN.model
    ray_address: str | None = None
    schema_file: str | None = Field(None, alias="schema")
    campuses: Annotated[tuple[str, ...], BeforeValidator(listed), AfterValidator(_distinct)] = ()
    settings: dict[str, Any] = Field(default_factory=dict)

    @field_validator("schema_file")
    @classmethod
    def _schema_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        path = (info.context or {}).get("folder", Path(".")) / Path(value).expanduser()
        try:
            load_schema(path)
        except SchemaError as err:
            raise ValueError(str(err)) from None
        return str(path)

    @field_validator("campuses")
    @classmethod
    def _campus_folders(cls, specs: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if not specs:
            raise ValueError("empty; list the campus folders, or leave the key out to run on --data")
        resolved = []
        for spec in specs:
            name, data, mapping = campus_spec(spec, (info.context or {}).get("folder"))
            resolved.append(f"{name}={data}" + (f":{mapping}" if mapping else ""))
        names = [r.partition("=")[0] for r in resolved]
        if len(set(names)) < len(names):
            raise ValueError(f"campus names given more than once: {sorted({n for n in names if names.count(n) > 1})}")
        return tuple(resolved)

    @cached_property
    def schema(self) -> FederationSchema:  # type: ignore[override]  # BaseModel.schema: pydantic 1's, deprecated
        """The federation schema every cell runs under (OULAD's without the key ``schema``)."""
        return load_schema(self.schema_file)

    @field_validator("settings")
    @classmethod
    def _run_settings(cls, settings: dict[str, Any]) -> dict[str, Any]:
        for key in settings:
            if key in _CELL_SETTINGS:
                raise ValueError(f"{key} is set by {_CELL_SETTINGS[key]}, not in settings")
        try:
            RunConfig.from_flower(settings)  # unknown keys, types and ranges, as a campus checks them
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return settings

    @model_validator(mode="after")
    def _every_cell_runs(self) -> Study:
        if self.campuses and "campus_by" in self.model_fields_set:
            raise ValueError("campuses gives the study's campuses: leave out campus_by, which forms them from one release")
        for cell in self.cells():  # settings that conflict with a cell's own (e.g. central-dp with fedadam)
            try:
                cell.config(Path("."))
            except ConfigError as err:
                raise ValueError(f"cell {cell.id}: {err}") from None
        return self

    @classmethod
    def load(cls, path: str | Path) -> Study:
        """Read a study config (TOML, a ``[study]`` table and nothing else).

        Raises
        ------
        ConfigError
            When the file is missing or not TOML, has no ``[study]`` table, or a
            key is unknown, missing (``name``) or invalid; the message names the
            file and each offending key (e.g. ``study.seeds``).
        """
        return load_model(_StudyFile, path, ConfigError, "study config").study

    def cells(self) -> list[Cell]:
        """Every run of the grid, in a fixed order."""
        out = []
        for campus_by in (FOLDERS,) if self.campuses else self.campus_by:
            for cutoff in self.cutoff_days:
                for mode in self.modes:
                    for strategy in self.strategies if mode == "federated" else ("-",):
                        for eps in self.epsilons:
                            for seed in self.seeds:
                                out.append(Cell(self, campus_by, cutoff, mode, strategy, eps, seed))
        return out


class _StudyFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    study: Study


@dataclass(frozen=True)
class Cell:
    """One run of a study."""

    study: Study
    campus_by: str
    cutoff_day: int
    mode: str
    strategy: str
    epsilon: float | str
    seed: int

    @property
    def id(self) -> str:
        eps = "nodp" if self.epsilon == NO_DP else f"eps{self.epsilon:g}"
        strategy = "" if self.strategy == "-" else f"-{self.strategy}"
        return f"{self.campus_by}-d{self.cutoff_day}-{self.mode}{strategy}-{eps}-s{self.seed}"

    def config(self, cells_dir: Path) -> RunConfig:
        s = self.study
        values = {
            **s.settings,
            **({} if s.schema_file is None else {"federation-schema": s.schema.text()}),
            **({} if self.campus_by == FOLDERS else {"campus-by": self.campus_by}),
            "task": s.task,
            "num-rounds": s.rounds,
            "local-epochs": s.local_epochs,
            "model": s.model,
            "cutoff-day": self.cutoff_day,
            "seed": self.seed,
            "strategy": "fedavg" if self.strategy == "-" else self.strategy,
            "dp": self.epsilon != NO_DP,
            "out": str(cells_dir / self.id),
        }
        if self.epsilon != NO_DP:
            values["target-epsilon"] = float(self.epsilon)
        return RunConfig.from_flower(values)

    def keys(self) -> dict:
        return {
            "cell": self.id,
            "task": self.study.task,
            "campus_by": self.campus_by,
            "cutoff_day": self.cutoff_day,
            "mode": self.mode,
            "strategy": self.strategy,
            "epsilon": str(self.epsilon),
            "seed": self.seed,
        }


def _progress() -> Progress:
    """A progress bar across a study's cells: cells done, time so far and the estimated time left."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )


def run(config_path: Path, out: Path, data_dir: Path | None, ray_address: str | None = None) -> Path:
    """Run every cell of the study in ``config_path`` not yet done in ``out``; then report.

    The cells run on the OULAD release in ``data_dir``, or on the study's ``campuses`` (then ``data_dir`` is
    None), under the study's federation schema. Every federated cell runs on one simulation engine
    (:func:`~experiments.simulate.engine`), started before the first cell when any federated cell is left: its
    workers and the campuses they prepared stay up between cells, with the results of cells run one by one.
    ``ray_address`` (else the study's ``ray_address``) attaches that engine to an existing Ray cluster. A
    progress bar shows the cells done and the estimated time left.

    Raises
    ------
    ConfigError
        When the study gives ``campuses`` and ``data_dir`` is given too, or neither is.
    MappingError, DataError
        When a campus's mapping or data (or the release's tables) fail.
    """
    study = Study.load(config_path)
    if bool(study.campuses) == (data_dir is not None):
        raise ConfigError(f"{config_path}: give the data either as study.campuses or as --data, not both or neither")
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    tables = (
        load_campuses(list(study.campuses), study.schema, what=f"{config_path}: study.campuses")
        if study.campuses
        else load_tables(data_dir, schema=study.schema)
    )
    reference = RunConfig()
    manifest = {
        "config": {
            **study.model_dump(by_alias=True),
            **({"campus_by": [FOLDERS]} if study.campuses else {}),  # as the cells and rows read it
            "file": str(config_path),
        },
        "seeds": list(study.seeds),
        "code": code_version(),
        "versions": versions(),
        **data_provenance(tables),
        "schema": {"name": study.schema.name, "sha256": study.schema.digest, "text": study.schema.text()},
        "privacy": {
            "mechanism": "DP-SGD (per-example clipping, Gaussian noise, Poisson sampling) on each campus",
            "accountant": ACCOUNTANT,
            "delta": study.settings.get("delta", reference.delta),
            "max_grad_norm": study.settings.get("max-grad-norm", reference.max_grad_norm),
            # research only: noise and sampling that follow each cell's seed (see RunConfig.reproducible_noise)
            "reproducible_noise": study.settings.get("reproducible-noise", reference.reproducible_noise),
            "target_epsilons": [e for e in study.epsilons if e != NO_DP],
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    cells = study.cells()
    with ExitStack() as stack:
        if any(c.mode == "federated" and not (cells_dir / c.id / "cell.json").exists() for c in cells):
            # one engine for every federated cell, started before the progress bar's thread
            stack.enter_context(engine(ray_address or study.ray_address))
        progress = stack.enter_context(_progress())
        bar = progress.add_task("study", total=len(cells))
        for i, cell in enumerate(cells, start=1):
            done = cells_dir / cell.id / "cell.json"
            if done.exists():
                progress.console.print(f"[{i}/{len(cells)}] {cell.id}: done before, skipped")
                progress.update(bar, total=progress.tasks[bar].total - 1)  # the ETA counts the cells that run
                continue
            progress.update(bar, description=cell.id)
            progress.console.print(f"[{i}/{len(cells)}] {cell.id}")
            simulate(cell.config(cells_dir), data_dir, cell.mode, tables)
            done.write_text(json.dumps(cell.keys()) + "\n")  # written last: the cell is complete
            progress.advance(bar)
    _collect(cells, cells_dir, out)
    report(out)
    return out


def _collect(cells: list[Cell], cells_dir: Path, out: Path) -> None:
    rows, campus_rows = [], []
    for cell in cells:
        summary = json.loads((cells_dir / cell.id / "summary.json").read_text())
        eps, metrics = summary["privacy"]["epsilon"], task_metrics(cell.study.task, cell.study.schema)
        rows.append(
            {
                **cell.keys(),
                **{m: summary["global"][m] for m in (*metrics, worst_metric(cell.study.task))},
                "epsilon_spent": eps,
                "wall_time_s": summary["wall_time_s"],
            }
        )
        for c in summary["campuses"]:
            campus_rows.append(
                {
                    **cell.keys(),
                    "campus": c["campus"],
                    "n_train": c["n_train"],
                    "n_test": c["n_test"],
                    **{m: c[m] for m in metrics},
                    "epsilon_spent": c["epsilon"],
                }
            )
    pd.DataFrame(rows).to_csv(out / "rows.csv", index=False)
    pd.DataFrame(campus_rows).to_csv(out / "campus_rows.csv", index=False)


def _label(row) -> str:
    return row["mode"] if row["strategy"] == "-" else f"{row['mode']} ({row['strategy']})"


def summarise(rows: pd.DataFrame, task: str, schema: FederationSchema) -> pd.DataFrame:
    """Mean and standard deviation (ddof 1; 0 for one seed) of every metric of ``task`` under ``schema`` over seeds."""
    grouped = rows.groupby(KEYS, sort=False)[[*task_metrics(task, schema), worst_metric(task), "epsilon_spent", "wall_time_s"]]
    table = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=1).fillna(0.0).add_suffix("_std"))
    table["seeds"] = grouped.size()
    return table.reset_index()


def _markdown(table: pd.DataFrame, task: str, schema: FederationSchema) -> str:
    first, *others = task_metrics(task, schema)
    cols = [first, worst_metric(task), *others, "epsilon_spent"]
    head = "| campuses | day | mode | ε target | " + " | ".join(cols) + " | seeds |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for _, r in table.iterrows():
        cells = [f"{r[c + '_mean']:.3f} ± {r[c + '_std']:.3f}" if pd.notna(r[c + "_mean"]) else "—" for c in cols]
        row = [r["campus_by"], r["cutoff_day"], _label(r), r["epsilon"], *cells, r["seeds"]]
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def report(out: Path) -> None:
    """Write ``summary.csv``, ``summary.md`` and the plots of study folder ``out`` from its saved rows."""
    rows = pd.read_csv(out / "rows.csv", dtype={"epsilon": str})
    campus_rows = pd.read_csv(out / "campus_rows.csv", dtype={"epsilon": str})
    # Study folders written before the task was recorded hold withdrawal runs.
    task = rows["task"].iloc[0] if "task" in rows else "withdrawal"
    # The study's federation schema names the outcomes (final_result's metrics); older folders ran under OULAD's.
    manifest = out / "manifest.json"
    saved = json.loads(manifest.read_text()).get("schema") if manifest.exists() else None
    schema = schema_from_text(saved["text"] if saved else "")
    table = summarise(rows, task, schema)
    table.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(_markdown(table, task, schema))
    _plots(table, campus_rows, out, task)
    print(f"study report: {out / 'summary.md'}, {len(rows)} runs")


def _eps_value(eps: str) -> float:
    return math.inf if eps == NO_DP else float(eps)


def _plots(table: pd.DataFrame, campus_rows: pd.DataFrame, out: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    table = table.assign(label=table.apply(_label, axis=1), eps=table["epsilon"].map(_eps_value))
    days = sorted(table["cutoff_day"].unique())
    day = 60 if 60 in days else days[len(days) // 2]
    finite = sorted(e for e in table["eps"].unique() if math.isfinite(e))
    no_dp_x = (max(finite) * 2.5) if finite else 1.0

    key = primary_metric(task)
    name = METRIC_NAMES[key]
    campuses = ", ".join(map(str, table["campus_by"].unique()))
    settings = f"task {task}, campuses by {campuses}, mean ± sd over {table['seeds'].max()} seeds"

    def chance(ax) -> None:  # AUC 0.5: a constant predictor
        if key == "auc":
            ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":", label="chance (AUC 0.5)")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True, layout="constrained")
    at_day = table[table["cutoff_day"] == day]
    for ax, metric, title in ((axes[0], key, f"weighted {name}"), (axes[1], worst_metric(task), f"worst-campus {name}")):
        for label, g in at_day.groupby("label"):
            g = g.sort_values("eps")
            x = [e if math.isfinite(e) else no_dp_x for e in g["eps"]]
            ax.errorbar(x, g[f"{metric}_mean"], yerr=g[f"{metric}_std"], marker="o", capsize=3, label=label)
        chance(ax)
        ax.set_xscale("log")
        ax.set_xticks([*finite, no_dp_x], [f"{e:g}" for e in finite] + ["no DP"])
        ax.minorticks_off()
        ax.set_xlabel("target ε per campus (δ as in manifest)")
        ax.set_title(f"{title}, day {day}")
    axes[0].set_ylabel(f"test {name} (mean ± sd over seeds)")
    axes[0].legend(fontsize="small")
    fig.suptitle(settings, fontsize="medium")
    fig.savefig(out / "privacy_utility.png", dpi=110)
    plt.close(fig)

    eps_values = sorted(table["epsilon"].unique(), key=_eps_value)
    fig, axes = plt.subplots(
        1, len(eps_values), figsize=(4.5 * len(eps_values), 4.4), sharey=True, squeeze=False, layout="constrained"
    )
    for ax, eps in zip(axes[0], eps_values, strict=True):
        for label, g in table[table["epsilon"] == eps].groupby("label"):
            g = g.sort_values("cutoff_day")
            ax.errorbar(g["cutoff_day"], g[f"{key}_mean"], yerr=g[f"{key}_std"], marker="o", capsize=3, label=label)
        chance(ax)
        ax.set_title("no DP" if eps == NO_DP else f"ε = {eps}")
        ax.set_xlabel("cutoff day D")
    axes[0][0].set_ylabel(f"weighted test {name} (mean ± sd over seeds)")
    axes[0][0].legend(fontsize="small")
    fig.suptitle(settings, fontsize="medium")
    fig.savefig(out / f"{key}_vs_cutoff.png", dpi=110)
    plt.close(fig)

    at_day = campus_rows[campus_rows["cutoff_day"] == day].assign(label=lambda d: d.apply(_label, axis=1))
    for eps in eps_values:
        grouped = at_day[at_day["epsilon"] == eps].groupby(["campus", "label"])[key]
        means, sds = grouped.mean().unstack("label"), grouped.std(ddof=1).fillna(0.0).unstack("label")
        ax = means.plot.bar(figsize=(max(6, 0.6 * len(means) + 3), 4.4), rot=0, yerr=sds, capsize=2)
        if key == "auc":
            ax.set_ylim(0.4, max(0.8, float((means + sds).max().max()) + 0.05))
        chance(ax)
        ax.legend(title="mode", fontsize="small")
        ax.set_ylabel(f"test {name} (mean ± sd over seeds)")
        ax.set_title(f"{name} per campus, day {day}, " + ("no DP" if eps == NO_DP else f"ε = {eps}") + f"\n{settings}")
        ax.figure.tight_layout()
        ax.figure.savefig(out / f"campus_{key}_{'nodp' if eps == NO_DP else 'eps' + eps}.png", dpi=110)
        plt.close(ax.figure)
