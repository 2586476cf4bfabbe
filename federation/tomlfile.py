"""Reading a TOML settings file (campus policy, data mapping) into a validated pydantic model."""

from __future__ import annotations

import tomllib
from pathlib import Path

from typing import TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def load_model(model: type[M], path: str | Path, error: type[Exception], what: str) -> M:
    """``model`` validated from the TOML file ``path``.

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
        return model.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in err.errors())
        raise error(f"{path}: {problems}") from None
