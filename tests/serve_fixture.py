"""`loader serve` as a real subprocess, for any test that needs an EndClose-like server.

    from serve_fixture import running_server
    with running_server(tmp_path, api_keys={"k": "default"}, extra_args=("--latency", "50")) as server:
        httpx.get(f"{server.url}/data_streams", headers={"X-API-KEY": "k"})

or use the `serve` fixture (import it into the test module) for one default server.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

READY = re.compile(r"^loader serve listening on (http://\S+)$")
START_TIMEOUT = 60  # seconds; start-up is about one, but a loaded CI machine is slow
STOP_TIMEOUT = 30


@dataclass
class RunningServer:
    """A `loader serve` process: `url` is the API's base URL, with /v1."""

    url: str
    database: Path
    process: subprocess.Popen
    api_keys: Mapping[str, str]
    stderr_path: Path
    stopped_by_test: bool = False

    @property
    def root(self) -> str:
        """The server's address without /v1 (where /openapi.json is)."""
        return self.url.removesuffix("/v1")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop the server now with `sig`; its exit code."""
        self.stopped_by_test = True
        return stop_server(self.process, self.stderr_path, sig)


def _fail(message: str, stderr_path: Path) -> None:
    stderr = stderr_path.read_text(errors="replace") if stderr_path.exists() else ""
    pytest.fail(f"{message}\n--- loader serve stderr ---\n{stderr}", pytrace=False)


def _wait_ready(process: subprocess.Popen, stderr_path: Path) -> str:
    """Read stdout until the listening line; fail with the server's stderr if it never comes."""
    deadline = time.monotonic() + START_TIMEOUT
    fd = process.stdout.fileno()
    pending = b""
    seen: list[str] = []
    # Raw reads on the descriptor: a buffered readline could hold the line
    # while select() waits for more.
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _fail(f"loader serve did not report listening within {START_TIMEOUT}s; stdout: {seen}", stderr_path)
            if not selector.select(remaining):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:  # EOF: the process is gone
                process.wait(STOP_TIMEOUT)
                _fail(f"loader serve exited with {process.returncode} before listening; stdout: {seen}",
                      stderr_path)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").rstrip("\r")
                match = READY.match(text)
                if match:
                    return match.group(1)
                seen.append(text)


def stop_server(process: subprocess.Popen, stderr_path: Path, sig: int = signal.SIGTERM) -> int:
    """Stop the server with `sig`; its exit code. Fails if it does not stop in time."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            _fail(f"loader serve did not stop within {STOP_TIMEOUT}s of signal {sig}", stderr_path)
    if process.stdout is not None:
        process.stdout.close()
    return process.returncode


@contextmanager
def running_server(
    tmp_path: Path,
    *,
    api_keys: Mapping[str, str] = {"test-key": "default"},
    extra_args: Sequence[str] = (),
) -> Iterator[RunningServer]:
    """Run `python -m loader serve --port 0` on `tmp_path/serve.duckdb` for the `with` block.

    Fails loudly (with the server's stderr) if the server does not start, dies
    during the block, does not stop cleanly on SIGTERM, or logged a traceback.
    """
    database = tmp_path / "serve.duckdb"
    stderr_path = tmp_path / f"serve-{time.monotonic_ns()}.stderr"
    command = [sys.executable, "-m", "loader", "serve", "--database", str(database), "--port", "0"]
    for key, environment in api_keys.items():
        command += ["--api-key", f"{key}={environment}"]
    command += list(extra_args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(stderr_path, "wb") as stderr:
        # stderr goes to a file: a pipe nobody reads could fill up and stall the server.
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, env=env)
    try:
        url = _wait_ready(process, stderr_path)
        server = RunningServer(f"{url}/v1", database, process, dict(api_keys), stderr_path)
        yield server
        if process.poll() is not None and not server.stopped_by_test:
            _fail(f"loader serve died during the test (exit code {process.returncode})", stderr_path)
    finally:
        code = stop_server(process, stderr_path)
    if code != 0:
        _fail(f"loader serve exited with {code} on SIGTERM instead of stopping cleanly", stderr_path)
    if "Traceback" in stderr_path.read_text(errors="replace"):
        _fail("loader serve logged an exception", stderr_path)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[RunningServer]:
    """One `loader serve` with the key `test-key` for the environment `default`."""
    with running_server(tmp_path) as server:
        yield server
