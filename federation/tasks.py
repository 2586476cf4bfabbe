"""Learning tasks: turning one campus's tables into a labelled feature matrix, and splitting it.

Tasks ``withdrawal`` and ``at_risk`` (early warning at day D): will this
registration end in an outcome that means "withdrawn" (``withdrawal``), or "failed" or
"withdrawn" (``at_risk``), as the federation schema's ``outcomes`` say (OULAD: Withdrawn; Fail or
Withdrawn)? Task ``term1_dropout`` (module terms): will it end withdrawn, from what the
first term's units and grade say (with the core, and any module's data before D)? Registrations still
under way (the schema's ``studying`` outcome) are no task's examples. Task ``final_result``: which of the
schema's outcomes (OULAD: Distinction, Fail, Pass, Withdrawn) will it end with? The population is every
registration made before day D and not unregistered before day D; features use
only information dated before D: submissions, assessments due, and clicks
(module engagement; :mod:`federation.engagement`), and the registration's attributes (module attributes).
Encodings and scaling are fixed by the contract and the federation schema (:mod:`federation.schema`), so
every campus produces the same columns in the same order without seeing any other campus's data.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np
import pandas as pd

from .contract import ASSESSMENTS_MODULE, ATTRIBUTES, ATTRIBUTES_MODULE, CATEGORICAL_FEATURES, ENGAGEMENT, TERMS_MODULE
from .engagement import engagement_feature_bounds, engagement_features
from .metrics import SUBGROUPS
from .runconfig import SPLITS, TASKS
from .schema import FederationSchema, Meaning, SchemaError
from .tables import Tables

__all__ = [
    "ASSESSMENT_FEATURES",
    "MISSING_SLOT",
    "MULTICLASS",
    "POSITIVE",
    "TASK_MODULES",
    "TERM_FEATURES",
    "TaskData",
    "classes",
    "early_warning",
    "feature_names",
    "missing_modules",
    "n_outputs",
    "split",
]

MISSING_SLOT = "<missing>"
ASSESSMENT_FEATURES = (
    "n_assessments_due",
    "n_submitted",
    "submitted_fraction_of_due",
    "n_late",
    "n_missing_due",
    "mean_score",
    "weighted_score",
    "no_score_yet",
    "n_banked",
)
"""The numeric features from module assessments (assessments due and submitted before D), in order."""
TERM_FEATURES = ("term1_units_enrolled", "term1_units_approved", "term1_approved_share", "term1_grade", "terms_absent")
"""The numeric features from module terms (task ``term1_dropout`` only): the registration's first term's units
enrolled in and approved, the share approved, the mean grade over the scale's maximum; and the absent flag."""
# Binary tasks: what the outcomes that make an example positive mean (the federation schema says which outcomes do).
POSITIVE: dict[str, tuple[Meaning, ...]] = {
    "withdrawal": ("withdrawn",),
    "at_risk": ("failed", "withdrawn"),
    "term1_dropout": ("withdrawn",),
}
TASK_MODULES = {"term1_dropout": frozenset({TERMS_MODULE})}
"""The optional contract modules a task cannot do without (a campus lacking one refuses the task)."""
MULTICLASS = ("final_result",)
"""The tasks whose classes are the federation schema's outcomes, in its order (:func:`classes`)."""


def missing_modules(task: str, provided: frozenset[str], schema: FederationSchema) -> str:
    """Why a campus whose mapping provides the modules ``provided`` cannot take part in ``task`` under ``schema``
    (whose ``modules`` are those tasks may use) ("" if it can)."""
    needed = TASK_MODULES.get(task, frozenset())
    barred = sorted(needed - set(schema.modules))
    if barred:
        return f"task {task} needs module {', '.join(barred)}, and federation schema {schema.name!r} lets no task use it"
    absent = sorted(needed - provided)
    if not absent:
        return ""
    return (
        f"task {task} needs module {', '.join(absent)}, and this campus's mapping provides "
        f"{', '.join(sorted(provided)) or 'the core tables only'}"
    )


def classes(task: str, schema: FederationSchema) -> tuple[str, ...]:
    """The outcomes a multiclass ``task`` predicts, in the order of the model's outputs (empty for a binary task)."""
    return tuple(schema.outcomes) if task in MULTICLASS else ()


def n_outputs(task: str, schema: FederationSchema) -> int:
    """The number of logits a model for ``task`` outputs: 1 for a binary task, one per class otherwise."""
    return len(classes(task, schema)) or 1


