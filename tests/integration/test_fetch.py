"""retry.fetch against a local HTTP server, on_failure, and the fragile-api example."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ratchet
from tests.harness import ROOT, Cluster, count_lines, eventually

pytestmark = pytest.mark.timeout(120)


class ScriptedApi:
    """Answers each path from a script of (status, headers) and records request times."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self.requests: dict[str, list[float]] = {}
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.requests.setdefault(self.path, []).append(time.monotonic())
                script = api.scripts.get(self.path, [(404, {})])
                status, headers = script.pop(0) if len(script) > 1 else script[0]
                body = json.dumps({"path": self.path, "status": status}).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def api() -> Iterator[ScriptedApi]:
    a = ScriptedApi()
    try:
        yield a
    finally:
        a.server.shutdown()
        a.server.server_close()


@pytest.fixture
async def worker(cluster: Cluster) -> None:
    w = cluster.start_worker(slots=4)
    await cluster.wait_worker_connected(w)


async def test_503_503_200_succeeds_with_three_attempts(
    cluster: Cluster, worker: None, api: ScriptedApi
) -> None:
    api.scripts["/flaky"] = [(503, {}), (503, {}), (200, {})]
    client = cluster.client()
    run = await client.trigger("fetcher", {"url": f"{api.base}/flaky"})
    final = await client.get((await client.wait(run.id, timeout=30)).id)
    assert final.status == "COMPLETED" and final.output["status"] == 200
    [step] = final.steps
    assert step.attempts == 3 and len(api.requests["/flaky"]) == 3


async def test_404_fails_after_one_attempt(
    cluster: Cluster, worker: None, api: ScriptedApi
) -> None:
    client = cluster.client()
    run = await client.trigger("fetcher", {"url": f"{api.base}/missing"})
    final = await client.get((await client.wait(run.id, timeout=30)).id)
    assert final.status == "FAILED" and final.attempt == 1
    assert final.error is not None and final.error.non_retryable
    assert "HTTP 404" in final.error.message
    assert [s.attempts for s in final.steps] == [1]
    assert len(api.requests["/missing"]) == 1


async def test_429_retry_after_is_honoured(
    cluster: Cluster, worker: None, api: ScriptedApi
) -> None:
    api.scripts["/limited"] = [(429, {"Retry-After": "2"}), (200, {})]
    client = cluster.client()
    run = await client.trigger("fetcher", {"url": f"{api.base}/limited"})
    assert (await client.wait(run.id, timeout=30)).status == "COMPLETED"
    first, second = api.requests["/limited"]
    assert second - first >= 2.0


async def test_sigkill_between_retries_never_exceeds_max_attempts(
    cluster: Cluster, api: ScriptedApi
) -> None:
    api.scripts["/down"] = [(503, {"Retry-After": "3"})]
    a = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(a)
    client = cluster.client()
    # Two run attempts: the kill costs the first; the second must continue the
    # step's count (attempts 2 and 3), not start a fresh budget of three.
    run = await client.trigger("fetcher", {"url": f"{api.base}/down", "attempts": 3},
                               retry=ratchet.Retry(max_attempts=2, min_delay=0.05))
    await eventually(lambda: len(api.requests.get("/down", [])) == 1,
                     what="the first attempt")
    await eventually(lambda: "retrying in" in a.output(), what="the wait between retries")
    a.kill()
    b = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(b)
    final = await client.get((await client.wait(run.id, timeout=60)).id)
    assert final.status == "FAILED" and final.attempt == 2
    assert len(api.requests["/down"]) == 3  # a fresh budget would have made it 4
    assert final.steps[0].attempts == 3 and final.steps[0].status == "FAILED"


async def test_on_failure_runs_once_and_only_for_failed_runs(
    cluster: Cluster, worker: None, tmp_path: Path
) -> None:
    client = cluster.client()
    failed_dir, ok_dir = tmp_path / "failed", tmp_path / "ok"
    failed_dir.mkdir()
    ok_dir.mkdir()
    failed = await client.trigger("hooked", {"dir": str(failed_dir), "fail": 10})
    succeeded = await client.trigger("hooked", {"dir": str(ok_dir), "fail": 2})
    assert (await client.wait(failed.id, timeout=30)).status == "FAILED"
    assert (await client.wait(succeeded.id, timeout=30)).status == "COMPLETED"
    assert count_lines(failed_dir / "attempts") == 3
    assert count_lines(failed_dir / "on_failure") == 1
    assert count_lines(ok_dir / "attempts") == 3
    assert count_lines(ok_dir / "on_failure") == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_fragile_api_example(cluster: Cluster) -> None:
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import fragile_api
    finally:
        sys.path.pop(0)
    server = fragile_api.serve(0)
    try:
        w = cluster.start_worker(str(ROOT / "examples" / "fragile_api.py"))
        await cluster.wait_worker_connected(w)
        client = cluster.client()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        run = await client.trigger("fragile-api", {"base_url": base})
        final = await client.get((await client.wait(run.id, timeout=60)).id)
        assert final.status == "COMPLETED", final
        assert final.output["critical_data"] == {"path": "/critical", "calls": 3}
        assert [s.attempts for s in final.steps] == [3, 1]
    finally:
        server.shutdown()
        server.server_close()


async def test_a_long_retry_after_suspends_the_run(
    cluster: Cluster, api: ScriptedApi, tmp_path: Path
) -> None:
    """Retry-After beyond the worker's sleep threshold (5 s) frees the slot."""
    api.scripts["/slow"] = [(503, {"Retry-After": "8"}), (200, {})]
    w = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(w)
    client = cluster.client()
    run = await client.trigger("fetcher", {"url": f"{api.base}/slow"})

    async def waiting() -> bool:
        return (await client.get(run.id)).status == "WAITING"

    await eventually(waiting, what="the run to suspend between retries")
    other = await client.trigger("busy", {"dir": str(tmp_path)})
    assert (await client.wait(other.id, timeout=20)).status == "COMPLETED"
    final = await client.get((await client.wait(run.id, timeout=60)).id)
    assert final.status == "COMPLETED" and final.attempt == 1
    assert final.steps[0].attempts == 2
    first, second = api.requests["/slow"]
    assert second - first >= 8.0
