"""The base of the config models: pydantic errors as (key path, plain English) problems."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError


Loc = tuple[str | int, ...]
Problem = tuple[Loc, str]
ModelT = TypeVar("ModelT", bound=BaseModel)


# --------------------------------------------------------------------------
# Problems: how pydantic errors become (key path, plain English) pairs
# --------------------------------------------------------------------------


def _fail(message: str) -> PydanticCustomError:
    # The message goes through the context: a template would treat the braces
    # of hints such as "{column: memo}" as placeholders.
    return PydanticCustomError("loader", "{message}", {"message": message})


def _problems_error(problems: list[Problem]) -> PydanticCustomError:
    # One error carrying every problem below a model, with paths relative to
    # it; the parent model prefixes its own location. `summary` keeps the
    # error readable for someone who builds a model directly in Python.
    unique = list(dict.fromkeys(problems))
    summary = "; ".join(f"{_dotted(loc) or '(top)'}: {msg}" for loc, msg in unique)
    return PydanticCustomError(
        "loader_problems", "{summary}", {"summary": summary, "problems": unique}
    )


def _dotted(loc: Iterable[str | int]) -> str:
    return ".".join(str(part) for part in loc)


def _choices(expected: str) -> list[str]:
    # pydantic renders Literal choices as "'a', 'b' or 'c'" (or "1").
    parts = re.split(r", | or ", expected)
    return [part.strip().strip("'\"") for part in parts]


def _unknown_key(key: Any, model: type[BaseModel] | None) -> str:
    if model is None:
        return "unknown key"
    names = list(model.model_fields)
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean '{close[0]}'?)"
    return f"unknown key (expected one of: {', '.join(names)})"


def _message(error: Any, model: type[BaseModel] | None) -> str:
    """Plain English for one pydantic error; never repeats the input value."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "missing":
        return "field required"
    if kind == "extra_forbidden":
        return _unknown_key(error["loc"][-1] if error["loc"] else "", model)
    if kind == "literal_error":
        choices = _choices(str(ctx.get("expected", "")))
        if len(choices) == 1:
            return f"must be {choices[0]}"
        return f"must be one of: {', '.join(choices)}"
    if kind == "loader":
        return str(ctx["message"])
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "must be a mapping"
    if kind == "list_type":
        return "must be a list"
    if kind == "string_type":
        return "must be a string"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "must be a whole number"
    if kind in ("float_type", "float_parsing", "decimal_type", "decimal_parsing"):
        return "must be a number"
    if kind == "finite_number":
        return "must be a finite number"
    if kind in ("bool_type", "bool_parsing"):
        return "must be true or false"
    if kind in (
        "date_type",
        "date_parsing",
        "date_from_datetime_parsing",
        "date_from_datetime_inexact",
        "date_future",
        "date_past",
    ):
        return "must be a date (YYYY-MM-DD)"
    bounds = {"greater_than": ("gt", "greater than"), "greater_than_equal": ("ge", "at least"),
              "less_than": ("lt", "less than"), "less_than_equal": ("le", "at most")}
    if kind in bounds:
        key, words = bounds[kind]
        bound = ctx.get(key)
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)  # float fields report 0 as 0.0
        return f"must be {words} {bound}"
    if kind in ("too_short", "string_too_short"):
        return "must not be empty" if ctx.get("min_length") == 1 else error["msg"]
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    message = str(error["msg"]).replace("Input should be", "must be")
    return message[:1].lower() + message[1:]


def _problems_from(exc: ValidationError, model: type[BaseModel] | None) -> list[Problem]:
    """Flatten a ValidationError raised while validating `model`."""
    problems: list[Problem] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        if error["type"] == "loader_problems":
            problems.extend((loc + sub, msg) for sub, msg in error["ctx"]["problems"])
        else:
            # Nested models convert their own errors, so an error that is
            # still raw here belongs to `model` itself (or a plain container).
            owner = model if len(loc) == 1 else None
            problems.append((loc, _message(error, owner)))
    return problems


class _Model(BaseModel):
    """Base of every config model: unknown keys are errors, and every problem
    below the model is collected with its key path."""

    # hide_input_in_errors: a ValidationError from building a model in Python
    # would otherwise print the input, api_key included.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, hide_input_in_errors=True)

    # Fields where an empty string is a mistake (a blank path resolves to the
    # folder itself; a blank column matches nothing).
    non_blank: ClassVar[tuple[str, ...]] = ()

    @field_validator("*", mode="before")
    @classmethod
    def _reject_blank(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name in cls.non_blank and isinstance(value, str) and not value.strip():
            raise _fail("must not be empty")
        return value

    @classmethod
    def _raw_problems(cls, data: Any) -> list[Problem]:
        """Checks on the input as written (which keys are present)."""
        return []

    def _checked(self, context: dict[str, Any]) -> list[Problem]:
        """Checks (and completions) once the fields are valid."""
        return []

    @model_validator(mode="wrap")
    @classmethod
    def _collect_problems(cls, data: Any, handler: Any, info: ValidationInfo) -> Any:
        if isinstance(data, BaseModel):
            return handler(data)
        problems = cls._raw_problems(data)
        if problems and not isinstance(data, dict):
            raise _problems_error(problems)
        try:
            model = handler(data)
        except ValidationError as exc:
            raise _problems_error(problems + _problems_from(exc, cls)) from None
        if problems:
            raise _problems_error(problems)
        problems = model._checked(dict(info.context or {}))
        if problems:
            raise _problems_error(problems)
        return model


def _base_dir(context: dict[str, Any] | None) -> Path:
    base = (context or {}).get("base_dir")
    return Path(base) if base is not None else Path.cwd()


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = _base_dir(info.context) / path
    return path.resolve()