def _categories(schema: FederationSchema) -> dict[str, tuple[str, ...]]:
    """The one-hot encoded fields and their vocabularies: the learner's, then the schema's category attributes."""
    learner = {c: schema.vocabulary(c) for c in CATEGORICAL_FEATURES}
    return learner | {n: a.vocabulary for n, a in schema.attributes.items() if a.kind == "category"}


def feature_names(schema: FederationSchema) -> list[str]:
    """Column names of the feature matrix under ``schema``, in order (the same on every campus): one-hot categories
    (``field=value`` and ``field=<missing>``; the schema's category attributes after the learner's fields), numbers
    (the contract's, then the schema's number attributes), a ``NAME=<missing>`` flag for each number attribute and
    ``attributes_absent`` (only when the schema declares attributes), then the engagement features
    (:func:`~federation.engagement.engagement_feature_bounds`). Every model's input width is its length."""
    categories = [f"{col}={v}" for col, vocab in _categories(schema).items() for v in (*vocab, MISSING_SLOT)]
    flags = [f"{n}={MISSING_SLOT}" for n, a in schema.attributes.items() if a.kind == "number"]
    flags += ["attributes_absent"] if schema.attributes else []
    engagement = list(engagement_feature_bounds(schema.vocabulary("activity_type")))
    return categories + list(schema.numeric_bounds()) + flags + engagement


@dataclass
class TaskData:
    """A campus's examples for one task.

    ``x`` is float32 of shape (n, len(feature_names(schema))) (the federation schema of its tables) with values in [0, 1];
    ``y`` is float32 of shape (n,): 1 = positive class for a binary task, the
    class's index in :func:`classes` for a multiclass task; ``rows`` holds,
    one row per example, the registration keys (course, presentation,
    student_id) and the subgroup attributes of :data:`~federation.metrics.SUBGROUPS`
    (gender, age_band, disability, imd_band; None where missing).
    """

    x: np.ndarray
    y: np.ndarray
    rows: pd.DataFrame

    def take(self, index: np.ndarray) -> TaskData:
        return TaskData(self.x[index], self.y[index], self.rows.iloc[index].reset_index(drop=True))

    @classmethod
    def concat(cls, parts: list[TaskData]) -> TaskData:
        """All rows of ``parts``, in order."""
        return cls(
            np.concatenate([p.x for p in parts]),
            np.concatenate([p.y for p in parts]),
            pd.concat([p.rows for p in parts], ignore_index=True),
        )

    def __len__(self) -> int:
        return len(self.y)


def _first_term(tables: Tables, population: pd.DataFrame, task: str, usable: bool) -> pd.DataFrame:
    """:data:`TERM_FEATURES` of each ``population`` row: its term-1 row of module terms for task
    ``term1_dropout``; all 0 for other tasks (a term's results are not dated, so no early-warning task at day D
    may use them), the absent flag 1 where the campus has no module terms."""
    key = ["course", "presentation", "student_id"]
    out = population[key].copy()
    for col in TERM_FEATURES:
        out[col] = 0.0
    if not usable:
        out["terms_absent"] = 1.0
        return out
    if task != "term1_dropout":
        return out
    terms = tables["terms"]
    first = out[key].merge(terms[terms["term"] == 1].drop(columns="_line", errors="ignore"), on=key, how="left")
    enrolled, approved = first["units_enrolled"].astype(float), first["units_approved"].astype(float)
    out["term1_units_enrolled"] = enrolled.fillna(0.0).to_numpy()
    out["term1_units_approved"] = approved.fillna(0.0).to_numpy()
    out["term1_approved_share"] = (approved / enrolled.where(enrolled > 0)).fillna(0.0).to_numpy()
    out["term1_grade"] = (first["grade"].astype(float) / first["grade_max"].astype(float)).fillna(0.0).clip(0, 1).to_numpy()
    return out


