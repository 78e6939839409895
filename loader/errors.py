"""The error tree of `loader`.

    LoaderError                       base of everything loader raises on purpose
    ├── ConfigError                   pipeline.yaml or arguments are wrong (exit 2)
    ├── SourceError                   the source cannot be read at all (exit 2)
    ├── LockedError                   another process holds a DuckDB file (exit 3)
    ├── TargetError                   the target could not finish the job (exit 3)
    │   ├── RetryableTargetError      try again later: timeouts, 5xx, 429, dropped connections
    │   └── TerminalTargetError       retrying will not help: 400, 401, 422
    │       └── AuthenticationError   401: the API key is wrong or belongs to no environment
    └── EngineError                   the local engine refused an API call; carries the
        ├── BadRequest (400)          HTTP status the same call gets from EndClose
        ├── NotFound (404)
        ├── Conflict (409)
        └── Unprocessable (422)

Bad rows are never exceptions: they are report data (`failed/invalid`, ...).
Every message says what to do next.
"""

from __future__ import annotations


class LoaderError(Exception):
    """Base of every error loader raises on purpose."""

    exit_code = 3


class ConfigError(LoaderError):
    """The pipeline config (or a CLI argument) is wrong; nothing was loaded.

    `problems` holds `(key_path, message)` pairs, `key_path` being the dotted
    path of the key in the YAML (`mapping.amount.unit`), or "" for the file.
    """

    exit_code = 2

    def __init__(self, problems: list[tuple[str, str]] | str, *, file: str | None = None):
        if isinstance(problems, str):
            problems = [("", problems)]
        self.problems = list(problems)
        self.file = file
        super().__init__(self._render())

    def _render(self) -> str:
        lines = []
        for path, message in self.problems:
            lines.append(f"{path}: {message}" if path else message)
        head = f"{self.file}: " if self.file else ""
        if len(lines) == 1:
            return head + lines[0]
        return head + "invalid pipeline config\n" + "\n".join(f"  {line}" for line in lines)


class SourceError(LoaderError):
    """The source cannot be read at all (missing file, unreadable format)."""

    exit_code = 2


class LockedError(LoaderError):
    """A DuckDB file is in use by another process."""

    exit_code = 3


class TargetError(LoaderError):
    """The target could not finish the job; confirmed work stays recorded."""

    exit_code = 3


class RetryableTargetError(TargetError):
    """A transient failure: running the same command again resumes the job."""


class TerminalTargetError(TargetError):
    """Retrying will not help until something is changed."""


class AuthenticationError(TerminalTargetError):
    """The target answered 401."""


class EngineError(LoaderError):
    """An API call the local engine refused, with the HTTP status EndClose uses."""

    status_code = 400

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)


class BadRequest(EngineError):
    status_code = 400


class NotFound(EngineError):
    status_code = 404


class Conflict(EngineError):
    status_code = 409


class Unprocessable(EngineError):
    status_code = 422
