"""The ASGI app: the EndClose API of endclose-api.md under /v1, backed by the local engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse as _StarletteJSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from loader.engine import BulkSubmission, Engine, normalize_json_records
from loader.errors import BadRequest, EngineError, NotFound, Unprocessable

from .auth import ApiKeys
from .faults import NO_FAULTS, RETRY_AFTER_SECONDS, FaultInjector, Faults
from .openapi import API_PREFIX, openapi_document
from .worker import Worker

#: A response carrying this header is never sent: the connection is dropped instead
#: (by serve(); see runner.py). Private to this package.
DROP_HEADER = "x-loader-drop-connection"

_ENVIRONMENT = "loader.environment"  # the scope key holding the caller's environment
_PUBLIC_PATHS = {"/openapi.json", f"{API_PREFIX}/openapi.json"}
_MAX_ID = 2**63 - 1  # ids are BIGINT: a larger one names nothing


class JSONResponse(_StarletteJSONResponse):
    """Starlette's JSON response, encoded by orjson: result pages are most of what the server writes."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _message(status_code: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"message": message}, status_code=status_code, headers=headers)


class _Gate:
    """Authentication, then the injected latency, 503s and 429s, before any route runs."""

    def __init__(self, app: ASGIApp, *, api_keys: ApiKeys, injector: FaultInjector):
        self.app = app
        self.api_keys = api_keys
        self.injector = injector

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        presented = next((value for name, value in scope["headers"] if name == b"x-api-key"), None)
        environment = self.api_keys.environment_for(presented)
        if environment is None:
            # Never echo the presented key.
            response = _message(401, "missing or unknown X-API-KEY header: send a key this server was started with")
            await response(scope, receive, send)
            return
        if self.injector.latency_seconds:
            await asyncio.sleep(self.injector.latency_seconds)
        refusal = self.injector.refusal()
        if refusal == 503:
            await _message(503, "service unavailable (injected failure): try again")(scope, receive, send)
            return
        if refusal == 429:
            response = _message(
                429,
                f"too many requests (injected throttling): retry after {RETRY_AFTER_SECONDS} second(s)",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
            await response(scope, receive, send)
            return
        await self.app({**scope, _ENVIRONMENT: environment}, receive, send)


# -- reading requests --------------------------------------------------------------------


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


async def _json_body(request: Request) -> Any:
    """The request body as JSON; BadRequest (400) for anything that is not JSON."""
    try:
        raw = await request.body()
    except ClientDisconnect:
        # The client went away mid-body (a killed loader run): nothing was read, nothing is done.
        raise BadRequest("the client disconnected before sending the whole body") from None
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError) as error:
        raise BadRequest(f"the request body is not valid JSON: {error}") from None


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
             float: "a float", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _int_query(request: Request, name: str, default: int | None) -> int | None:
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise Unprocessable(f"{name} must be an integer, not {text!r}") from None
    if not -_MAX_ID - 1 <= value <= _MAX_ID:
        raise Unprocessable(f"{name} is out of the 64-bit integer range: {text}")
    return value


def _timestamp_query(request: Request, name: str) -> datetime | None:
    # Parsed here, at the HTTP edge, so a timestamp the engine cannot hold is a 422, not a crash.
    text = request.query_params.get(name)
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
    except (ValueError, OverflowError):
        raise Unprocessable(f"{name} must be an ISO 8601 timestamp, not {text!r}") from None
    return value


def _bulk_request_id(request: Request) -> int:
    bulk_request_id = request.path_params["bulk_request_id"]
    if bulk_request_id > _MAX_ID:
        raise NotFound(f"no bulk request {bulk_request_id}")
    return bulk_request_id


# -- the endpoints -----------------------------------------------------------------------


