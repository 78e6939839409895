"""loader: load financial records into EndClose.

    import loader
    report = loader.run("pipeline.yaml", vars={"MONTH": "2024-01"})
    report.failed()          # the failed rows as a Polars DataFrame

See README.md for pipeline.yaml, the CLI and the report files.
"""

from .api import load, run, validate
from .config import MappingConfig, Pipeline, TargetConfig, load_pipeline
from .errors import (
    AuthenticationError,
    ConfigError,
    LoaderError,
    LockedError,
    RetryableTargetError,
    SourceError,
    TargetError,
    TerminalTargetError,
)
from .logs import configure as configure_logging
from .reconcile import ReconcileResult, reconcile_pipeline as reconcile
from .report import Report, TooManyFailures

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "LoaderError",
    "LockedError",
    "MappingConfig",
    "Pipeline",
    "ReconcileResult",
    "Report",
    "RetryableTargetError",
    "SourceError",
    "TargetConfig",
    "TargetError",
    "TerminalTargetError",
    "TooManyFailures",
    "configure_logging",
    "load",
    "load_pipeline",
    "reconcile",
    "run",
    "validate",
]
