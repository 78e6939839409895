"""The local engine: an EndClose environment store in one DuckDB file.

    Engine                  the API's verbs (data streams, bulk requests, records)
    BulkSubmission          one POST /records/bulk: records, on_conflict, Idempotency-Key
    RECORD_COLUMNS          the Arrow schema of a submission's normalized records
    normalize_json_records  a JSON `records` array -> that table, type errors as input_error

Modules: model (records, submissions), normalize (JSON -> Arrow), schema
(tables, id counters), bulk (set-based apply), lifecycle (worker, cancel,
retry), queries (reads), streams (environments, data streams), engine.
"""

from .engine import Engine
from .model import RECORD_COLUMNS, BulkSubmission
from .normalize import normalize_json_records

__all__ = ["Engine", "BulkSubmission", "RECORD_COLUMNS", "normalize_json_records"]
