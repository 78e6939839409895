"""`serve()`: the app behind uvicorn on a real socket, with connections that can really drop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable, Mapping
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loader.engine import Engine
from loader.errors import ConfigError

from .app import DROP_HEADER, create_app
from .faults import NO_FAULTS, Faults

_DROP_HEADER = DROP_HEADER.encode()


class _DropConnections:
    """Closes the TCP connection instead of sending a response the app marked with DROP_HEADER.

    The app has already committed the request, so the client sees what a
    network failure after the commit looks like: no HTTP response at all.
    ASGI has no way to say this, so the connection is found in uvicorn's
    server state by the client's address and its transport aborted.
    """

    def __init__(self, app: ASGIApp):
        self.app = app
        self.server_state: uvicorn.server.ServerState | None = None

    def _abort(self, client: tuple[str, int] | None) -> bool:
        if self.server_state is None or client is None:
            return False
        for connection in list(self.server_state.connections):
            if getattr(connection, "client", None) == tuple(client):
                connection.transport.abort()
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        dropped = False

        async def send_or_drop(message: Message) -> None:
            nonlocal dropped
            if dropped:
                return
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if any(name.lower() == _DROP_HEADER for name, _ in headers):
                    dropped = self._abort(scope.get("client"))
                    if dropped:
                        return
                    message = {**message, "headers": [h for h in headers if h[0].lower() != _DROP_HEADER]}
            await send(message)

        await self.app(scope, receive, send_or_drop)
        if dropped:
            # Wait for uvicorn to notice the closed connection; returning before
            # it does makes it answer 500 into the dead socket and log an error.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_disconnected(receive), timeout=5)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_ready: Callable[[str], None] | None, url: str):
        super().__init__(config)
        self.on_ready = on_ready
        self.url = url

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit and self.on_ready is not None:
            self.on_ready(self.url)

    def handle_exit(self, sig: int, frame) -> None:
        # uvicorn re-raises a caught signal after shutting down, and a re-raised
        # SIGTERM kills the process before serve() closes the engine: a graceful
        # stop is all either signal asks for. A second Ctrl-C still forces it.
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ConfigError([("--host", f"cannot resolve {host!r}: {error.strerror}")]) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        message = f"cannot listen on {host}:{port}: {error.strerror}"
        if error.errno == errno.EADDRINUSE:
            message += "; pick another with --port (0 picks a free one)"
        raise ConfigError([("--port", message)]) from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(
    database: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_keys: Mapping[str, str],
    faults: Faults = NO_FAULTS,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the engine at `database` over HTTP until Ctrl-C or SIGTERM.

    `port=0` picks a free port; `on_ready(url)` is called with the real one
    once the server accepts connections. Raises LockedError when another
    process holds the database, ConfigError for a bad key, fault or address.
    """
    engine = Engine.open(database)
    try:
        app = _DropConnections(create_app(engine, api_keys, faults=faults))
        sock = _bind(host, port)
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            ws="none",
            proxy_headers=False,  # scope["client"] must be the peer: the drop looks the connection up by it
            server_header=False,
            timeout_graceful_shutdown=10,
        )
        server = _Server(config, on_ready, _url(sock))
        app.server_state = server.server_state
        server.run(sockets=[sock])
    finally:
        engine.close()