class _Api:
    def __init__(self, engine: Engine, worker: Worker, injector: FaultInjector):
        self.engine = engine
        self.worker = worker
        self.injector = injector

    async def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # The engine blocks (DuckDB, its lock): keep it off the event loop.
        return await run_in_threadpool(method, *args, **kwargs)

    async def create_bulk_request(self, request: Request) -> JSONResponse:
        environment = request.scope[_ENVIRONMENT]
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise Unprocessable(f"the body must be a JSON object with a records array, not {_kind(body)}")
        if "records" not in body:
            raise Unprocessable("records: is required (an array of 1 to 1000 records)")
        records = body["records"]
        if not isinstance(records, list):
            raise Unprocessable(f"records: must be an array, not {_kind(records)}")
        idempotency_key = request.headers.get("idempotency-key")
        if idempotency_key is not None and not idempotency_key.strip():
            raise BadRequest("Idempotency-Key must not be empty: send a key or leave the header out")
        # Rows are typed by the engine's parser, so a wrongly typed row fails on its own.
        table = await self._call(normalize_json_records, json.dumps(records))
        submission = BulkSubmission(
            table, on_conflict=body.get("on_conflict", "skip"), idempotency_key=idempotency_key
        )
        [summary] = await self._call(self.engine.submit, environment, [submission], process=False)
        if summary["status"] in ("pending", "processing"):
            self.worker.enqueue(summary["id"], summary["total_items"] - summary["processed_items"])
        headers = {DROP_HEADER: "1"} if self.injector.drop_connection() else None
        return JSONResponse(summary, status_code=202, headers=headers)

    async def get_bulk_request(self, request: Request) -> JSONResponse:
        bulk_request = await self._call(
            self.engine.get_bulk_request,
            request.scope[_ENVIRONMENT],
            _bulk_request_id(request),
            limit=_int_query(request, "limit", 50),
            offset=_int_query(request, "offset", 0),
        )
        return JSONResponse(bulk_request)

    async def list_bulk_requests(self, request: Request) -> JSONResponse:
        query = request.query_params
        page = await self._call(
            self.engine.list_bulk_requests,
            request.scope[_ENVIRONMENT],
            data_stream_key=query.get("data_stream_key"),
            status=query.get("status"),
            source=query.get("source"),
            created_after=_timestamp_query(request, "created_after"),
            created_before=_timestamp_query(request, "created_before"),
            limit=_int_query(request, "limit", 50),
            cursor=query.get("cursor"),
        )
        return JSONResponse(page)

    async def cancel_bulk_request(self, request: Request) -> JSONResponse:
        cancelled = await self._call(self.engine.cancel, request.scope[_ENVIRONMENT], _bulk_request_id(request))
        return JSONResponse(cancelled, status_code=202)

    async def retry_bulk_request(self, request: Request) -> JSONResponse:
        retried = await self._call(self.engine.retry, request.scope[_ENVIRONMENT], _bulk_request_id(request))
        self.worker.enqueue(retried["id"], retried["total_items"] - retried["processed_items"])
        return JSONResponse(retried, status_code=202)

    async def list_records(self, request: Request) -> JSONResponse:
        query = request.query_params
        page = await self._call(
            self.engine.list_records,
            request.scope[_ENVIRONMENT],
            data_stream_key=query.get("data_stream_key"),
            external_id=query.get("external_id"),
            bulk_request_id=_int_query(request, "bulk_request_id", None),
            limit=_int_query(request, "limit", 50),
            cursor=query.get("cursor"),
        )
        return JSONResponse(page)

    async def data_streams(self, request: Request) -> JSONResponse:
        if request.method == "POST":
            return await self.create_stream(request)
        return await self.list_streams(request)

    async def list_streams(self, request: Request) -> JSONResponse:
        return JSONResponse(await self._call(self.engine.list_streams, request.scope[_ENVIRONMENT]))

    async def create_stream(self, request: Request) -> JSONResponse:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise Unprocessable(f"the body must be a JSON object, not {_kind(body)}")
        missing = [field for field in ("key", "name", "type") if field not in body]
        if missing:
            raise Unprocessable(f"{', '.join(missing)}: required")
        if body["type"] != "api":
            raise Unprocessable(f"type: must be 'api' for a stream created through the API, not {body['type']!r}")
        stream = await self._call(
            self.engine.create_stream,
            request.scope[_ENVIRONMENT],
            key=body["key"],
            name=body["name"],
            type="api",
            description=body.get("description"),
        )
        return JSONResponse(stream, status_code=201)

    async def get_stream(self, request: Request) -> JSONResponse:
        stream = await self._call(self.engine.get_stream, request.scope[_ENVIRONMENT], request.path_params["key"])
        return JSONResponse(stream)

    async def stream_health(self, request: Request) -> JSONResponse:
        health = await self._call(
            self.engine.stream_health, request.scope[_ENVIRONMENT], request.path_params["key"]
        )
        return JSONResponse(health)

    def routes(self) -> list[Route]:
        v1 = API_PREFIX
        return [
            Route(f"{v1}/records/bulk", self.create_bulk_request, methods=["POST"]),
            Route(f"{v1}/records", self.list_records, methods=["GET"]),
            Route(f"{v1}/bulk_requests", self.list_bulk_requests, methods=["GET"]),
            Route(f"{v1}/bulk_requests/{{bulk_request_id:int}}", self.get_bulk_request, methods=["GET"]),
            Route(f"{v1}/bulk_requests/{{bulk_request_id:int}}/cancel", self.cancel_bulk_request, methods=["POST"]),
            Route(f"{v1}/bulk_requests/{{bulk_request_id:int}}/retry", self.retry_bulk_request, methods=["POST"]),
            # One route per path, so a 405 names every method the path allows.
            Route(f"{v1}/data_streams", self.data_streams, methods=["GET", "POST"]),
            # Keys may hold "/" (sent as %2F): the health route comes first so it wins.
            Route(f"{v1}/data_streams/{{key:path}}/health", self.stream_health, methods=["GET"]),
            Route(f"{v1}/data_streams/{{key:path}}", self.get_stream, methods=["GET"]),
            Route("/openapi.json", _openapi, methods=["GET"]),
            Route(f"{v1}/openapi.json", _openapi, methods=["GET"]),
        ]


