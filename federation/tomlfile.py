"""Reading a TOML settings file (campus policy, data mapping, study config) into a validated pydantic model."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

__all__ = ["listed", "load_model"]

M = TypeVar("M", bound=BaseModel)


def listed(value: object) -> object:
    """A TOML list as a tuple: the ``BeforeValidator`` of a strict model's tuple field (strict mode takes
    no list for a tuple, and no single value for a list of them); a tuple is returned as it is.

    Raises
    ------
    ValueError
        For anything but a list or tuple, showing the list that was likely meant
        (``expected a list, e.g. [5], not 5``).
    """
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, tuple):
        return value
    example = json.dumps(value) if isinstance(value, (int, float, str)) else "..."
    raise ValueError(f"expected a list, e.g. [{example}], not {value!r}")


def load_model(model: type[M], path: str | os.PathLike[str], error: type[Exception], what: str) -> M:
    """``model`` validated from the TOML file ``path``; its validators find the file's folder as the validation
    context's ``folder`` (relative paths in the file are relative to it).

    Raises
    ------
    error
        When the file is missing or not TOML, or a key is unknown or invalid; the
        message names the file (as ``what``) and each offending key.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not a TOML file ({err})") from None
    try:
        return model.model_validate(raw, context={"folder": path.parent})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in err.errors())
        raise error(f"{path}: {problems}") from None
