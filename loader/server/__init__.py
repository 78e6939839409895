"""`loader serve`: the local engine behind the EndClose HTTP API (endclose-api.md), under /v1.

    serve         run it on a socket until Ctrl-C / SIGTERM (runner.py)
    create_app    the ASGI app, for in-process use (app.py)
    Faults        fault injection settings, all off by default (faults.py)

Modules: app (routes, the auth and fault gate), auth (API keys), faults,
worker (the thread applying bulk requests), openapi (the document), runner
(uvicorn, dropped connections).
"""

from .app import create_app
from .faults import Faults
from .runner import serve

__all__ = ["Faults", "create_app", "serve"]
