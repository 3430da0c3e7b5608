"""ListRuns returns summaries; a page never outgrows the 16 MiB a client accepts."""

from __future__ import annotations

import json

import grpc
import pytest

from ratchet.v1 import run_pb2, run_pb2_grpc
from tests.harness import Cluster, run_cli_async

pytestmark = pytest.mark.timeout(240)

RUNS = 20
NAME = "x" * 1_000_000  # payload and output of about 1 MB each


async def test_twenty_runs_with_1mb_outputs_list_in_one_page(cluster: Cluster) -> None:
    """20 runs with 1 MB payloads and outputs used to exceed the 16 MiB reply:
    `Client.list`, `ratchet runs list` and bulk replay all failed."""
    worker = cluster.start_worker()
    await cluster.wait_worker_connected(worker)
    client = cluster.client("client")
    runs = [await client.trigger("greet", {"name": NAME}) for _ in range(RUNS)]
    for run in runs:
        await client.wait(run.id, timeout=60)
    assert len((await client.get(runs[0].id)).output) == len(NAME) + 6  # GetRun: whole run

    page, token = await client.list()
    assert token == "" and sorted(r.id for r in page) == sorted(r.id for r in runs)
    assert all(r.payload is None and r.output is None and r.status == "COMPLETED"
               for r in page)

    listed = await run_cli_async("runs", "list", env=cluster.cli_env("client"))
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == RUNS
    as_json = await run_cli_async("runs", "list", "--json", env=cluster.cli_env("client"))
    assert as_json.returncode == 0 and len(json.loads(as_json.stdout)) == RUNS

    # The full view pages by size: every reply stays under the limit, and
    # following the tokens yields every run exactly once, bodies included.
    seen: list[str] = []
    sizes: list[int] = []
    token = ""
    async with grpc.aio.insecure_channel(cluster.address, options=[
            ("grpc.max_receive_message_length", 16 * 1024 * 1024)]) as channel:
        stub = run_pb2_grpc.RunServiceStub(channel)
        while True:
            reply = await stub.ListRuns(
                run_pb2.ListRunsRequest(page_size=1000, page_token=token,
                                        view=run_pb2.RUN_VIEW_FULL),
                metadata=(("authorization", f"Bearer {cluster.key('client')}"),))
            sizes.append(reply.ByteSize())
            assert all(len(r.output) > 1_000_000 for r in reply.runs)
            seen += [r.id for r in reply.runs]
            token = reply.next_page_token
            if not token:
                break
    assert sorted(seen) == sorted(r.id for r in runs)
    assert len(sizes) > 1 and max(sizes) < 12 * 1024 * 1024, sizes

    # Bulk replay lists summaries before replaying each run.
    replayed = await run_cli_async("runs", "replay", "--task", "greet", "--status",
                                   "COMPLETED", "--from-scratch",
                                   env=cluster.cli_env("client"))
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed {RUNS} of {RUNS} run(s)" in replayed.stdout
