"""The typed model of pipeline.yaml, section by section."""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args
from urllib.parse import urlsplit

import iso4217
from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
)


from .base import Problem, _Model, _base_dir, _fail, _resolve

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


