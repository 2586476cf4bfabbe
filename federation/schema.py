"""The federation schema: what a federation's campuses agree on before any of them joins.

The learner-record contract (:mod:`federation.contract`) fixes the tables and their fields. What it leaves
to each federation, a federation schema fixes, in one TOML file that the coordinator publishes and every
campus reads and validates its own data against (``edufl campus validate --schema FILE``) before joining:

* the vocabulary of each categorical field (``[vocabularies]``: regions, qualifications, age bands,
  activity types, ...); a field without one takes no value, so a campus holding one is refused;
* the outcomes a registration may end with, in class order, and what each means to the tasks
  (``outcomes = { Graduate = "passed", Dropout = "withdrawn" }``: ``passed``, ``failed`` or ``withdrawn``), and the
  label of a registration still under way (``studying``), which no task takes as an example;
* extra attributes of each registration (``[attributes.NAME]``, read by module ``attributes``: admission grade,
  scholarship, ...): a ``number`` valid in ``[low, high]`` and scaled to [0, 1] by those bounds, or a ``category``
  of its ``vocabulary``, one-hot encoded;
* other scaling bounds for the contract's numeric features (``[scaling]``, e.g. ``studied_credits = [0, 240]``);
* the optional modules whose data the tasks may use (``modules``; all of them by default);
* which presentations split ``temporal`` trains on and tests on (``[temporal_split]``, optional: ``train`` and
  ``test``, each a glob pattern the whole presentation code matches, e.g. ``train = "2013*"``); a run
  with split ``temporal`` needs it.

Every encoding and scaling is fixed here, never fitted on any campus's data, so every campus builds the same
feature columns. OULAD's schema (``federation/schemas/oulad.toml``) is the default. The run configuration
carries the schema (:meth:`FederationSchema.text`) to every campus, which checks its data against it before
training or answering.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from .contract import (
    ATTRIBUTES,
    ATTRIBUTES_MODULE,
    CONTRACT_VERSION,
    NUMERIC_FEATURES,
    OPTIONAL_MODULES,
    TABLES,
    Column,
    Table,
    parse_version,
    supports,
    version_text,
)
from .errors import UserError
from .tomlfile import listed, load_model

__all__ = [
    "MAX_VOCABULARY",
    "OULAD_SCHEMA",
    "VOCABULARY_FIELDS",
    "Attribute",
    "FederationSchema",
    "Meaning",
    "SchemaError",
    "TemporalSplit",
    "load_schema",
    "schema_from_text",
]

OULAD_SCHEMA = Path(__file__).parent / "schemas" / "oulad.toml"
MAX_VOCABULARY = 1000
"""Most values one vocabulary may hold (each is a feature column and a group of statistics)."""
_MAX_ATTRIBUTES = 100
VOCABULARY_FIELDS = tuple(c.name for t in TABLES for c in t.columns if c.kind == "cat" and c.name != "final_result")
"""The contract's categorical fields whose values a schema's ``[vocabularies]`` declare (``final_result``'s come
from ``outcomes`` and ``studying``)."""
Meaning = Literal["passed", "failed", "withdrawn"]
_Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
_Label = Annotated[str, Field(min_length=1, max_length=200)]
_Vocabulary = Annotated[tuple[_Label, ...], BeforeValidator(listed), Field(max_length=MAX_VOCABULARY)]


class SchemaError(UserError):
    """A federation schema that cannot be used; the message names the file (or the run) and the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _unique(values: tuple[str, ...], where: str) -> None:
    repeated = sorted(v for v, n in Counter(values).items() if n > 1)
    if repeated:
        raise ValueError(f"{where}: {', '.join(map(repr, repeated))} repeated; expected each value once")


