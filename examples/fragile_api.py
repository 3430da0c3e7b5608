"""The `fragileApiCall` task of the article, written with Ratchet.

A task-level policy (5 attempts, factor 3, 2 s to 60 s), one fetch with its
own generous budget (10 attempts, factor 1.5) and one that fails fast (a
single attempt). Run it against the local flaky API this file also serves:

    python examples/fragile_api.py serve 8765 &      # a local API: 503, 503, then 200
    ratchet dev --worker examples/fragile_api.py
    ratchet trigger fragile-api --payload '{"base_url": "http://127.0.0.1:8765"}' --wait
"""

from __future__ import annotations

import http.server
import json
import sys
import threading
from typing import Any

import pydantic

import ratchet


class Api(pydantic.BaseModel):
    base_url: str


async def report_failure(ctx: ratchet.Context, error: ratchet.RunError) -> None:
    ctx.logger.error("fragile-api gave up: %s: %s", error.type, error.message)


@ratchet.task(
    id="fragile-api",
    retry=ratchet.Retry(max_attempts=5, factor=3, min_delay=2.0, max_delay=60.0),
    on_failure=report_failure,
)
async def fragile_api_call(ctx: ratchet.Context, payload: Api) -> dict[str, Any]:
    # This call has different retry rules: a generous budget.
    critical = await ratchet.retry.fetch(
        f"{payload.base_url}/critical",
        retry=ratchet.Retry(max_attempts=10, factor=1.5, min_delay=0.2, max_delay=5.0),
    )
    # This one fails fast.
    metadata = await ratchet.retry.fetch(
        f"{payload.base_url}/metadata", retry=ratchet.Retry(max_attempts=1, min_delay=0.0,
                                                            max_delay=0.0))
    return {"critical_data": critical.json(), "metadata": metadata.json()}


def serve(port: int) -> http.server.ThreadingHTTPServer:
    """A local API: /critical answers 503 twice, then 200; /metadata always 200."""
    calls: dict[str, int] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            calls[self.path] = calls.get(self.path, 0) + 1
            if self.path == "/critical" and calls[self.path] <= 2:
                self._send(503, {"error": "busy"})
            elif self.path in ("/critical", "/metadata"):
                self._send(200, {"path": self.path, "calls": calls[self.path]})
            else:
                self._send(404, {"error": "not found"})

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve(int(sys.argv[2])).serve_forever()