async def _openapi(request: Request) -> JSONResponse:
    return JSONResponse(openapi_document())


# -- errors as the API answers them --------------------------------------------------------


async def _engine_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, EngineError)
    return _message(error.status_code, error.message)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    if error.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}; see /openapi.json"
    elif error.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; see /openapi.json"
    else:
        message = str(error.detail)
    return _message(error.status_code, message, headers=error.headers)


async def _server_error(request: Request, error: Exception) -> JSONResponse:
    # Starlette re-raises after this answer, so the traceback still reaches the log.
    return _message(500, "internal server error: see the server's log")


def create_app(
    engine_or_path: Engine | str | Path,
    api_keys: Mapping[str, str],
    *,
    faults: Faults = NO_FAULTS,
    slice_rows: int = 1000,
    on_slice: Callable[[int, int], None] | None = None,
) -> Starlette:
    """The API as an ASGI app; its lifespan runs the bulk request worker.

    Given a path, the app opens the engine now and closes it at shutdown;
    given an Engine, the caller keeps it. `on_slice(bulk_request_id, rows)`
    is called by the worker after each committed slice. Dropping connections
    (`drop_rate`) takes serve(): served otherwise, a response to drop is sent
    with a private header instead.
    """
    keys = ApiKeys(api_keys)
    if slice_rows < 1:
        raise ValueError(f"slice_rows must be >= 1, not {slice_rows}")
    owned = not isinstance(engine_or_path, Engine)
    engine = Engine.open(engine_or_path) if owned else engine_or_path
    injector = FaultInjector(faults)
    worker = Worker(engine, keys.environments, slice_rows=slice_rows, injector=injector, on_slice=on_slice)
    api = _Api(engine, worker, injector)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)
            if owned:
                engine.close()

    return Starlette(
        routes=api.routes(),
        middleware=[Middleware(_Gate, api_keys=keys, injector=injector)],
        exception_handlers={EngineError: _engine_error, HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )
