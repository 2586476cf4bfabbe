"""``edufl coordinator dashboard RUN_DIR...``: a local, read-only web page of training runs, as their results folders are written.

Each RUN_DIR is a training run's results folder (:mod:`server.results`). A
finished run is read from its ``summary.json``; a run in progress from the
checkpoint the coordinator writes after every round (``checkpoint.pt``,
:mod:`server.checkpoint`), whose report state gives the same rounds, campus
rows and fairness table (:class:`server.results.Report`) as the summary will.
The checkpoint is read when it is newer than the summary (a resumed run), and
a page showing a run not yet finished reloads itself every ``refresh`` seconds.

Pages (Starlette with Jinja2 templates, :mod:`federation.web`): ``/`` lists the
runs, ``/run/N`` shows run N: the round curves (weighted and worst-campus
primary metric, max ε over campuses), the per-campus table, the fairness table,
and the failures and refusals the coordinator recorded. Nothing is written.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from edufl.federation.runconfig import ConfigError
from edufl.federation.schema import schema_from_text

__all__ = ["app", "dashboard", "read_run"]

_TEMPLATES = Path(__file__).resolve().parent / "templates"
SUMMARY, CHECKPOINT_FILE = "summary.json", "checkpoint.pt"


def _finite(value):
    """``value``, or None when it is NaN or infinite (JSON has neither; a page shows an empty cell)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _from_checkpoint(path: Path) -> dict:
    """The run state in the checkpoint ``path``, through the coordinator's own :class:`~server.results.Report`."""
    import torch
    from rich.console import Console

    from edufl.federation.runconfig import RunConfig

    from .results import Report

    saved = torch.load(path, weights_only=True)
    cfg = RunConfig.from_flower(saved["config"])
    report = Report(config=saved["config"], dp=cfg.dp, delta=cfg.delta, console=Console(file=io.StringIO()))
    report.restore(saved["report"])
    return dict(
        config=saved["config"],
        dp=cfg.dp,
        delta=cfg.delta,
        rounds=report.rounds,
        campuses=report.campus_rows(),
        fairness=report.fairness(),
        failures=report.failures,
        status=f"in progress: round {saved['round']} of {cfg.num_rounds} done",
        finished=False,
    )


def _from_summary(path: Path) -> dict:
    summary = json.loads(path.read_text(encoding="utf-8"))
    return dict(
        config=summary["config"],
        dp=summary["privacy"]["dp"],
        delta=summary["privacy"]["delta"],
        rounds=summary["rounds"],
        campuses=summary["campuses"],
        fairness=summary["fairness"]["groups"],
        failures=summary["failures"],
        status=f"finished: {len(summary['rounds'])} of {summary['config']['num-rounds']} rounds",
        finished=True,
    )


def read_run(run_dir: Path) -> dict:
    """What the results folder ``run_dir`` holds now: ``status`` (finished, in progress, or no round yet),
    ``finished``, ``config`` (dashed keys), ``dp``, ``delta``, ``rounds``, ``campuses``, ``fairness`` and
    ``failures`` as in ``summary.json``, and ``primary`` (the task's primary metric), ``metrics`` (its
    reported metrics) and ``chart`` (per round: weighted and worst-campus primary metric, max ε).

    Raises
    ------
    ConfigError
        Naming ``run_dir`` when its ``summary.json`` is not a training run's.
    """
    from .results import METRIC_NAMES, primary_metric, task_metrics, worst_metric

    summary, checkpoint = Path(run_dir) / SUMMARY, Path(run_dir) / CHECKPOINT_FILE
    if checkpoint.is_file() and (not summary.is_file() or checkpoint.stat().st_mtime > summary.stat().st_mtime):
        run = _from_checkpoint(checkpoint)
    elif summary.is_file():
        try:
            run = _from_summary(summary)
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{run_dir}: {SUMMARY} is not a training run's summary (no {err})") from None
    else:
        return dict(
            status="no round finished yet",
            finished=False,
            config={},
            rounds=[],
            last=None,
            name=Path(run_dir).name,
            dir=str(run_dir),
        )
    task = run["config"]["task"]
    key, name = primary_metric(task), METRIC_NAMES[primary_metric(task)]
    rounds = run["rounds"]
    series = [
        dict(label=f"weighted {name}", points=[[r["round"], _finite(r[key])] for r in rounds]),
        dict(label=f"worst-campus {name}", points=[[r["round"], _finite(r[worst_metric(task)])] for r in rounds]),
    ]
    if run["dp"]:
        series.append(dict(label="max ε", axis="y2", points=[[r["round"], _finite(r["epsilon_max"])] for r in rounds]))
    chart = dict(
        time=False,
        xTitle="round",
        yTitle=f"{name} (test)",
        y2Title=f"ε (max over campuses, δ = {run['delta']:g})" if run["dp"] else "",
        series=series,
    )
    clean = [{k: _finite(v) for k, v in row.items()} for row in run["campuses"]]
    return dict(
        run,
        campuses=clean,
        primary=key,
        primary_name=name,
        metrics=task_metrics(task, schema_from_text(str(run["config"].get("federation-schema", "")))),
        chart=chart,
        last=rounds[-1] if rounds else None,
        worst=worst_metric(task),
        name=run["config"].get("run-name") or Path(run_dir).name,
        dir=str(run_dir),
    )


def app(run_dirs: list[Path], refresh: float):
    """The dashboard of the results folders ``run_dirs`` (a Starlette app); unfinished runs reload every ``refresh`` s."""
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from edufl.federation.web import templates, web_app

    pages = templates(_TEMPLATES)

    def index(request: Request) -> Response:
        runs = [read_run(d) for d in run_dirs]
        live = not all(r["finished"] for r in runs)
        return pages.TemplateResponse(request, "runs.html", dict(runs=runs, refresh=refresh if live else None))

    def one(request: Request) -> Response:
        number = request.path_params["number"]
        if not 1 <= number <= len(run_dirs):
            raise HTTPException(404, f"no run {number}: this dashboard shows runs 1 to {len(run_dirs)}")
        run = read_run(run_dirs[number - 1])
        return pages.TemplateResponse(
            request, "run.html", dict(run=run, number=number, refresh=None if run["finished"] else refresh)
        )

    return web_app([Route("/", index), Route("/run/{number:int}", one)])


def dashboard(run_dirs: list[Path], host: str, port: int, allow_remote: bool, refresh: float) -> None:
    """Serve the coordinator dashboard of ``run_dirs`` on ``host``:``port``.

    Raises
    ------
    ConfigError
        Naming ``--refresh`` when it is not positive, or a RUN_DIR that is a file.
    BindError
        When the address may not or cannot be used (:func:`federation.web.listen`).
    """
    from edufl.federation.web import serve

    if not refresh > 0:
        raise ConfigError(f"--refresh {refresh}: expected a positive number of seconds")
    for run_dir in run_dirs:
        if Path(run_dir).exists() and not Path(run_dir).is_dir():
            raise ConfigError(f"RUN_DIR {run_dir}: a file, not a results folder")
        if not Path(run_dir).exists():
            print(f"note: {run_dir} does not exist yet; its page shows it once the run writes it", flush=True)
    serve(app(list(run_dirs), refresh), f"coordinator dashboard of {len(run_dirs)} run(s)", host, port, allow_remote)