class Attribute(_Strict):
    """An extra attribute of a registration (module ``attributes``): a ``number`` valid in [``low``, ``high``] and
    scaled to [0, 1] by them, or a ``category`` of ``vocabulary``. Every attribute may be missing."""

    kind: Literal["number", "category"]
    low: float | None = None
    high: float | None = None
    vocabulary: _Vocabulary = ()
    description: str = Field("", max_length=1000)

    @model_validator(mode="after")
    def _fits(self) -> Attribute:
        if self.kind == "number":
            if self.vocabulary:
                raise ValueError('a number has no vocabulary (give kind = "category" for labels)')
            if self.low is None or self.high is None or not (math.isfinite(self.low) and math.isfinite(self.high)):
                raise ValueError("a number needs finite bounds low and high (its valid range, also its scaling)")
            if self.low >= self.high:
                raise ValueError(f"low {self.low:g} must be below high {self.high:g}")
        else:
            if self.low is not None or self.high is not None:
                raise ValueError('a category has no low or high (give kind = "number" for a number)')
            if not self.vocabulary:
                raise ValueError('a category needs its vocabulary (e.g. vocabulary = ["no", "yes"])')
            _unique(self.vocabulary, "vocabulary")
        return self

    def column(self, name: str) -> Column:
        """The attribute as a contract column of table ``attributes``."""
        if self.kind == "number":
            return Column(name, "float", nullable=True, low=self.low, high=self.high)
        return Column(name, "cat", nullable=True, vocab=self.vocabulary)


_Pattern = Annotated[str, Field(min_length=1, max_length=200)]


class TemporalSplit(_Strict):
    """Which presentations split ``temporal`` trains on (``train``) and tests on (``test``): each a glob pattern
    (``*``, ``?``, ``[...]``; :func:`fnmatch.fnmatchcase`) that the whole presentation code must match. Globs,
    not regular expressions: a pattern the coordinator sends cannot make a campus backtrack for hours. A
    presentation matching neither is in neither part; one matching both is refused when the split meets it
    (:func:`federation.tasks.split`)."""

    train: _Pattern
    test: _Pattern


