"""The EndClose API over httpx: the key, timeouts, the connection pool, retries, and loader errors.

`ApiClient.request` is the one place the HTTP target reaches the network.
httpx's own exceptions carry the request, and with it the X-API-KEY header,
so none of them leaves this module: each becomes a retry or a loader error
whose message holds no header.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from typing import Any

import httpx
from pydantic import SecretStr
from tenacity import RetryCallState

from ..errors import AuthenticationError, TerminalTargetError
from .http_retry import TRANSPORT_ERRORS, RetryPolicy, TransientError, transient_answer, transport_failure

log = logging.getLogger("loader")

_MAX_MESSAGE = 500


class ApiClient:
    """One httpx.Client (thread-safe, shared by the target's workers) and the retry policy."""

    def __init__(self, base_url: str, api_key: SecretStr, *, concurrency: int = 4, timeout_seconds: float = 30.0,
                 transport: httpx.BaseTransport | None = None, retry: RetryPolicy | None = None):
        self.base_url = base_url.rstrip("/")
        self.origin = httpx.URL(self.base_url).copy_with(path="/", query=None, fragment=None)
        self.retry = retry or RetryPolicy()
        self._secret = api_key.get_secret_value()
        self._client = httpx.Client(
            headers={"X-API-KEY": self._secret, "Accept": "application/json"},
            timeout=httpx.Timeout(timeout_seconds),  # connect, read, write and pool alike
            # One connection per request in flight: workers never queue for the pool.
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            transport=transport,
            follow_redirects=False,  # a redirect could carry the key to another host
        )

    def __repr__(self) -> str:
        return f"ApiClient({self.base_url!r})"

    def url(self, path: str) -> str:
        """An API path (`/records/bulk`) under the base URL."""
        return f"{self.base_url}/{path.lstrip('/')}"

    def resolve(self, url: str) -> str:
        """A URL the API answered (`/v1/bulk_requests/7`), against the server's origin.

        Refuses another origin: the key is sent with every request.
        """
        resolved = self.origin.join(url)
        if (resolved.scheme, resolved.host, resolved.port) != (self.origin.scheme, self.origin.host, self.origin.port):
            raise TerminalTargetError(
                f"the API answered a URL on another server ({resolved.scheme}://{resolved.host}); "
                f"refusing to send the key there: check target.base_url ({self.base_url})"
            )
        return str(resolved)

    def request(self, method: str, url: str, *, what: str, params: Mapping[str, Any] | None = None,
                content: bytes | None = None, headers: Mapping[str, str] | None = None,
                context: Mapping[str, Any] | None = None, abort: threading.Event | None = None,
                attempts: list[int] | None = None) -> httpx.Response:
        """Send until a final answer; return it when 2xx.

        Transient failures (transport errors, 408, 429, 5xx) are retried with the
        same body and headers; 401 raises AuthenticationError; other answers
        raise TerminalTargetError with the API's message. `what` names the call
        in errors; `context` (chunk, idempotency_key) goes into the retry log;
        `attempts`, when given, gets one entry per try.
        """

        def attempt() -> httpx.Response:
            if attempts is not None:
                attempts.append(len(attempts) + 1)
            try:
                response = self._client.request(method, url, params=params, content=content, headers=headers)
            except TRANSPORT_ERRORS as exc:
                failure: Exception = transport_failure(exc)
            except httpx.HTTPError as exc:  # an invalid URL, an unsupported scheme: retrying cannot help
                failure = TerminalTargetError(f"{what}: {self._redact(transport_failure(exc).reason)}")
            else:
                failure = transient_answer(response) or self._refusal(response, what)
                if failure is None:
                    return response
            raise failure  # outside the except blocks: no chain back to the httpx request

        return self.retry.call(attempt, what=what, abort=abort, before_sleep=self._log_retry(what, context))

    def get_json(self, url: str, *, what: str, params: Mapping[str, Any] | None = None,
                 context: Mapping[str, Any] | None = None, abort: threading.Event | None = None) -> Any:
        return self.parse(self.request("GET", url, what=what, params=params, context=context, abort=abort), what)

    def parse(self, response: httpx.Response, what: str) -> Any:
        """The answer's JSON."""
        try:
            return json.loads(response.content)
        except ValueError:  # not JSON, or not UTF-8
            raise TerminalTargetError(
                f"{what}: the API answered {response.status_code} with a body that is not JSON"
            ) from None

    def close(self) -> None:
        self._client.close()

    # -- errors and logs ---------------------------------------------------------------

    def _refusal(self, response: httpx.Response, what: str) -> Exception | None:
        """The loader error for a final non-2xx answer; None for a success."""
        status = response.status_code
        if 200 <= status < 300:
            return None
        if status == 401:
            return AuthenticationError(
                f"the API refused target.api_key (401): check the key (e.g. the ENDCLOSE_API_KEY variable) "
                f"and target.base_url ({self.base_url})"
            )
        message = self._api_message(response)
        if status in (400, 422):
            return TerminalTargetError(f"{what}: the API refused it ({status}): {message}")
        return TerminalTargetError(f"{what}: unexpected answer {status} {response.reason_phrase}: {message}")

    def _api_message(self, response: httpx.Response) -> str:
        try:
            body = json.loads(response.content)
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("message") or body.get("error"), str):
            text = body.get("message") or body.get("error")
        else:
            text = response.text
        text = " ".join(str(text).split())[:_MAX_MESSAGE] or "(no message)"
        return self._redact(text)

    def _redact(self, text: str) -> str:
        # A server could echo what it received; the key never reaches a message.
        return text.replace(self._secret, "***") if self._secret else text

    def _log_retry(self, what: str, context: Mapping[str, Any] | None):
        fields = dict(context or {})
        where = "".join(f", {name} {value}" for name, value in fields.items())

        def before_sleep(state: RetryCallState) -> None:
            if not log.isEnabledFor(logging.INFO):
                return
            error = state.outcome.exception() if state.outcome is not None else None
            reason = error.reason if isinstance(error, TransientError) else str(error)
            wait = state.next_action.sleep if state.next_action is not None else 0.0
            log.info(
                "retrying %s%s after attempt %d: %s; waiting %.2fs", what, where, state.attempt_number, reason, wait,
                extra={"event": "retry", "what": what, **fields, "attempt": state.attempt_number,
                       "reason": reason, "wait_seconds": round(wait, 3)},
            )

        return before_sleep
