"""pipeline.yaml -> a typed `Pipeline`.

Reading a pipeline goes: YAML (safe, with a cap on alias expansion) ->
`${NAME}` interpolation -> pydantic validation. Every problem found on the way
is collected and raised as one `ConfigError` whose problems carry the dotted
path of the key in the YAML (`mapping.amount.unit`, `target.streams.0.key`).

Relative paths (`source.path`, `dedupe.cache`, `target.database`,
`report.dir`) resolve against the folder of the YAML file (or the `base_dir`
given to `parse_pipeline`/`parse_section`, else the current directory), `~`
expands to the home folder, and all are stored as absolute `Path`s.
"""

from __future__ import annotations

import datetime as dt
import difflib
import glob
import hashlib
import os
import re
from collections.abc import Iterable
from collections.abc import Mapping as _Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args
from urllib.parse import urlsplit

import iso4217
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from loader.errors import ConfigError

__all__ = [
    "AmountSpec",
    "CsvOptions",
    "CurrencySpec",
    "DateRange",
    "DateSpec",
    "DedupeConfig",
    "DirectionSpec",
    "FailOnConfig",
    "FieldSpec",
    "MappingConfig",
    "MetadataSpec",
    "Pipeline",
    "RECORD_FIELDS",
    "ReportConfig",
    "SourceConfig",
    "StreamConfig",
    "StreamKeySpec",
    "TargetConfig",
    "TextSpec",
    "TransformConfig",
    "ValidationConfig",
    "load_pipeline",
    "parse_pipeline",
    "parse_section",
    "parse_var_assignments",
]

Loc = tuple[str | int, ...]
Problem = tuple[Loc, str]
ModelT = TypeVar("ModelT", bound=BaseModel)

RecordField = Literal[
    "date",
    "data_stream_key",
    "amount",
    "currency",
    "direction",
    "description",
    "external_id",
    "metadata",
]
RECORD_FIELDS: tuple[str, ...] = get_args(RecordField)  # the record contract's fields, in its order

# A real pipeline.yaml has a few hundred values; this leaves ample room while
# refusing alias bombs long before they cost memory or time.
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 100


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


# --------------------------------------------------------------------------
# source
# --------------------------------------------------------------------------

_FORMAT_BY_SUFFIX = {
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
    ".json": "json",
}
_COMPRESSION_SUFFIXES = (".gz", ".zst")
SourceFormat = Literal["csv", "parquet", "ndjson", "json"]


def _infer_format(name: str) -> tuple[str, bool] | None:
    """(format, is_tab_separated) from a file name, or None."""
    lowered = name.lower()
    compressed = lowered.endswith(_COMPRESSION_SUFFIXES)
    if compressed:
        lowered = os.path.splitext(lowered)[0]
    suffix = os.path.splitext(lowered)[1]
    fmt = _FORMAT_BY_SUFFIX.get(suffix)
    if fmt is None or (compressed and fmt == "parquet"):
        return None
    return fmt, suffix == ".tsv"


class CsvOptions(_Model):
    """Reader options for csv sources."""

    separator: str = ","
    has_header: bool = True
    encoding: Literal["utf8", "utf8-lossy", "latin1"] = "utf8"
    quote_char: str = '"'
    skip_rows: int = Field(0, ge=0)
    null_values: list[str] = Field(default_factory=list)

    @field_validator("separator", "quote_char", mode="before")
    @classmethod
    def _one_character(cls, value: Any) -> Any:
        # '\t' in single quotes reaches us as backslash + t; a two-character
        # separator is impossible, so reading it as a tab is unambiguous.
        if value == "\\t":
            return "\t"
        if isinstance(value, str) and len(value) != 1:
            raise _fail('must be exactly one character (write "\\t" for a tab)')
        return value

    @field_validator("encoding", mode="before")
    @classmethod
    def _encoding_alias(cls, value: Any) -> Any:
        aliases = {"utf-8": "utf8", "utf-8-lossy": "utf8-lossy", "latin-1": "latin1",
                   "iso-8859-1": "latin1"}
        if isinstance(value, str):
            return aliases.get(value.lower(), value.lower())
        return value