class FederationSchema(_Strict):
    """A federation schema, validated (keys as in the module docstring).

    Raises pydantic's ValidationError on a malformed schema; :func:`load_schema` and :func:`schema_from_text`
    turn it into a :class:`SchemaError` naming the key."""

    name: _Name
    description: str = Field("", max_length=1000)
    contract_version: str
    vocabularies: dict[str, _Vocabulary] = {}
    outcomes: dict[_Label, Meaning] = Field(min_length=2, max_length=50)
    studying: _Label | None = None
    attributes: dict[_Name, Attribute] = Field(default_factory=dict, max_length=_MAX_ATTRIBUTES)
    scaling: dict[str, Annotated[tuple[float, float], BeforeValidator(listed)]] = {}
    modules: Annotated[tuple[str, ...], BeforeValidator(listed)] = OPTIONAL_MODULES
    temporal_split: TemporalSplit | None = None

    @model_validator(mode="after")
    def _fits(self) -> FederationSchema:
        problems = []
        version = parse_version(self.contract_version)
        if not supports(CONTRACT_VERSION, version):
            problems.append(
                f"contract_version: this edufl reads learner-record contract {version_text(CONTRACT_VERSION)}; "
                f"the schema was written for {self.contract_version}"
            )
        unknown = sorted(set(self.vocabularies) - set(VOCABULARY_FIELDS))
        if unknown:
            problems.append(
                f"vocabularies: {', '.join(unknown)} not a categorical contract field (expected {', '.join(VOCABULARY_FIELDS)})"
            )
        for name, values in self.vocabularies.items():
            try:
                _unique(values, f"vocabularies.{name}")
            except ValueError as err:
                problems.append(str(err))
        if self.studying is not None and self.studying in self.outcomes:
            problems.append(f"studying: {self.studying!r} is also an outcome; a registration under way has not ended")
        contract_fields = {c.name for t in TABLES for c in t.columns}
        clash = sorted(set(self.attributes) & contract_fields)
        if clash:
            problems.append(f"attributes: {', '.join(clash)} already a contract field; give the attribute another name")
        for name, (low, high) in self.scaling.items():
            if name not in NUMERIC_FEATURES:
                problems.append(f"scaling.{name}: not a numeric feature (expected one of {', '.join(NUMERIC_FEATURES)})")
            elif not (math.isfinite(low) and math.isfinite(high) and low < high):
                problems.append(f"scaling.{name}: [{low:g}, {high:g}] must be finite bounds, low below high")
        unknown = sorted(set(self.modules) - set(OPTIONAL_MODULES))
        if unknown:
            problems.append(
                f"modules: {', '.join(unknown)} not an optional contract module (expected {', '.join(OPTIONAL_MODULES)})"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def vocabulary(self, field: str) -> tuple[str, ...]:
        """The values categorical contract field ``field`` may take (none where the schema declares none);
        for ``final_result``: the outcomes, then the studying label."""
        if field == "final_result":
            return (*self.outcomes, *((self.studying,) if self.studying else ()))
        return self.vocabularies.get(field, ())

    def labels(self, *meanings: Meaning) -> tuple[str, ...]:
        """The outcomes that mean one of ``meanings``, in class order."""
        return tuple(label for label, meaning in self.outcomes.items() if meaning in meanings)

    def table(self, table: Table) -> Table:
        """Contract ``table`` under this schema: each categorical column with its vocabulary, and table
        ``attributes`` with a column for each declared attribute."""
        columns = tuple(Column(**{**vars(c), "vocab": self.vocabulary(c.name)}) if c.kind == "cat" else c for c in table.columns)
        if table.name == ATTRIBUTES.name:
            columns += tuple(a.column(name) for name, a in self.attributes.items())
        return Table(table.name, table.message, columns, table.key, table.module)

    def numeric_bounds(self) -> dict[str, tuple[float, float]]:
        """Each numeric feature's scaling bounds (the contract's, or this schema's ``scaling``), then each number
        attribute's ``[low, high]``."""
        numbers = {
            n: (float(a.low), float(a.high)) for n, a in self.attributes.items() if a.low is not None and a.high is not None
        }
        return {**{n: self.scaling.get(n, b) for n, b in NUMERIC_FEATURES.items()}, **numbers}

    def text(self) -> str:
        """The schema as compact JSON: the form the run configuration carries (:func:`schema_from_text` reads it).
        A schema without ``[temporal_split]`` leaves the key out, so its text and :attr:`digest` (which campus
        policies approve) are those it had before the table existed."""
        return self.model_dump_json(exclude={"temporal_split"} if self.temporal_split is None else None)

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of :meth:`text`: the schema's identity in a campus's audit and the run's summary."""
        return hashlib.sha256(self.text().encode()).hexdigest()

    @property
    def uses_attributes(self) -> bool:
        return ATTRIBUTES_MODULE in self.modules and bool(self.attributes)


def load_schema(path: str | os.PathLike[str] | None = None) -> FederationSchema:
    """The federation schema in the TOML file ``path`` (OULAD's, :data:`OULAD_SCHEMA`, when None).

    Raises
    ------
    SchemaError
        When the file is missing or not TOML, a key is unknown or invalid, or the schema's contract version is
        not one this edufl reads; the message names the file and each offending key.
    """
    return load_model(FederationSchema, path, SchemaError, "federation schema") if path else _oulad()


@lru_cache(maxsize=8)
def schema_from_text(text: str) -> FederationSchema:
    """The federation schema a run configuration carries (:meth:`FederationSchema.text`; OULAD's when ``text`` is
    empty).

    Raises
    ------
    SchemaError
        When ``text`` is not a valid schema (a campus refuses such a run)."""
    if not text:
        return load_schema()
    try:
        return FederationSchema.model_validate_json(text, strict=False)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'schema'}: {e['msg']}" for e in err.errors())
        raise SchemaError(f"the run's federation schema cannot be used: {problems}") from None


@lru_cache(maxsize=1)
def _oulad() -> FederationSchema:
    return load_model(FederationSchema, OULAD_SCHEMA, SchemaError, "federation schema")