def _assessment_behaviour(tables: Tables, population: pd.DataFrame, cutoff_day: int, usable: bool) -> pd.DataFrame:
    mp = ["course", "presentation"]
    key = [*mp, "student_id"]
    if not usable:  # module assessments not provided (or not for tasks): its features 0, the absent flag 1
        out = population[key].copy()
        for col in ASSESSMENT_FEATURES:
            out[col] = 0.0
        out["assessments_absent"] = 1.0
        return out
    assess = tables["assessments"][[*mp, "assessment_id", "due_day", "weight"]]
    due = assess[assess["due_day"].notna() & (assess["due_day"] < cutoff_day)]
    n_due = due.groupby(mp).size().rename("n_assessments_due").reset_index()

    subs = tables["submissions"]
    subs = subs[subs["submission_day"] < cutoff_day].merge(assess, on="assessment_id")
    subs = subs.merge(population[key], on=key)
    subs["late"] = subs["due_day"].notna() & (subs["submission_day"] > subs["due_day"])
    subs["due_before_cutoff"] = subs["due_day"].notna() & (subs["due_day"] < cutoff_day)
    scored = subs[subs["score"].notna()].assign(ws=lambda d: d["weight"] * d["score"])
    per = subs.groupby(key).agg(
        n_submitted=("assessment_id", "size"),
        n_banked=("banked", "sum"),
        n_late=("late", "sum"),
        n_due_submitted=("due_before_cutoff", "sum"),
    )
    score = scored.groupby(key).agg(mean_score=("score", "mean"), ws=("ws", "sum"), w=("weight", "sum"))
    out = population[key].merge(n_due, on=mp, how="left").merge(per.reset_index(), on=key, how="left")
    out = out.merge(score.reset_index(), on=key, how="left")
    counts = ["n_assessments_due", "n_submitted", "n_banked", "n_late", "n_due_submitted"]
    out[counts] = out[counts].fillna(0).astype(float)
    out["n_missing_due"] = out["n_assessments_due"] - out["n_due_submitted"]
    out["submitted_fraction_of_due"] = np.where(
        out["n_assessments_due"] > 0, out["n_due_submitted"] / out["n_assessments_due"].clip(lower=1), 0.0
    )
    out["no_score_yet"] = out["mean_score"].isna().astype(float)
    weighted = out["ws"] / out["w"].where(out["w"] > 0)
    out["weighted_score"] = weighted.fillna(out["mean_score"]).fillna(0.0)
    out["mean_score"] = out["mean_score"].fillna(0.0)
    out["assessments_absent"] = 0.0
    return out


def early_warning(tables: Tables, cutoff_day: int, task: str = "withdrawal") -> TaskData:
    """Examples for early warning at day ``cutoff_day`` (D): task ``withdrawal``, ``at_risk``, ``final_result``
    or ``term1_dropout`` (module terms: :data:`TERM_FEATURES` from the first term).

    Population: registrations with ``registration_day < D`` (or unknown) and
    no ``unregistration_day < D``. Label: ``final_result`` is an outcome whose meaning is in
    ``POSITIVE[task]`` ("withdrawn"; "failed" or "withdrawn" for ``at_risk``) under ``tables.schema``;
    for ``final_result``, the index of ``final_result`` among the schema's outcomes.
    Neither ``final_result`` nor ``unregistration_day`` enters a feature, and
    only submissions with ``submission_day < D``, assessments due before D and
    events with ``day < D`` count. Registrations still under way (the schema's ``studying``) are left out; the
    data of a module the schema's ``modules`` leave out count as absent.

    Raises
    ------
    ValueError
        For a task not in :data:`TASKS`, or one needing a module ``tables`` lack (:func:`missing_modules`).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    schema = tables.schema
    if why := missing_modules(task, tables.modules, schema):
        raise ValueError(why)
    usable = tables.modules & set(schema.modules)  # the modules the schema lets tasks use
    key = ["course", "presentation", "student_id"]
    info = tables["learners"].merge(tables["registrations"].drop(columns="_line"), on=key)
    reg, unreg = info["registration_day"], info["unregistration_day"]
    keep = (reg.isna() | (reg < cutoff_day)).to_numpy(bool) & (unreg.isna() | (unreg >= cutoff_day)).to_numpy(bool)
    keep &= info["final_result"].isin(list(schema.outcomes)).to_numpy(bool)  # still under way: how it ends is not known
    population = info[keep].sort_values(key).reset_index(drop=True)
    behaviour = _assessment_behaviour(tables, population, cutoff_day, ASSESSMENTS_MODULE in usable).merge(
        _first_term(tables, population, task, TERMS_MODULE in usable), on=key, how="left"
    )
    attributes = _attributes(tables, population, ATTRIBUTES_MODULE in usable)

    numeric = pd.DataFrame(
        {
            "prev_attempts": population["prev_attempts"].astype(float).fillna(0.0),
            "studied_credits": population["studied_credits"].astype(float).fillna(0.0),
            "registration_day": population["registration_day"].astype(float).fillna(0.0),
            "registration_missing": population["registration_day"].isna().astype(float),
        }
    )
    bounds = schema.numeric_bounds()
    for col in bounds:
        if col not in numeric:
            numeric[col] = (attributes if col in schema.attributes else behaviour)[col].astype(float).fillna(0.0).to_numpy()
    columns = []
    for col, vocab in _categories(schema).items():
        values = (attributes if col in schema.attributes else population)[col].fillna(MISSING_SLOT).to_numpy(object)
        columns += [(values == v).astype(np.float32) for v in (*vocab, MISSING_SLOT)]
    for col, (low, high) in bounds.items():
        columns.append(((numeric[col].to_numpy(float).clip(low, high) - low) / (high - low)).astype(np.float32))
    for col in (n for n, a in schema.attributes.items() if a.kind == "number"):
        columns.append(attributes[col].isna().to_numpy(np.float32))
    if schema.attributes:
        columns.append(np.full(len(population), float(ATTRIBUTES_MODULE not in usable), np.float32))
    frames = (
        tables.frames if ENGAGEMENT in usable else {k: v for k, v in tables.frames.items() if k not in ("resources", "events")}
    )
    engagement = engagement_features(frames, population, cutoff_day, schema.vocabulary("activity_type"))
    x = np.concatenate([np.stack(columns, axis=1).reshape(len(population), -1), engagement], axis=1)
    y: np.ndarray
    if task in MULTICLASS:
        y = population["final_result"].map({c: i for i, c in enumerate(classes(task, schema))}).to_numpy(np.float32)
    else:
        y = population["final_result"].isin(schema.labels(*POSITIVE[task])).to_numpy(np.float32)
    return TaskData(x, y, population[[*key, *SUBGROUPS]])


def _attributes(tables: Tables, population: pd.DataFrame, usable: bool) -> pd.DataFrame:
    """The schema's attributes of each ``population`` row (NaN where unknown, everywhere when not ``usable``)."""
    key = list(ATTRIBUTES.key)
    if usable and "attributes" in tables:
        return population[key].merge(tables["attributes"].drop(columns="_line", errors="ignore"), on=key, how="left")
    return population[key].assign(**{name: np.nan for name in tables.schema.attributes})