class SourceConfig(_Model):
    """Where the rows come from: a file or glob (`path`), or a DuckDB `query`.

    With `path`, `files` lists the matching files (absolute, sorted) and
    `format` is inferred from the extension when not given; `csv` is set
    (with defaults) exactly when the format is csv.
    """

    path: Path | None = None
    query: str | None = None
    format: SourceFormat | None = None
    csv: CsvOptions | None = None

    _files: list[Path] = PrivateAttr(default_factory=list)

    # A property, not a field: `files:` in the YAML stays an unknown key, and
    # model_dump() round-trips (validating again re-runs the glob).
    @property
    def files(self) -> list[Path]:
        """The files `path` matched, sorted; empty for a query source."""
        return self._files

    non_blank: ClassVar[tuple[str, ...]] = ("path", "query")

    @field_validator("path")
    @classmethod
    def _resolve_path(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _resolve(value, info)

    @classmethod
    def _raw_problems(cls, data: Any) -> list[Problem]:
        if not isinstance(data, dict):
            return []
        has_path = data.get("path") is not None
        has_query = data.get("query") is not None
        if has_path and has_query:
            return [((), "set either path or query, not both")]
        if not has_path and not has_query:
            return [((), "needs path (a file or glob) or query (DuckDB SQL)")]
        if has_query:
            return [
                ((key,), "only for source.path (a query reads its own files)")
                for key in ("format", "csv")
                if key in data
            ]
        return []

    def _checked(self, context: dict[str, Any]) -> list[Problem]:
        if self.path is None:
            return []
        pattern = str(self.path)
        if self.path.is_dir():
            return [(("path",), f"{pattern} is a folder; use a glob such as {pattern}/*.csv")]
        if self.path.is_file():
            files = [self.path]
        else:
            files = sorted(
                Path(match) for match in glob.glob(pattern, recursive=True) if os.path.isfile(match)
            )
        if not files:
            return [(("path",), f"no file matches {pattern}")]
        self._files = files

        inferred = _infer_format(self.path.name)
        if inferred is None:
            # `data/*` still has a format when every match agrees on one.
            found = {_infer_format(file.name) for file in files}
            inferred = found.pop() if len(found) == 1 else None
        # .tsv means tab-separated even when `format: csv` is written out.
        tab_separated = inferred is not None and inferred[1]
        if self.format is None:
            if inferred is None:
                why = " (the matching files have different extensions)" if len(files) > 1 else ""
                return [
                    (
                        ("format",),
                        f"cannot infer the format from {self.path.name}{why}; "
                        "set source.format to one of: csv, parquet, ndjson, json",
                    )
                ]
            self.format = inferred[0]  # type: ignore[assignment]
        if self.format != "csv":
            if self.csv is not None:
                return [(("csv",), "only for format csv")]
            return []
        if self.csv is None:
            self.csv = CsvOptions()
        if tab_separated and "separator" not in self.csv.model_fields_set:
            self.csv.separator = "\t"
        return []


class TransformConfig(_Model):
    """SQL over the table `source`."""

    sql: str

    non_blank: ClassVar[tuple[str, ...]] = ("sql",)


# --------------------------------------------------------------------------
# mapping
# --------------------------------------------------------------------------


class FieldSpec(_Model):
    """How one record field gets its value: `column` (a source column) or
    `value` (a constant), with `default` used when the column is null/empty."""

    column: str | None = None

    # Whether the field must get a value from a column or a constant.
    requires_source: ClassVar[bool] = False

    non_blank: ClassVar[tuple[str, ...]] = ("column",)

    @classmethod
    def _raw_problems(cls, data: Any) -> list[Problem]:
        if isinstance(data, str):
            return [((), f"must be a mapping: use {{column: {data}}} or {{value: ...}}")]
        if isinstance(data, (int, float, Decimal, dt.date)) and not isinstance(data, bool):
            return [((), f"must be a mapping: use {{value: {data}}} or {{column: ...}}")]
        if not isinstance(data, dict):
            return []
        if "column" in data and "value" in data:
            return [((), "set either column or value, not both")]
        if cls.requires_source and "column" not in data and "value" not in data:
            return [((), "needs column (a source column) or value (a constant)")]
        if not ({"column", "value", "default"} & data.keys()):
            return [((), "needs column, value or default")]
        return []


class DateSpec(FieldSpec):
    """`date`: `format` is a strftime pattern; None means ISO 8601."""

    requires_source: ClassVar[bool] = True

    value: dt.date | None = None
    default: dt.date | None = None
    format: str | None = None

    @field_validator("format")
    @classmethod
    def _strftime(cls, value: str | None) -> str | None:
        if value is not None and "%" not in value:
            raise _fail('must be a strftime pattern such as "%m/%d/%Y"')
        return value


class StreamKeySpec(FieldSpec):
    """`data_stream_key`."""

    requires_source: ClassVar[bool] = True

    value: str | None = None
    default: str | None = None


class AmountSpec(FieldSpec):
    """`amount`: `unit` says whether the values are major or minor units."""

    requires_source: ClassVar[bool] = True

    value: Decimal | None = Field(None, allow_inf_nan=False)
    default: Decimal | None = Field(None, allow_inf_nan=False)
    unit: Literal["major", "minor"]

    def _checked(self, context: dict[str, Any]) -> list[Problem]:
        if self.unit != "minor":
            return []
        return [
            ((key,), "must be a whole number of minor units (unit: minor)")
            for key, amount in (("value", self.value), ("default", self.default))
            if amount is not None and amount != amount.to_integral_value()
        ]


class CurrencySpec(FieldSpec):
    """`currency`: constants are ISO 4217 codes (upper-cased)."""

    value: str | None = None
    default: str | None = None

    @field_validator("value", "default")
    @classmethod
    def _iso4217(cls, value: str | None) -> str | None:
        if value is None:
            return None
        code = value.strip().upper()
        if not re.fullmatch(r"[A-Z]{3}", code) or code not in iso4217.Currency.__members__:
            raise _fail("must be an ISO 4217 currency code such as USD")
        return code


Direction = Literal["credit", "debit"]


class DirectionSpec(FieldSpec):
    """`direction`: `map` turns source values into credit/debit."""

    value: Direction | None = None
    default: Direction | None = None
    map: dict[str, Direction] | None = None

    @classmethod
    def _raw_problems(cls, data: Any) -> list[Problem]:
        problems = super()._raw_problems(data)
        mapping = data.get("map") if isinstance(data, dict) else None
        if isinstance(mapping, dict) and any(isinstance(k, bool) or k is None for k in mapping):
            problems.append(
                (("map",), "YAML reads an unquoted yes/no/on/off/true/false/null key as a "
                           "boolean or null; quote the key")
            )
        return problems

    @field_validator("map", mode="before")
    @classmethod
    def _text_keys(cls, value: Any) -> Any:
        # Keys are compared with the column's values as text, and YAML reads
        # 1 or -1 as numbers. (Boolean keys are reported by _raw_problems.)
        if not isinstance(value, dict):
            return value
        return {k if isinstance(k, str) else str(k): v for k, v in value.items()}


class TextSpec(FieldSpec):
    """`description`, `external_id`."""

    value: str | None = None
    default: str | None = None


class MetadataSpec(_Model):
    """`metadata`: `columns` (a list of column names) or `column` (a column
    holding a JSON object string)."""

    columns: list[str] | None = Field(None, min_length=1)
    column: str | None = None

    @classmethod
    def _raw_problems(cls, data: Any) -> list[Problem]:
        if isinstance(data, str):
            return [((), f"must be a mapping: use {{column: {data}}} (a JSON object column) "
                         "or {columns: [...]}")]
        if isinstance(data, list):
            return [((), f"must be a mapping: use {{columns: [{', '.join(map(str, data))}]}}")]
        if not isinstance(data, dict):
            return []
        if "columns" in data and "column" in data:
            return [((), "set either columns or column, not both")]
        if "columns" not in data and "column" not in data:
            return [((), "needs columns (a list of column names) "
                         "or column (a column holding a JSON object)")]
        return []


class MappingConfig(_Model):
    """Record field <- how to get it. Build it from a dict with
    `parse_section(MappingConfig, data, "mapping")`."""

    date: DateSpec
    data_stream_key: StreamKeySpec
    amount: AmountSpec
    currency: CurrencySpec | None = None
    direction: DirectionSpec | None = None
    description: TextSpec | None = None
    external_id: TextSpec | None = None
    metadata: MetadataSpec | None = None


# --------------------------------------------------------------------------
# validation, dedupe, target, report, fail_on
# --------------------------------------------------------------------------


class DateRange(_Model):
    """Allowed record dates; either end may be open."""

    min: dt.date | None = None
    max: dt.date | None = None

    def _checked(self, context: dict[str, Any]) -> list[Problem]:
        if self.min is not None and self.max is not None and self.min > self.max:
            return [((), f"min {self.min} is after max {self.max}")]
        return []


class ValidationConfig(_Model):
    """Checks on top of the record contract."""

    max_abs_amount: int | None = Field(None, gt=0)  # minor units
    date_range: DateRange | None = None
    required: list[RecordField] = Field(default_factory=list)


class DedupeConfig(_Model):
    """`cache` holds the ids already loaded, per target environment."""

    cache: Path = Field(Path(".loader/cache.duckdb"), validate_default=True)
    within_source: Literal["first", "fail"] = "first"

    non_blank: ClassVar[tuple[str, ...]] = ("cache",)

    @field_validator("cache")
    @classmethod
    def _resolve_cache(cls, value: Path, info: ValidationInfo) -> Path | None:
        return _resolve(value, info)


class StreamConfig(_Model):
    """A data stream the local target creates when missing."""

    key: str
    name: str
    description: str | None = None

    non_blank: ClassVar[tuple[str, ...]] = ("key", "name")


_LOCAL_ONLY = ("database", "environment", "streams")
_API_ONLY = ("base_url", "api_key")


class TargetConfig(_Model):
    """Where records go. For `api`, `database` and `environment` are None
    (the key decides the environment); for `local`, `base_url` and `api_key`
    are None. `api_key` is a SecretStr: it never shows in repr or JSON."""

    type: Literal["local", "api"] = "local"
    database: Path | None = Field(Path(".loader/endclose.duckdb"), validate_default=True)
    environment: str | None = "default"
    streams: list[StreamConfig] = Field(default_factory=list)
    base_url: str | None = None
    api_key: SecretStr | None = None
    on_conflict: Literal["skip", "error"] = "skip"
    chunk_size: int = Field(1000, ge=1, le=1000)
    concurrency: int = Field(4, ge=1)
    timeout_seconds: float = Field(30.0, gt=0)
    poll_timeout_seconds: float = Field(600.0, gt=0)

    non_blank: ClassVar[tuple[str, ...]] = ("database", "environment", "api_key")

    @field_validator("database")
    @classmethod
    def _resolve_database(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _resolve(value, info)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise _fail("must be an http(s) URL such as https://api.endclose.com/v1")
        return value.strip().rstrip("/")

    @classmethod
    def _raw_problems(cls, data: Any) -> list[Problem]:
        if not isinstance(data, dict):
            return []
        kind = data.get("type", "local")
        if kind not in ("local", "api"):
            return []
        other, others_only = ("api", _API_ONLY) if kind == "local" else ("local", _LOCAL_ONLY)
        problems: list[Problem] = [
            ((key,), f"only for target.type {other}") for key in others_only if key in data
        ]
        if kind == "api":
            problems += [
                ((key,), "field required when target.type is api")
                for key in _API_ONLY
                if data.get(key) is None
            ]
        return problems

    def _checked(self, context: dict[str, Any]) -> list[Problem]:
        if self.type == "api":
            self.database = None
            self.environment = None
            return []
        problems: list[Problem] = [
            ((key,), "field required when target.type is local")
            for key in ("database", "environment")
            if getattr(self, key) is None
        ]
        seen: set[str] = set()
        for index, stream in enumerate(self.streams):
            if stream.key in seen:
                problems.append((("streams", index, "key"), f"duplicate stream key {stream.key}"))
            seen.add(stream.key)
        return problems

    @property
    def target_key(self) -> str:
        """Identity of the target environment, for the dedupe cache. For api,
        a sha256 fingerprint of the key stands in for the environment (the key
        decides it); the key itself never appears."""
        if self.type == "api":
            secret = self.api_key.get_secret_value() if self.api_key is not None else ""
            fingerprint = hashlib.sha256(secret.encode("utf-8")).hexdigest()[:12]
            return f"api:{self.base_url}#{fingerprint}"
        return f"local:{self.database}#{self.environment}"

    def describe(self) -> dict[str, Any]:
        """Type and address, for reports; never the key."""
        if self.type == "api":
            return {"type": "api", "base_url": self.base_url}
        return {"type": "local", "database": str(self.database), "environment": self.environment}


ReportFormat = Literal["json", "parquet", "csv", "html"]


class ReportConfig(_Model):
    """`formats` always includes json (summary.json is always written)."""

    dir: Path = Field(Path("reports"), validate_default=True)
    formats: list[ReportFormat] = Field(default_factory=lambda: ["json", "parquet", "html"])

    non_blank: ClassVar[tuple[str, ...]] = ("dir",)

    @field_validator("dir")
    @classmethod
    def _resolve_dir(cls, value: Path, info: ValidationInfo) -> Path | None:
        return _resolve(value, info)

    @field_validator("formats")
    @classmethod
    def _with_json(cls, value: list[ReportFormat]) -> list[ReportFormat]:
        return ["json", *(fmt for fmt in dict.fromkeys(value) if fmt != "json")]


class FailOnConfig(_Model):
    """Exit 1 when more rows than `failed_rows` failed."""

    failed_rows: int = Field(0, ge=0)


# --------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------


class Pipeline(_Model):
    """A validated pipeline.yaml. `path` is the YAML file (None when parsed
    from text) and `base_dir` the folder relative paths resolved against."""

    version: Literal[1]
    name: str
    source: SourceConfig
    transform: TransformConfig | None = None
    mapping: MappingConfig
    # Sections with defaults are validated from {} so that their relative
    # paths resolve against base_dir, not the current directory.
    validation: ValidationConfig = Field(default_factory=dict, validate_default=True)  # type: ignore[arg-type]
    dedupe: DedupeConfig = Field(default_factory=dict, validate_default=True)  # type: ignore[arg-type]
    target: TargetConfig = Field(default_factory=dict, validate_default=True)  # type: ignore[arg-type]
    report: ReportConfig = Field(default_factory=dict, validate_default=True)  # type: ignore[arg-type]
    fail_on: FailOnConfig = Field(default_factory=dict, validate_default=True)  # type: ignore[arg-type]

    _path: Path | None = PrivateAttr(default=None)
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9_-]+", value):
            raise _fail("must use only lowercase letters, digits, '_' and '-' (it names the reports)")
        return value

    def model_post_init(self, context: Any) -> None:
        context = context if isinstance(context, dict) else {}
        self._base_dir = _base_dir(context).resolve()
        self._path = context.get("path")

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def target_key(self) -> str:
        """`local:{database}#{environment}` or `api:{base_url}#{key fingerprint}`."""
        return self.target.target_key

    def describe_target(self) -> dict[str, Any]:
        """Type and address of the target (never the key)."""
        return self.target.describe()


# --------------------------------------------------------------------------
# YAML, interpolation, entry points
# --------------------------------------------------------------------------

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_nodes(root: yaml.Node) -> list[Problem]:
    """Refuse alias bombs and cycles; report duplicate keys.

    Sizes are memoized per node, so a billion-laughs document costs as much
    as its text, not its expansion.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError("the file uses a recursive YAML alias (an anchor inside itself)")
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"the file nests values deeper than {MAX_YAML_DEPTH} levels")
        active.add(key)
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        total = 1 + sum(size(child, depth + 1) for child in children)
        active.discard(key)
        sizes[key] = total
        if total > MAX_YAML_NODES:
            # Every node below this one is in `sizes`; fewer of them than
            # `total` means aliases repeat them.
            if len(sizes) < total:
                raise ConfigError(
                    "the file uses too many YAML aliases: they would expand to more "
                    f"than {MAX_YAML_NODES} values"
                )
            raise ConfigError(f"the file is too large (more than {MAX_YAML_NODES} values)")
        return total

    size(root, 0)

    # Bounded by MAX_YAML_NODES now, so walking the expansion is cheap.
    problems: list[Problem] = []

    def duplicates(node: yaml.Node, loc: Loc) -> None:
        if isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue
                name = key_node.value
                if name in first_line:
                    problems.append(
                        (loc + (name,), f"duplicate key (first on line {first_line[name]})")
                    )
                else:
                    first_line[name] = key_node.start_mark.line + 1
                duplicates(value_node, loc + (name,))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                duplicates(item, loc + (index,))

    duplicates(root, ())
    return problems


def _load_yaml(text: str) -> tuple[Any, list[Problem]]:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        problems = _check_nodes(node)
        return loader.construct_document(node), problems
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem and exc.problem.startswith("but "):
            what = f"{exc.context}, {exc.problem}"  # "expected ..., but found ..."
        raise ConfigError(f"invalid YAML{where}: {what}") from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise ConfigError(
            f"invalid YAML at line {line}, column {column}: character #x{code:04x} "
            f"is not allowed ({exc.reason})"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()


_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _interpolate(
    data: Any, lookup: _Mapping[str, str], environ: _Mapping[str, str], loc: Loc,
    problems: list[Problem],
) -> Any:
    # Builds new containers: YAML aliases share objects, and substituting in
    # place would process a shared string twice (turning `$${` into `${`).
    if isinstance(data, dict):
        return {k: _interpolate(v, lookup, environ, loc + (k,), problems) for k, v in data.items()}
    if isinstance(data, list):
        return [_interpolate(v, lookup, environ, loc + (i,), problems) for i, v in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data

    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "$${":
            return "${"
        name = match.group(1)
        if name is None:
            problems.append((loc, "unclosed ${; write $${ for a literal ${"))
            return token
        if not _VAR_NAME.fullmatch(name):
            problems.append(
                (loc, f"{token} is not a valid reference: use ${{NAME}} with letters, digits "
                      "and _, or $${ for a literal ${")
            )
            return token
        if name in lookup:
            return str(lookup[name])
        if name in environ:
            return str(environ[name])
        problems.append(
            (loc, f"${{{name}}} is not set; pass --var {name}=... or set the environment variable")
        )
        return token

    return _REFERENCE.sub(replace, data)


def _within(loc: Loc, prefixes: set[Loc]) -> bool:
    return any(loc[: len(prefix)] == prefix for prefix in prefixes)


def _parse(
    text: str,
    *,
    base_dir: Path,
    vars: _Mapping[str, str] | None,
    environ: _Mapping[str, str] | None,
    file: str | None,
    path: Path | None,
) -> Pipeline:
    try:
        data, problems = _load_yaml(text)
    except ConfigError as exc:
        raise ConfigError(exc.problems, file=file) from None
    if data is None:
        raise ConfigError("the file is empty; a pipeline needs version, name, source and mapping",
                          file=file)
    if not isinstance(data, dict):
        raise ConfigError(
            f"the top level must be a mapping (version: 1, name: ..., source: ...), "
            f"not a {'list' if isinstance(data, list) else 'single value'}",
            file=file,
        )
    interpolation: list[Problem] = []
    data = _interpolate(data, vars or {}, os.environ if environ is None else environ, (),
                        interpolation)
    problems += interpolation
    context = {"base_dir": Path(base_dir).resolve(), "path": path}
    try:
        pipeline = Pipeline.model_validate(data, context=context)
    except ValidationError as exc:
        # An unresolved ${NAME} already explains whatever its key gets wrong.
        unresolved = {loc for loc, _ in interpolation}
        problems += [p for p in _problems_from(exc, Pipeline) if not _within(p[0], unresolved)]
        pipeline = None
    if problems:
        unique = list(dict.fromkeys((_dotted(loc), msg) for loc, msg in problems))
        raise ConfigError(unique, file=file) from None
    assert pipeline is not None
    return pipeline


def parse_pipeline(
    text: str,
    *,
    base_dir: Path,
    vars: _Mapping[str, str] | None = None,
    environ: _Mapping[str, str] | None = None,
    file: str | None = None,
) -> Pipeline:
    """Parse pipeline.yaml text; relative paths resolve against `base_dir`.

    `${NAME}` takes `vars[NAME]`, else `environ[NAME]` (default `os.environ`).
    `file` names the text in error messages. Raises `ConfigError`.
    """
    return _parse(text, base_dir=base_dir, vars=vars, environ=environ, file=file, path=None)


def load_pipeline(
    path: str | os.PathLike[str],
    vars: _Mapping[str, str] | None = None,
    *,
    environ: _Mapping[str, str] | None = None,
) -> Pipeline:
    """Read and validate a pipeline.yaml; relative paths in it resolve
    against the file's folder. Raises `ConfigError` (exit code 2)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(file)) from None
    except UnicodeDecodeError:
        raise ConfigError("the file is not UTF-8 text", file=str(file)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", file=str(file)) from None
    return _parse(text, base_dir=file.parent, vars=vars, environ=environ, file=str(file),
                  path=file.resolve())


def parse_section(
    model: type[ModelT], data: Any, section: str, *, base_dir: Path | None = None
) -> ModelT:
    """Validate a dict (a notebook's `mapping`, `target`, ...) into `model`,
    with the same key-path errors as pipeline.yaml (`section` prefixes them).
    Relative paths resolve against `base_dir`, else the current directory."""
    context = {"base_dir": Path(base_dir).resolve() if base_dir is not None else Path.cwd()}
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        prefix: Loc = tuple(section.split(".")) if section else ()
        problems = [(_dotted(prefix + loc), msg) for loc, msg in _problems_from(exc, model)]
        raise ConfigError(list(dict.fromkeys(problems))) from None


def parse_var_assignments(items: Iterable[str]) -> dict[str, str]:
    """`["K=V", ...]` (from `--var`) -> `{"K": "V"}`; a later K wins."""
    assignments: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for position, item in enumerate(items, start=1):
        name, equals, value = item.partition("=")
        if not equals:
            # Never echo it: it may be a secret pasted without its name.
            problems.append(("--var", f"expected NAME=VALUE, but --var number {position} has no '='"))
        elif not _VAR_NAME.fullmatch(name):
            problems.append(("--var", f"'{name}' is not a variable name (letters, digits and _)"))
        else:
            assignments[name] = value
    if problems:
        raise ConfigError(problems)
    return assignments
