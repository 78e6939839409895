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


from .loading import load_pipeline, parse_pipeline, parse_section, parse_var_assignments
from .models import (
    RECORD_FIELDS,
    AmountSpec,
    CsvOptions,
    CurrencySpec,
    DateRange,
    DateSpec,
    DedupeConfig,
    DirectionSpec,
    FailOnConfig,
    FieldSpec,
    MappingConfig,
    MetadataSpec,
    Pipeline,
    ReportConfig,
    SourceConfig,
    StreamConfig,
    StreamKeySpec,
    TargetConfig,
    TextSpec,
    TransformConfig,
    ValidationConfig,
)


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
