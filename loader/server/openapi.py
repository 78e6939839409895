"""The OpenAPI 3.1 document of what `loader serve` answers, written by hand."""

from __future__ import annotations

import copy
from typing import Any

API_PREFIX = "/v1"

_STATUSES = ["pending", "processing", "completed", "failed", "cancelled"]
_INT64 = {"type": "integer", "format": "int64"}
_COUNT = {"type": "integer", "minimum": 0}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    """Responses every authenticated operation can give (401, 429, 503) plus `codes`."""
    names = {400: "BadRequest", 404: "NotFound", 409: "Conflict", 422: "Unprocessable"}
    responses = {str(code): {"$ref": f"#/components/responses/{names[code]}"} for code in codes}
    responses["401"] = {"$ref": "#/components/responses/Unauthorized"}
    responses["429"] = {"$ref": "#/components/responses/TooManyRequests"}
    responses["503"] = {"$ref": "#/components/responses/ServiceUnavailable"}
    return responses


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _path(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


_LIMIT = _query("limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}, "Page size.")
_CURSOR = _query("cursor", {"type": "string"}, "The `next_cursor` of the previous page.")
_BULK_REQUEST_ID = _path("bulk_request_id", {**_INT64, "minimum": 0}, "The bulk request's id.")
_STREAM_KEY = _path("key", {"type": "string", "minLength": 1}, "The data stream's key (a `/` in it as %2F).")

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["message"],
        "properties": {"message": {"type": "string"}},
    },
    "RecordInput": {
        "type": "object",
        "description": "A record as sent. Each record is validated on its own: one that breaks these "
        "rules fails on its row of the bulk request, and the request is still accepted.",
        "required": ["date", "data_stream_key", "amount"],
        "properties": {
            "date": {"type": "string", "format": "date", "description": "YYYY-MM-DD, a real calendar date."},
            "data_stream_key": {"type": "string", "description": "An existing stream of the environment."},
            "amount": {**_INT64, "description": "In the currency's minor units."},
            "currency": {"type": "string", "pattern": "^[A-Za-z]{3}$", "default": "USD"},
            "direction": {"type": "string", "enum": ["credit", "debit"]},
            "description": {"type": "string"},
            "external_id": {"type": "string", "description": "Unique within a stream."},
            "metadata": {"type": "object", "default": {}},
        },
    },
    "BulkCreateRequest": {
        "type": "object",
        "required": ["records"],
        "properties": {
            "records": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1000,
                # Any element is accepted: a malformed record fails on its own row.
                "items": {"anyOf": [_ref("RecordInput"), {}]},
            },
            "on_conflict": {"type": "string", "enum": ["skip", "error"], "default": "skip"},
        },
    },
    "BulkRequestSummary": {
        "type": "object",
        "required": ["id", "status", "total_items", "processed_items", "successful_items", "failed_items",
                     "skipped_items", "url"],
        "properties": {
            "id": _INT64,
            "status": {"type": "string", "enum": _STATUSES},
            "total_items": _COUNT,
            "processed_items": _COUNT,
            "successful_items": _COUNT,
            "failed_items": _COUNT,
            "skipped_items": _COUNT,
            "url": {"type": "string", "description": "The polling URL, e.g. /v1/bulk_requests/123."},
        },
    },
    "BulkRequest": {
        "type": "object",
        "required": ["id", "status", "source", "on_conflict", "idempotency_key", "total_items", "processed_items",
                     "successful_items", "failed_items", "skipped_items", "progress", "created_at", "started_at",
                     "completed_at", "error_message", "parent_bulk_request_id", "data_stream_keys", "url"],
        "properties": {
            "id": _INT64,
            "status": {"type": "string", "enum": _STATUSES},
            "source": {"type": "string", "description": "`api`, or `retry` for a retry's request."},
            "on_conflict": {"type": "string", "enum": ["skip", "error"]},
            "idempotency_key": {"type": ["string", "null"]},
            "total_items": _COUNT,
            "processed_items": _COUNT,
            "successful_items": _COUNT,
            "failed_items": _COUNT,
            "skipped_items": _COUNT,
            "progress": {"type": "integer", "minimum": 0, "maximum": 100},
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": {"type": ["string", "null"], "format": "date-time"},
            "completed_at": {"type": ["string", "null"], "format": "date-time"},
            "error_message": {"type": ["string", "null"]},
            "parent_bulk_request_id": {"type": ["integer", "null"]},
            "data_stream_keys": {"type": "array", "items": {"type": "string"}},
            "url": {"type": "string"},
        },
    },
    "BulkRequestResult": {
        "type": "object",
        "required": ["index", "status"],
        "properties": {
            "index": {"type": "integer", "minimum": 0, "description": "Position in the submitted records."},
            "status": {"type": "string", "enum": ["successful", "failed", "skipped"]},
            "record_id": {**_INT64, "description": "Set when successful."},
            "error": {"type": "string", "description": "Set when failed."},
        },
    },
    "BulkRequestWithResults": {
        "allOf": [
            _ref("BulkRequest"),
            {
                "type": "object",
                "required": ["results"],
                "properties": {
                    "results": {
                        "type": "object",
                        "required": ["data", "has_more", "offset"],
                        "properties": {
                            "data": {"type": "array", "items": _ref("BulkRequestResult")},
                            "has_more": {"type": "boolean"},
                            "offset": {"type": "integer", "minimum": 0},
                        },
                    }
                },
            },
        ]
    },
    "Record": {
        "type": "object",
        "required": ["id", "data_stream_key", "date", "amount", "currency", "decimal_places", "direction",
                     "description", "external_id", "metadata"],
        "properties": {
            "id": _INT64,
            "data_stream_key": {"type": "string"},
            "date": {"type": "string", "format": "date"},
            "amount": _INT64,
            "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "decimal_places": {"type": ["integer", "null"], "minimum": 0},
            "direction": {"enum": ["credit", "debit", None]},
            "description": {"type": ["string", "null"]},
            "external_id": {"type": ["string", "null"]},
            "metadata": {"type": "object"},
        },
    },
    "DataStream": {
        "type": "object",
        "required": ["id", "key", "name", "type", "description", "created_at"],
        "properties": {
            "id": _INT64,
            "key": {"type": "string"},
            "name": {"type": "string"},
            "type": {"type": "string"},
            "description": {"type": ["string", "null"]},
            "created_at": {"type": "string", "format": "date-time"},
        },
    },
    "DataStreamCreate": {
        "type": "object",
        "required": ["key", "name", "type"],
        "properties": {
            "key": {"type": "string", "pattern": "\\S", "description": "Immutable."},
            "name": {"type": "string", "pattern": "\\S"},
            "type": {"type": "string", "enum": ["api"]},
            "description": {"type": ["string", "null"]},
        },
    },
    "DataStreamHealth": {
        "type": "object",
        "required": ["data_stream_key", "records_count", "bulk_requests", "last_ingestion_at"],
        "properties": {
            "data_stream_key": {"type": "string"},
            "records_count": _COUNT,
            "bulk_requests": {
                "type": "object",
                "required": [*_STATUSES, "stuck"],
                "properties": {status: _COUNT for status in [*_STATUSES, "stuck"]},
            },
            "last_ingestion_at": {"type": ["string", "null"], "format": "date-time"},
        },
    },
}

