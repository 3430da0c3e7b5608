"""The coordinator's HTTP port (Starlette on uvicorn): a health check, and
the completion URLs of wait tokens. Like the gRPC servicers it translates
and delegates: every rule is in the engine. Later: /metrics, the dashboard.

`POST /v1/tokens/{token_id}/complete/{secret}` with a JSON body completes a
token created with CreateToken (no API key: the secret is the credential):

- 200 `{"completed": true, "token_id", "status": "COMPLETED", "run_id"}`;
- 409 `{"completed": false, "token_id", "status", "message"}` when it changes
  nothing: the token was completed already (the same POST twice), timed
  out, or the run waiting on it has ended;
- 404 for an unknown token or a wrong secret (the same answer for both);
- 400 for a body that is not JSON, 413 for one over 1 MiB, 503 when the
  database cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ratchet_server import clock
from ratchet_server.engine import errors
from ratchet_server.engine import tokens as token_rules
from ratchet_server.engine.core import MAX_PAYLOAD_BYTES
from ratchet_server.store import StoreUnavailable

if TYPE_CHECKING:
    from ratchet_server.engine.engine import Engine

log = logging.getLogger("ratchet.http")

COMPLETE_PATH = "/v1/tokens/{token_id}/complete/{secret}"


def token_url(base: str, token_id: str, secret: str) -> str:
    """The URL that completes a token: the coordinator's public HTTP base
    (`--public-url`), the token's id and its secret."""
    return base.rstrip("/") + COMPLETE_PATH.format(token_id=token_id, secret=secret)


def build_app(engine: Engine) -> Starlette:
    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def complete(request: Request) -> Response:
        token_id = request.path_params["token_id"]
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_PAYLOAD_BYTES:
            return _error(413, f"the body is over {MAX_PAYLOAD_BYTES} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_PAYLOAD_BYTES:
                return _error(413, f"the body is over {MAX_PAYLOAD_BYTES} bytes")
        try:
            done, why = await engine.complete_token_url(
                token_id, request.path_params["secret"], bytes(body))
        except errors.NotFound:
            return _error(404, "no such token URL")
        except errors.ResourceExhausted as exc:
            return _error(413, str(exc))
        except errors.InvalidArgument as exc:
            return _error(400, str(exc))
        except StoreUnavailable as exc:
            log.warning("token completion over HTTP: %s", exc)
            return _error(503, "the database is unavailable; try again")
        status = token_rules.status_of(done, clock.now())
        answer: dict[str, Any] = {"completed": done.completed, "token_id": token_id,
                                  "status": status.value}
        if done.token.run_id:
            answer["run_id"] = done.token.run_id
        if not done.completed:
            answer["message"] = why
        return JSONResponse(answer, status_code=200 if done.completed else 409)

    return Starlette(routes=[
        Route("/", healthz, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route(COMPLETE_PATH, complete, methods=["POST"]),
    ])


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


class _Server(uvicorn.Server):
    """uvicorn inside the coordinator's event loop: the coordinator owns the
    process's signals (it shuts everything down in order), so uvicorn must
    not install handlers of its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """The HTTP port: `await start()`, then `await stop()`."""

    def __init__(self, engine: Engine, host: str, port: int) -> None:
        self._app = build_app(engine)
        self._host, self._port = host, port
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        # The socket is bound here so that a port in use is an OSError for
        # the caller (uvicorn would exit the process).
        sock = socket.create_server((self._host, self._port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._app, lifespan="off", log_config=None, access_log=False,
                                timeout_graceful_shutdown=2)
        # Its start and stop lines repeat what the coordinator logs itself.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]),
                                         name="ratchet-http")
        while not self._server.started:
            if self._task.done():
                await self._task
                raise OSError(f"HTTP server on {self._host}:{self._port} did not start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._server = None
