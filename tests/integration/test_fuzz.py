"""Every RunService RPC, driven with random and malformed fields (hypothesis).

Against a real coordinator process on each store: no answer is UNKNOWN or
INTERNAL (or anything but the documented codes), every reply reads back, and
a refused call changes nothing (the runs, their statuses, attempts, discard
marks and the history of the run it named are the same before and after).

No worker runs while the fuzzer does (one ran first, to register the tasks and
leave runs in every kind of state), so nothing else changes the store meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratchet.v1 import common_pb2, run_pb2, run_pb2_grpc
from tests.harness import Cluster, eventually

pytestmark = pytest.mark.timeout(300)

EXAMPLES = 2000
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION}
TASKS = ["typed-order", "greet", "approval", "no-such-task"]

# --- field strategies: mostly odd, sometimes right -----------------------------

odd_text = st.one_of(
    st.text(max_size=12),
    st.text(alphabet=st.sampled_from("ab\x00|.-_ é"), max_size=8),
    st.sampled_from(["", "\x00", "a\x00b", "x" * 300, "x" * 5000, "run_", "tok_"]),
)


def names(known: list[str]) -> st.SearchStrategy[str]:
    """One of `known` (which may grow between examples) or odd text."""
    return st.one_of(st.integers(0, 10**6).map(lambda i: known[i % len(known)]), odd_text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                         allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                  max_size=3),
    max_leaves=8)


@st.composite
def deep_json(draw: st.DrawFn) -> bytes:
    n = draw(st.sampled_from([63, 64, 65, 1000, 100_000]))
    open_, close = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    return (open_ * n + "1" + close * n).encode()


json_bytes = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.just(b'{"order_id": "A", "quantity": 1}'),
    st.just(b'{"name": "fuzz"}'),
    deep_json(),
    st.sampled_from([b"", b"null", b"{", b"NaN", b"[Infinity]", b"1e999", b"1" * 5000,
                     b'"\\u0000"', b'"\\\\u0000"', b'{"a\\u0000": 1}', b'"\x00"', b"\xff\xfe",
                     b'{"name": "\\ud800"}', b"[" * 70 + b"]" * 69]),
    st.binary(max_size=16),
)

int64 = st.integers(-(2**63), 2**63 - 1)
durations = st.one_of(
    st.none(),
    st.builds(lambda s: duration_pb2.Duration(seconds=s), st.integers(-100, 10**6)),
    st.builds(lambda s, n: duration_pb2.Duration(seconds=s, nanos=n),
              st.integers(-(10**13), 10**13), st.integers(-999_999_999, 999_999_999)),
    st.builds(lambda s: duration_pb2.Duration(seconds=s), int64),
)
timestamps = st.one_of(
    st.none(),
    st.builds(lambda s: timestamp_pb2.Timestamp(seconds=s),
              st.integers(0, 2_000_000_000)),
    st.builds(lambda s, n: timestamp_pb2.Timestamp(seconds=s, nanos=n),
              int64, st.integers(-(2**31), 2**31 - 1)),
)
retries = st.one_of(st.none(), st.builds(
    lambda a, f, lo, hi, j: common_pb2.RetryPolicy(
        max_attempts=a, factor=f, jitter=j,
        **({"min_delay": lo} if lo is not None else {}),
        **({"max_delay": hi} if hi is not None else {})),
    st.integers(0, 2**32 - 1), st.floats(width=32), durations, durations, st.booleans()))


@st.composite
def trigger_options(draw: st.DrawFn) -> run_pb2.TriggerOptions | None:
    if draw(st.booleans()):
        return None
    opts = run_pb2.TriggerOptions(
        idempotency_key=draw(st.one_of(st.just(""), odd_text)),
        priority=draw(st.one_of(st.integers(-1001, 1001), st.integers(-(2**31), 2**31 - 1))),
        queue=draw(st.one_of(st.just(""), odd_text)),
        concurrency_key=draw(st.one_of(st.just(""), odd_text)),
        tags=draw(st.lists(odd_text, max_size=4) | st.just(["t"] * 70)),
        metadata=draw(st.dictionaries(odd_text, odd_text, max_size=3)
                      | st.just({f"k{i}": "v" for i in range(70)})))
    for field in ("idempotency_key_ttl", "delay", "ttl", "max_duration"):
        value = draw(durations)
        # A short TTL would expire runs behind the fuzzer's back.
        if field == "ttl" and value is not None and 0 <= value.seconds < 3600:
            value = duration_pb2.Duration(seconds=3600)
        if value is not None:
            getattr(opts, field).CopyFrom(value)
    retry = draw(retries)
    if retry is not None:
        opts.retry.CopyFrom(retry)
    return opts


def statuses() -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, 12), max_size=3)


@st.composite
def requests(draw: st.DrawFn, pool: dict[str, list[str]]) -> tuple[str, Any]:
    run_ids = names(pool["runs"])
    rpc = draw(st.sampled_from(["Trigger", "BatchTrigger", "GetRun", "ListRuns", "CancelRun",
                                "GetRunHistory", "ReplayRun", "RetryRun", "DiscardRun",
                                "CompleteToken", "CreateToken", "GetToken", "ListTokens",
                                "ListTasks", "ListWorkers"]))
    if rpc == "Trigger":
        return rpc, run_pb2.TriggerRequest(task_id=draw(names(TASKS)),
                                           payload=draw(json_bytes),
                                           options=draw(trigger_options()))
    if rpc == "BatchTrigger":
        n = draw(st.sampled_from([0, 1, 2, 3, 1001]))
        item = run_pb2.BatchTriggerItem(task_id=draw(names(TASKS)), payload=draw(json_bytes),
                                        options=draw(trigger_options()))
        good = run_pb2.BatchTriggerItem(task_id="greet", payload=b'{"name": "b"}')
        return rpc, run_pb2.BatchTriggerRequest(items=[good] * max(0, n - 1) + [item] * min(n, 1))
    if rpc == "GetRun":
        return rpc, run_pb2.GetRunRequest(run_id=draw(run_ids))
    if rpc == "ListRuns":
        request = run_pb2.ListRunsRequest(
            statuses=draw(statuses()), task_id=draw(st.one_of(st.just(""), names(TASKS))),
            page_size=draw(st.integers(0, 2**32 - 1)),
            page_token=draw(st.one_of(
                st.just(""), odd_text,
                st.builds(lambda f, i: f"{f}|{i}", st.floats(), run_ids),
                st.sampled_from(["nan|x", "inf|x", "-inf|x", "1e400|x", "9" * 400 + "|x"]))),
            tag=draw(st.one_of(st.just(""), odd_text)),
            parent_run_id=draw(st.one_of(st.just(""), run_ids)),
            error_type=draw(st.one_of(st.just(""), odd_text)),
            include_discarded=draw(st.booleans()), view=draw(st.integers(0, 5)))
        for field in ("created_after", "created_before"):
            value = draw(timestamps)
            if value is not None:
                getattr(request, field).CopyFrom(value)
        return rpc, request
    if rpc == "CancelRun":
        return rpc, run_pb2.CancelRunRequest(run_id=draw(run_ids), reason=draw(odd_text))
    if rpc == "GetRunHistory":
        return rpc, run_pb2.GetRunHistoryRequest(
            run_id=draw(run_ids), page_size=draw(st.integers(0, 2**32 - 1)),
            page_token=draw(st.one_of(st.just(""), odd_text, int64.map(str),
                                      st.integers(2**63, 2**80).map(str))))
    if rpc == "ReplayRun":
        return rpc, run_pb2.ReplayRunRequest(run_id=draw(run_ids),
                                             from_scratch=draw(st.booleans()))
    if rpc == "RetryRun":
        return rpc, run_pb2.RetryRunRequest(run_id=draw(run_ids), payload=draw(json_bytes))
    if rpc == "DiscardRun":
        return rpc, run_pb2.DiscardRunRequest(run_id=draw(run_ids))
    if rpc == "CreateToken":
        request = run_pb2.CreateTokenRequest(
            idempotency_key=draw(st.one_of(st.just(""), odd_text, st.just("k" * 300))),
            tags=draw(st.lists(odd_text, max_size=4) | st.just(["t"] * 70)))
        timeout = draw(durations)
        if timeout is not None:
            request.timeout.CopyFrom(timeout)
        return rpc, request
    if rpc == "GetToken":
        return rpc, run_pb2.GetTokenRequest(token_id=draw(names(pool["tokens"])))
    if rpc == "ListTokens":
        return rpc, run_pb2.ListTokensRequest(
            run_id=draw(st.one_of(st.just(""), run_ids)), statuses=draw(statuses()),
            tags=draw(st.lists(odd_text, max_size=3)),
            page_size=draw(st.integers(0, 2**32 - 1)),
            page_token=draw(st.one_of(
                st.just(""), odd_text,
                st.sampled_from(["nan|x", "inf|x", "1e400|x", "9" * 400 + "|x"]))))
    if rpc == "ListTasks":
        return rpc, run_pb2.ListTasksRequest(task_id=draw(st.one_of(names(TASKS), odd_text)))
    if rpc == "ListWorkers":
        return rpc, run_pb2.ListWorkersRequest(task_id=draw(st.one_of(names(TASKS), odd_text)))
    return rpc, run_pb2.CompleteTokenRequest(token_id=draw(names(pool["tokens"])),
                                             data=draw(json_bytes))


# --- the driver ------------------------------------------------------------------


class Driver:
    """Sync gRPC calls (hypothesis runs in a thread) and what the store holds."""

    def __init__(self, address: str, key: str) -> None:
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024)])
        self.stub = run_pb2_grpc.RunServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {key}"),)
        self.codes: Counter[str] = Counter()

    def call(self, rpc: str, request: Any) -> tuple[grpc.StatusCode, Any, str]:
        try:
            reply = getattr(self.stub, rpc)(request, metadata=self.metadata, timeout=30)
        except grpc.RpcError as exc:
            return exc.code(), None, exc.details() or ""
        return grpc.StatusCode.OK, reply, ""

    def runs(self) -> dict[str, tuple[int, int, bool]]:
        """Every run: status, attempt, discarded. An EXPIRED run counts as
        QUEUED: a TTL may end while the fuzzer runs (nothing else moves)."""
        found: dict[str, tuple[int, int, bool]] = {}
        token = ""
        while True:
            code, reply, details = self.call("ListRuns", run_pb2.ListRunsRequest(
                page_size=1000, page_token=token, include_discarded=True))
            assert code == grpc.StatusCode.OK, details
            for r in reply.runs:
                status = (common_pb2.RUN_STATUS_QUEUED if r.status == common_pb2.RUN_STATUS_EXPIRED
                          else r.status)
                found[r.id] = (status, r.attempt, r.HasField("discarded_at"))
            token = reply.next_page_token
            if not token:
                return found

    def history(self, run_id: str) -> int:
        code, reply, _ = self.call("GetRunHistory", run_pb2.GetRunHistoryRequest(
            run_id=run_id, page_size=1000))
        return len(reply.events) if code == grpc.StatusCode.OK else -1


def fuzz(driver: Driver, pool: dict[str, list[str]]) -> None:
    state = {"runs": driver.runs()}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(requests(pool))
    def one(call: tuple[str, Any]) -> None:
        rpc, request = call
        target = getattr(request, "run_id", "")
        before_history = driver.history(target) if target in state["runs"] else None
        code, reply, details = driver.call(rpc, request)
        driver.codes[code.name] += 1
        assert code in ALLOWED, f"{rpc} answered {code.name}: {details}\n{request}"
        assert "\n" not in details, details
        after = driver.runs()
        if code != grpc.StatusCode.OK:
            assert after == state["runs"], f"refused {rpc} ({code.name}) changed runs"
            if before_history is not None:
                assert driver.history(target) == before_history, f"refused {rpc} wrote history"
        else:
            for run in _runs_in(reply):
                # Whatever was accepted reads back (the 'poison' bug: it did not).
                code, _, details = driver.call("GetRun", run_pb2.GetRunRequest(run_id=run.id))
                assert code == grpc.StatusCode.OK, details
                if run.id not in pool["runs"]:
                    pool["runs"].append(run.id)
            if rpc == "CreateToken":
                # Whatever was created reads back, and can be completed later.
                code, _, details = driver.call("GetToken", run_pb2.GetTokenRequest(
                    token_id=reply.token.id))
                assert code == grpc.StatusCode.OK, details
                pool["tokens"].append(reply.token.id)
        state["runs"] = after

    one()


def _runs_in(reply: Any) -> list[Any]:
    if hasattr(reply, "results"):
        return [r.run for r in reply.results]
    if hasattr(reply, "run") and reply.HasField("run"):
        return [reply.run]
    return []


async def test_fuzz_every_run_rpc(cluster: Cluster, tmp_path: Path) -> None:
    # Runs in every state first: completed, failed, queued, waiting on a token.
    worker = cluster.start_worker()
    await cluster.wait_worker_connected(worker)
    client = cluster.client("client")
    done = await client.trigger("greet", {"name": "a"})
    failed = await client.trigger("greet", {"name": " "})
    waiting = await client.trigger("approval", {"dir": str(tmp_path), "timeout": 3600})
    for run in (done, failed):
        await client.wait(run.id, timeout=30)
    token = await eventually(lambda: (tmp_path / "token").exists()
                             and (tmp_path / "token").read_text(), what="the token")
    await eventually(lambda: _status(client, waiting.id, "WAITING"), what="WAITING")
    worker.terminate()
    queued = await client.trigger("greet", {"name": "q"})
    pool = {"runs": [done.id, failed.id, waiting.id, queued.id], "tokens": [token]}

    driver = Driver(cluster.address, cluster.key("client"))
    started = time.monotonic()
    try:
        await asyncio.to_thread(fuzz, driver, pool)
    finally:
        driver.channel.close()
        print(f"{sum(driver.codes.values())} requests in {time.monotonic() - started:.1f}s: "
              f"{dict(driver.codes)}")
    assert sum(driver.codes.values()) >= EXAMPLES
    assert set(driver.codes) - {"OK"}, "every request was accepted: the fuzzer is too tame"


async def _status(client: Any, run_id: str, status: str) -> bool:
    return bool((await client.get(run_id)).status == status)