def split(
    data: TaskData, kind: str, test_fraction: float, seed: int, schema: FederationSchema | None = None
) -> tuple[TaskData, TaskData]:
    """Split a campus's examples into (train, test); the test part never leaves the campus.

    ``stratified``: a seeded split keeping each class's share (the positive
    rate; the four final results) in both parts (falls back to a seeded random
    split when a class present has fewer than 2 rows).
    ``temporal``: train on the presentations ``schema``'s ``temporal_split.train`` matches, test on those its
    ``temporal_split.test`` matches (:class:`~federation.schema.TemporalSplit`); the rows of a presentation
    matching neither are in neither part, and either part may come out empty.

    Raises
    ------
    SchemaError
        Split ``temporal``: when a presentation matches both patterns; the message names the schema and each
        such presentation.
    ValueError
        For an unknown ``kind``, or ``temporal`` without a ``schema`` declaring ``[temporal_split]``.
    """
    if kind == "temporal":
        return _temporal_split(data, schema)
    if kind != "stratified":
        raise ValueError(f"unknown split {kind!r}; expected one of {', '.join(SPLITS)}")
    rng = np.random.default_rng(seed)
    test = []
    classes = [np.flatnonzero(data.y == c) for c in np.unique(data.y)]
    if min((len(c) for c in classes), default=0) < 2:
        classes = [np.arange(len(data))]
    for members in classes:
        members = rng.permutation(members)
        test.append(members[: int(round(test_fraction * len(members)))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(data)), test_idx)
    return data.take(train_idx), data.take(test_idx)


def _temporal_split(data: TaskData, schema: FederationSchema | None) -> tuple[TaskData, TaskData]:
    rule = schema.temporal_split if schema is not None else None
    if schema is None or rule is None:
        named = f"federation schema {schema.name!r} declares none" if schema else "no federation schema was given"
        raise ValueError(f"split temporal follows the federation schema's [temporal_split]; {named}")
    codes = data.rows["presentation"].astype(str)
    train, test = (np.isin(codes, [c for c in codes.unique() if fnmatchcase(c, p)]) for p in (rule.train, rule.test))
    both = sorted(set(codes[train & test]))
    if both:
        raise SchemaError(
            f"federation schema {schema.name!r}: presentation(s) {', '.join(map(repr, both))} match both "
            f"temporal_split.train {rule.train!r} and temporal_split.test {rule.test!r}; expected each presentation "
            "in one part at most"
        )
    return data.take(np.flatnonzero(train)), data.take(np.flatnonzero(test))
