"""Tokens from anywhere (issue 10): created by a client, passed to a run,
listed with it while pending, completed with `curl` on the completion URL;
data validated against a model; a timeout as a value shown as TIMED_OUT."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

import ratchet
from tests.harness import ROOT, Cluster, eventually, run_cli_async

pytestmark = pytest.mark.timeout(120)

TASKS = str(ROOT / "tests" / "integration" / "token_tasks.py")


async def curl(url: str, body: str) -> tuple[int, dict[str, Any]]:
    """POST with the real curl binary; (HTTP status, JSON answer)."""
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["curl", "-sS", "-X", "POST", "-H", "Content-Type: application/json",
             "--data-binary", body, "-w", "\n%{http_code}", url],
            capture_output=True, text=True, timeout=20, check=False)

    done = await asyncio.to_thread(run)
    assert done.returncode == 0, done.stderr
    text, _, code = done.stdout.rpartition("\n")
    return int(code), json.loads(text) if text.strip() else {}


async def status_of(client: ratchet.Client, run_id: str) -> str:
    return str((await client.get(run_id)).status)


async def test_a_client_token_completed_with_curl_resumes_its_run(cluster: Cluster) -> None:
    worker = cluster.start_worker(TASKS, slots=2)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    token = await client.create_token(timeout=600, idempotency_key="order-42",
                                      tags=["approval"])
    assert token.status == "WAITING" and token.url.startswith(
        f"http://127.0.0.1:{cluster.http_port}/v1/tokens/{token.id}/complete/")
    run = await client.trigger("token-approval", {"token_id": token.id})

    async def waiting() -> bool:
        return await status_of(client, run.id) == "WAITING"

    await eventually(waiting, what="the run to wait on the token")
    listed, _ = await client.list_tokens(run_id=run.id, status="WAITING")
    assert [(t.id, t.run_id, t.step_key) for t in listed] == [
        (token.id, run.id, f"token:{token.id}")]
    [step] = [s for s in (await client.get(run.id)).steps if s.kind == "token"]
    assert (step.status, step.token_id) == ("RUNNING", token.id)
    shown = await run_cli_async("runs", "show", run.id,
                                env={"RATCHET_COORDINATOR": cluster.address,
                                     "RATCHET_API_KEY": cluster.key("client")})
    assert f"waiting on token {token.id}" in shown.stdout, shown.stdout

    code, answer = await curl(token.url, '{"approved": true, "by": "ana"}')
    assert (code, answer["completed"], answer["run_id"]) == (200, True, run.id), answer
    final = await client.wait(run.id, timeout=30)
    assert final.status == "COMPLETED" and final.output == {"approved": True, "by": "ana"}

    # The same completion again changes nothing, and says so.
    code, answer = await curl(token.url, '{"approved": false, "by": "bo"}')
    assert code == 409 and answer["completed"] is False
    assert answer["status"] == "COMPLETED" and "already completed" in answer["message"]
    got = await client.get_token(token.id)
    assert got.status == "COMPLETED" and got.data == {"approved": True, "by": "ana"}
    assert got.url == token.url
    # The idempotency key gives the same token back, URL included.
    again = await client.create_token(idempotency_key="order-42")
    assert (again.id, again.url) == (token.id, token.url)
    assert (await client.get(run.id)).output == {"approved": True, "by": "ana"}


async def test_a_token_completed_before_the_run_waits(cluster: Cluster) -> None:
    worker = cluster.start_worker(TASKS, slots=1)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    token = await client.create_token()
    assert await client.complete_token(token.id, {"approved": False, "by": "early"})
    run = await client.trigger("token-approval", {"token_id": token.id})
    final = await client.wait(run.id, timeout=30)
    assert final.status == "COMPLETED" and final.output == {"approved": False, "by": "early"}
    assert (await client.get_token(token.id)).run_id == run.id


async def test_bad_secret_and_bad_json_change_nothing(cluster: Cluster) -> None:
    client = cluster.client()
    token = await client.create_token()
    base, _, secret = token.url.rpartition("/")
    code, answer = await curl(f"{base}/{'x' * len(secret)}", '{"a": 1}')
    assert code == 404 and "error" in answer
    code, _ = await curl(token.url.replace(token.id, "tok_000000000000ffffffffffffffff"),
                         '{"a": 1}')
    assert code == 404
    code, answer = await curl(token.url, '{"a": ')
    assert code == 400 and "JSON" in answer["error"]
    assert (await client.get_token(token.id)).status == "WAITING"
    code, answer = await curl(token.url, "")  # an empty body is null
    assert code == 200 and answer["completed"] is True
    assert (await client.get_token(token.id)).data is None


async def test_get_list_and_bad_requests(cluster: Cluster) -> None:
    client = cluster.client()
    a = await client.create_token(tags=["x", "y"])
    b = await client.create_token(tags=["x"], timeout=0)
    assert [t.id for t in (await client.list_tokens(tags=["x"]))[0]] == [b.id, a.id]
    assert [t.id for t in (await client.list_tokens(tags=["x", "y"]))[0]] == [a.id]
    assert [t.id for t in (await client.list_tokens(status="TIMED_OUT"))[0]] == [b.id]
    assert all(t.url == "" for t in (await client.list_tokens())[0])
    with pytest.raises(ratchet.NotFoundError):
        await client.get_token("tok_missing")
    with pytest.raises(ratchet.InvalidArgumentError):
        await client.create_token(tags=[""])
    # Another environment does not see them.
    other = cluster.client(env="other")
    assert (await other.list_tokens())[0] == []
    with pytest.raises(ratchet.NotFoundError):
        await other.get_token(a.id)
    env = {"RATCHET_COORDINATOR": cluster.address, "RATCHET_API_KEY": cluster.key("client")}
    listed = await run_cli_async("tokens", "list", "--status", "WAITING", env=env)
    assert listed.returncode == 0 and a.id in listed.stdout and b.id not in listed.stdout
    shown = await run_cli_async("tokens", "get", a.id, env=env)
    assert shown.returncode == 0 and a.url in shown.stdout


async def test_a_timeout_as_a_value_is_a_timed_out_step(cluster: Cluster) -> None:
    worker = cluster.start_worker(TASKS, slots=2)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    token = await client.create_token(timeout=1.5)
    run = await client.trigger("token-or-timeout", {"token_id": token.id})
    in_run = await client.trigger("in-run-token-or-timeout", {"timeout": 1.5})
    for r in (run, in_run):
        final = await client.wait(r.id, timeout=30)
        assert final.status == "COMPLETED", final
        assert final.output["ok"] is False and final.output["timed_out"] is True
        [step] = [s for s in (await client.get(r.id)).steps if s.kind == "token"]
        assert step.status == "TIMED_OUT" and step.error is not None
        assert step.error.type == "ratchet.TokenTimeoutError"
    assert (await client.get_token(token.id)).status == "TIMED_OUT"
    code, answer = await curl((await client.get_token(token.id)).url, "{}")
    assert code == 409 and answer["status"] == "TIMED_OUT"


async def test_data_that_does_not_fit_the_model_fails_naming_the_step(
        cluster: Cluster, tmp_path: Path) -> None:
    worker = cluster.start_worker(TASKS, slots=1)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    token = await client.create_token()
    await client.complete_token(token.id, {"approved": "perhaps"})
    run = await client.trigger("token-approval", {"token_id": token.id})
    final = await client.wait(run.id, timeout=30)
    assert final.status == "FAILED" and final.error is not None
    assert final.error.type == "ratchet.TokenDataError"
    assert f"token step 'token:{token.id}'" in final.error.message
    assert final.error.non_retryable and final.attempt == 1
