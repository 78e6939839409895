"""Log lines for people (text) or for schedulers (one JSON object per event).

Events are emitted on the `loader` logger with their fields in `extra`
(`event`, `run_id`, `pipeline`, counts, `idempotency_key`, `bulk_request_id`).
Nothing secret is ever put in an event; as a second line of defence the JSON
formatter drops any field whose name looks like a credential.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_SECRET_WORDS = ("key", "secret", "password", "token", "authorization")


def _fields(record: logging.LogRecord) -> dict:
    fields = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
    # `idempotency_key` is not a secret; anything else named like a credential is dropped.
    return {k: v for k, v in fields.items()
            if k == "idempotency_key" or not any(word in k.lower() for word in _SECRET_WORDS)}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["error"] = str(record.exc_info[1])
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """`time level message key=value ...` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in _fields(record).items() if k != "event")
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S")
        return f"{stamp} {record.levelname.lower():<7} {record.getMessage()} {fields}".rstrip()


def configure(log_format: str = "text", level: str = "warning", stream=None) -> logging.Handler:
    """Send the `loader` logger's events to `stream` (stderr) in the given format."""
    logger = logging.getLogger("loader")
    for handler in list(logger.handlers):
        if getattr(handler, "_loader_handler", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._loader_handler = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return handler