for _name, _item in (("BulkRequestPage", "BulkRequest"), ("RecordPage", "Record")):
    _SCHEMAS[_name] = {
        "type": "object",
        "required": ["data", "next_cursor", "limit"],
        "properties": {
            "data": {"type": "array", "items": _ref(_item)},
            "next_cursor": {"type": ["string", "null"], "description": "null on the last page."},
            "limit": {"type": "integer"},
        },
    }

_ERROR = _ref("Error")
_RESPONSES = {
    "BadRequest": _json(_ERROR, "The request is malformed (not JSON, or a bad on_conflict)."),
    "Unauthorized": _json(_ERROR, "The X-API-KEY header is missing or unknown."),
    "NotFound": _json(_ERROR, "Nothing of that id or key in the key's environment."),
    "Conflict": _json(_ERROR, "The bulk request is not in a state that allows this."),
    "Unprocessable": _json(_ERROR, "The request is well-formed but breaks a rule of the API."),
    "TooManyRequests": {
        **_json(_ERROR, "Throttled (fault injection): retry after Retry-After seconds."),
        "headers": {"Retry-After": {"required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"}}},
    },
    "ServiceUnavailable": _json(_ERROR, "Unavailable (fault injection): retry later."),
}

_PATHS: dict[str, Any] = {
    "/records/bulk": {
        "post": {
            "operationId": "createBulkRequest",
            "summary": "Bulk create records (processed asynchronously)",
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "pattern": "\\S"},
                    "description": "If a bulk request with this key exists in the environment, it is "
                    "returned and nothing new is created.",
                }
            ],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("BulkCreateRequest")}}},
            "responses": {
                "202": _json(_ref("BulkRequestSummary"), "Accepted: pending, poll `url`."),
                **_errors(400, 422),
            },
        }
    },
    "/bulk_requests": {
        "get": {
            "operationId": "listBulkRequests",
            "summary": "List bulk requests, newest first",
            "parameters": [
                _query("data_stream_key", {"type": "string"}, "Requests with a record of this stream."),
                _query("status", {"type": "string", "enum": _STATUSES}, "Requests in this status."),
                _query("source", {"type": "string"}, "Requests of this source (`api`, `retry`)."),
                _query("created_after", {"type": "string", "format": "date-time"}, "Created after this time."),
                _query("created_before", {"type": "string", "format": "date-time"}, "Created before this time."),
                _LIMIT,
                _CURSOR,
            ],
            "responses": {"200": _json(_ref("BulkRequestPage"), "One page."), **_errors(422)},
        }
    },
    "/bulk_requests/{bulk_request_id}": {
        "get": {
            "operationId": "getBulkRequest",
            "summary": "A bulk request and a page of its per-row results",
            "parameters": [
                _BULK_REQUEST_ID,
                _LIMIT,
                _query("offset", {**_INT64, "minimum": 0, "default": 0}, "First result to answer."),
            ],
            "responses": {
                "200": _json(_ref("BulkRequestWithResults"), "The request and its results."),
                **_errors(404, 422),
            },
        }
    },
    "/bulk_requests/{bulk_request_id}/cancel": {
        "post": {
            "operationId": "cancelBulkRequest",
            "summary": "Cancel a pending or processing bulk request",
            "parameters": [_BULK_REQUEST_ID],
            "responses": {"202": _json(_ref("BulkRequest"), "Cancelled."), **_errors(404, 409)},
        }
    },
    "/bulk_requests/{bulk_request_id}/retry": {
        "post": {
            "operationId": "retryBulkRequest",
            "summary": "Re-run a failed or cancelled request's unsuccessful rows as a new request",
            "parameters": [_BULK_REQUEST_ID],
            "responses": {"202": _json(_ref("BulkRequest"), "The new, pending request."), **_errors(404, 409)},
        }
    },
    "/records": {
        "get": {
            "operationId": "listRecords",
            "summary": "List records, newest first; at least one filter is required",
            "parameters": [
                _query("data_stream_key", {"type": "string"}, "Records of this stream."),
                _query("external_id", {"type": "string"}, "Records with this external_id."),
                _query("bulk_request_id", _INT64, "Records created by this bulk request."),
                _LIMIT,
                _CURSOR,
            ],
            "responses": {"200": _json(_ref("RecordPage"), "One page."), **_errors(422)},
        }
    },
    "/data_streams": {
        "get": {
            "operationId": "listDataStreams",
            "summary": "The environment's data streams",
            "responses": {
                "200": _json({"type": "array", "items": _ref("DataStream")}, "Every stream, oldest first."),
                **_errors(),
            },
        },
        "post": {
            "operationId": "createDataStream",
            "summary": "Create a data stream",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("DataStreamCreate")}}},
            "responses": {"201": _json(_ref("DataStream"), "Created."), **_errors(400, 422)},
        },
    },
    "/data_streams/{key}": {
        "get": {
            "operationId": "getDataStream",
            "summary": "One data stream",
            "parameters": [_STREAM_KEY],
            "responses": {"200": _json(_ref("DataStream"), "The stream."), **_errors(404)},
        }
    },
    "/data_streams/{key}/health": {
        "get": {
            "operationId": "getDataStreamHealth",
            "summary": "Records count, bulk requests by status and last ingestion of a stream",
            "parameters": [_STREAM_KEY],
            "responses": {"200": _json(_ref("DataStreamHealth"), "The stream's health."), **_errors(404)},
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "getOpenApi",
            "summary": "This document (no key needed)",
            "security": [],
            "responses": {"200": _json({"type": "object"}, "The OpenAPI document.")},
        }
    },
}

_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "EndClose bulk records API (loader serve)",
        "version": "v1",
        "description": "The local engine of `loader`, served with the semantics of EndClose's API. "
        "Bulk requests are processed asynchronously. 429 and 503 only occur with fault injection on.",
    },
    "servers": [{"url": API_PREFIX}],
    "security": [{"ApiKey": []}],
    "paths": _PATHS,
    "components": {
        "securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-KEY"}},
        "schemas": _SCHEMAS,
        "responses": _RESPONSES,
    },
}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh copy: callers may change it)."""
    return copy.deepcopy(_DOCUMENT)
