"""Sagas: the money-transfer example (examples/money_transfer.py) with real
coordinator and worker processes. A transfer whose deposit fails for good
leaves the balances as they were, its refund applied once, the run FAILED
and not retried; replaying it is refused unless forced; and killing the
worker anywhere between withdrawal and refund never creates or loses money.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import ratchet
from tests.harness import ROOT, Cluster, eventually, lines, run_cli_async

pytestmark = pytest.mark.timeout(120)

EXAMPLE = str(ROOT / "examples" / "money_transfer.py")
KILLING = str(ROOT / "tests" / "integration" / "saga_tasks.py")


@pytest.fixture(scope="module")
def bank() -> ModuleType:
    """The example module, imported here to open and read its bank file."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import money_transfer
    finally:
        sys.path.pop(0)
    return money_transfer


def ops_of(bank: ModuleType, path: Path, run_id: str) -> list[tuple[str, str, int]]:
    """(key without the run id, account, amount) of the run's bank operations."""
    return [(op.key.removeprefix(run_id + ":"), op.account, op.amount)
            for op in bank.operations(path) if op.key.startswith(run_id + ":")]


async def test_a_failed_deposit_is_refunded_once_and_the_run_fails_for_good(
    cluster: Cluster, tmp_path: Path, bank: ModuleType
) -> None:
    path = tmp_path / "bank.db"
    bank.open_bank(path)
    before = bank.balances(path)
    worker = cluster.start_worker(EXAMPLE, extra_env={"MONEY_TRANSFER_BANK": str(path)})
    await cluster.wait_worker_connected(worker)
    client = cluster.client()

    ok, frozen, offline = [
        await client.trigger("money-transfer", {"source": "alice", "target": target,
                                                "amount": 30})
        for target in ("bob", "carol", "dave")]
    for run in (ok, frozen, offline):
        await client.wait(run.id, timeout=60)

    # The transfer to an open account moved the money once.
    done = await client.get(ok.id)
    assert done.status == "COMPLETED" and done.attempt == 1
    assert ops_of(bank, path, ok.id) == [("withdraw", "alice", -30), ("deposit", "bob", 30)]

    # Permanent (frozen account) and transient (its bank never answers): both
    # end FAILED on their first attempt, the refund applied exactly once.
    for run, error_type, deposit_attempts in (
            (frozen, "money_transfer.AccountFrozen", 1),
            (offline, "money_transfer.BankUnavailable", 3)):
        final = await client.get(run.id)
        assert final.status == "FAILED" and final.attempt == 1, final
        assert final.error is not None and final.error.type == error_type
        assert final.error.non_retryable and final.error.step_key == "deposit"
        steps = {s.key: s for s in final.steps}
        assert [(k, s.status) for k, s in steps.items()] == [
            ("withdraw", "COMPLETED"), ("deposit", "FAILED"), ("ratchet:failure", "FAILED"),
            ("ratchet:undo:withdraw", "COMPLETED"), ("ratchet:on_failure", "COMPLETED")]
        assert steps["deposit"].attempts == deposit_attempts
        assert steps["ratchet:undo:withdraw"].attempts == 1
        assert ops_of(bank, path, run.id) == [("withdraw", "alice", -30),
                                              ("ratchet:undo:withdraw", "alice", 30)]
    after = bank.balances(path)
    assert after == {**before, "alice": before["alice"] - 30, "bob": before["bob"] + 30}
    assert "transfer failed, withdrawal refunded" in worker.output()

    # Replaying a compensated run is refused, by the CLI (alone and in bulk)
    # and the client; nothing changes.
    env = cluster.cli_env()
    shown = await run_cli_async("runs", "show", frozen.id, env=env)
    assert "ratchet:undo:withdraw" in shown.stdout and "--rerun-compensated" in shown.stdout
    refused = await run_cli_async("runs", "replay", frozen.id, env=env)
    assert refused.returncode != 0
    assert "--rerun-compensated" in refused.stderr and "undo" in refused.stderr
    with pytest.raises(ratchet.ClientError) as info:
        await client.replay(offline.id)
    assert info.value.code == "FAILED_PRECONDITION"
    bulk = await run_cli_async("runs", "replay", "--status", "FAILED", env=env)
    assert "skipped 2 compensated run(s)" in bulk.stdout, (bulk.stdout, bulk.stderr)
    for run in (frozen, offline):
        assert (await client.get(run.id)).status == "FAILED"
    assert bank.balances(path) == after

    # Forced, the replay goes forward from the last checkpoint: the failed
    # deposit runs again (the account is still frozen), the completed
    # withdrawal and its refund are not redone.
    forced = await run_cli_async("runs", "replay", frozen.id, "--rerun-compensated", env=env)
    assert forced.returncode == 0, forced.stderr
    again = await client.wait(frozen.id, timeout=60)
    assert again.status == "FAILED" and again.error is not None
    assert again.error.type == "money_transfer.AccountFrozen"
    assert ops_of(bank, path, frozen.id) == [("withdraw", "alice", -30),
                                             ("ratchet:undo:withdraw", "alice", 30)]
    assert bank.balances(path) == after


