"""loader: load financial records into EndClose.

    import loader
    report = loader.run("pipeline.yaml", vars={"MONTH": "2024-01"})
    report.failed()          # the failed rows as a Polars DataFrame

See README.md for pipeline.yaml, the CLI and the report files.

The names below are imported on first use: `import loader` alone loads
neither Polars nor DuckDB, so the `loader` command can set up the process
(its allocator, see cli.entry) before they load.
"""

import importlib as _importlib
import sys as _sys
import types as _types
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

# Public name -> the module that defines it (and its name there).
_EXPORTS = {
    "AuthenticationError": (".errors", "AuthenticationError"),
    "ConfigError": (".errors", "ConfigError"),
    "LoaderError": (".errors", "LoaderError"),
    "LockedError": (".errors", "LockedError"),
    "RetryableTargetError": (".errors", "RetryableTargetError"),
    "SourceError": (".errors", "SourceError"),
    "TargetError": (".errors", "TargetError"),
    "TerminalTargetError": (".errors", "TerminalTargetError"),
    "MappingConfig": (".config", "MappingConfig"),
    "Pipeline": (".config", "Pipeline"),
    "TargetConfig": (".config", "TargetConfig"),
    "load_pipeline": (".config", "load_pipeline"),
    "ReconcileResult": (".reconcile", "ReconcileResult"),
    "reconcile": (".reconcile", "reconcile_pipeline"),
    "Report": (".report", "Report"),
    "TooManyFailures": (".report", "TooManyFailures"),
    "configure_logging": (".logs", "configure"),
    "load": (".api", "load"),
    "run": (".api", "run"),
    "validate": (".api", "validate"),
}

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


def __getattr__(name: str) -> _Any:
    try:
        module_name, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'loader' has no attribute {name!r}") from None
    value = getattr(_importlib.import_module(module_name, __name__), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(_types.ModuleType):
    """`loader.run`, `loader.validate` and `loader.reconcile` are functions, though modules share
    their names: importing such a module binds it on the package, and that binding is refused."""

    def __setattr__(self, name: str, value: _Any) -> None:
        if name in _EXPORTS and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


if _TYPE_CHECKING:
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