# --- SIGKILL anywhere between withdrawal and refund ---------------------------------------

TARGETS = {"erin": "open", "frank": "open", "carol": "frozen", "dave": "offline"}
SOURCES = ("alice", "bob")


def plan(transfers: int, points: tuple[str, ...]) -> list[dict[str, Any]]:
    """Transfers that together visit every kill point that applies to them:
    amount % len(points) names the point (saga_tasks.point_of)."""
    applies = {
        "open": ("none", "before withdraw", "after withdraw", "before deposit",
                 "after deposit"),
        "failing": ("none", "before withdraw", "after withdraw", "before deposit",
                    "before refund", "after refund"),
    }
    out = []
    targets = list(TARGETS)
    for i in range(transfers):
        target = targets[i % len(targets)]
        kind = "open" if TARGETS[target] == "open" else "failing"
        choices = applies[kind]
        point = choices[(i // len(targets)) % len(choices)]
        amount = 7 * (1 + i) * len(points) + points.index(point)
        out.append({"source": SOURCES[i % 2], "target": target, "amount": amount})
    return out


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(150)
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_sigkill_between_withdrawal_and_refund_never_creates_or_loses_money(
    cluster: Cluster, tmp_path: Path, bank: ModuleType
) -> None:
    sys.path.insert(0, str(ROOT))
    try:
        from tests.integration import saga_tasks
    finally:
        sys.path.pop(0)
    path = tmp_path / "bank.db"
    kills = tmp_path / "kills"
    kills.mkdir()
    accounts = {"alice": (100_000, "open"), "bob": (100_000, "open"),
                **{name: (0, status) for name, status in TARGETS.items()}}
    bank.open_bank(path, accounts)
    start = bank.balances(path)
    env = {"MONEY_TRANSFER_BANK": str(path), "SAGA_KILLS": str(kills)}

    workers = [cluster.start_worker(KILLING, slots=4, extra_env=env) for _ in range(2)]
    for w in workers:
        await cluster.wait_worker_connected(w)
    client = cluster.client()
    transfers = plan(30, saga_tasks.POINTS)
    runs = [await client.trigger("money-transfer", t) for t in transfers]

    started = time.monotonic()
    pending = {r.id for r in runs}
    while pending:
        assert time.monotonic() - started < 120, f"{len(pending)} run(s) not final"
        for i, w in enumerate(workers):
            if w.proc.poll() is not None:  # killed itself: start another
                workers[i] = cluster.start_worker(KILLING, slots=4, extra_env=env)
        for run_id in list(pending):
            if (await client.get(run_id)).status.is_final:
                pending.discard(run_id)
        await asyncio.sleep(0.2)

    killed = sorted(p.name.split(" ", 1)[1] for p in kills.iterdir())
    # Every kill point was hit, some several times.
    assert set(killed) == set(saga_tasks.POINTS) - {"none"}, killed
    expected = dict(start)
    outcomes = {"COMPLETED": 0, "FAILED": 0}
    for run, transfer in zip(runs, transfers, strict=True):
        final = await client.get(run.id)
        ops = ops_of(bank, path, run.id)
        amount, source, target = transfer["amount"], transfer["source"], transfer["target"]
        outcomes[final.status.value] += 1
        if final.status == "COMPLETED":  # the money moved once
            assert TARGETS[target] == "open", final
            assert ops == [("withdraw", source, -amount), ("deposit", target, amount)], ops
            expected[source] -= amount
            expected[target] += amount
        else:  # compensated: withdrawn once, refunded once, never deposited
            assert final.status == "FAILED", final
            if TARGETS[target] == "open":  # only if its worker died too often
                assert final.error is not None
                assert final.error.type == "ratchet.LeaseLossLimit", final
            assert ops == [("withdraw", source, -amount),
                           ("ratchet:undo:withdraw", source, amount)], (final, ops)
            assert final.error is not None and final.error.non_retryable
            assert final.attempt == 1, final  # lost leases do not count as attempts
    assert sum(bank.balances(path).values()) == sum(start.values())
    assert bank.balances(path) == expected
    failing = sum(TARGETS[t["target"]] != "open" for t in transfers)
    assert outcomes["FAILED"] >= failing and outcomes["COMPLETED"] >= 10, outcomes


# --- finishing mode -----------------------------------------------------------------------


async def test_after_a_crash_while_compensating_no_forward_step_runs(
    cluster: Cluster, tmp_path: Path
) -> None:
    worker = cluster.start_worker(KILLING, slots=2)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    run = await client.trigger("crash-while-compensating", {"dir": str(tmp_path)})
    await eventually(lambda: worker.proc.poll() is not None, timeout=30,
                     what="the undo to kill its worker")
    assert lines(tmp_path / "undo") == [str(worker.pid)]
    # Replayed now, the code would go forward; the run is finishing.
    (tmp_path / "ok").touch()
    second = cluster.start_worker(KILLING, slots=2)
    final = await client.wait(run.id, timeout=30)
    assert final.status == "FAILED" and final.attempt == 1, final
    assert final.error is not None and final.error.type == "ValueError"
    assert final.error.message == "the reservation cannot be paid for"
    assert not (tmp_path / "forward").exists()
    assert lines(tmp_path / "reserve") == [str(worker.pid)]
    assert lines(tmp_path / "undo") == [str(worker.pid), str(second.pid)]
    assert lines(tmp_path / "on_failure ValueError") == [str(second.pid)]
    steps = {s.key: s.status for s in (await client.get(run.id)).steps}
    assert "forward" not in steps and steps["ratchet:undo:reserve"] == "COMPLETED"


async def test_a_finishing_lease_runs_the_undo_and_the_hook_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A step that kills its worker every time: past the lease-loss bound (2)
    the coordinator fails the run for good, through a finishing lease whose
    worker runs the completed step's undo and on_failure with the final error,
    and never the poison step again."""
    workers = [cluster.start_worker(KILLING, slots=1)]
    await cluster.wait_worker_connected(workers[0])
    client = cluster.client()
    run = await client.trigger("poison-saga", {"dir": str(tmp_path)})
    while not (await client.get(run.id)).status.is_final:
        assert len(workers) < 8, "too many workers died"
        if workers[-1].proc.poll() is not None:
            workers.append(cluster.start_worker(KILLING, slots=1))
        await asyncio.sleep(0.1)
    final = await client.get(run.id)
    assert final.status == "FAILED", final
    assert final.error is not None and final.error.type == "ratchet.LeaseLossLimit"
    assert final.lease_losses == 3 and final.attempt == 1
    assert len(lines(tmp_path / "poison")) == 3
    assert len(lines(tmp_path / "reserve")) == 1
    assert len(lines(tmp_path / "undo")) == 1
    assert len(lines(tmp_path / "on_failure ratchet.LeaseLossLimit")) == 1
    steps = {s.key: s.status for s in final.steps}
    assert steps["ratchet:undo:reserve"] == "COMPLETED"
    assert steps["ratchet:on_failure"] == "COMPLETED"
