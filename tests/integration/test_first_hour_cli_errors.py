"""The command line's errors after review of issue 12: an unreachable
coordinator, an unknown task, a bad port (through real processes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.harness import Cluster, free_port, run_cli, run_cli_async

pytestmark = pytest.mark.timeout(60)

FIX = "start one (`ratchet dev`) or point --coordinator / $RATCHET_COORDINATOR at it"


def test_an_unreachable_coordinator_is_one_line_naming_the_fix() -> None:
    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    result = run_cli("runs", "list", "--coordinator", address, timeout=30)
    assert result.returncode == 1, result
    assert result.stderr == f"ratchet: cannot reach the coordinator at {address}: {FIX}\n"
    assert result.stdout == ""


def test_an_unreachable_coordinator_from_the_environment_is_named() -> None:
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "RATCHET_API_KEY"}
    env["RATCHET_COORDINATOR"] = address
    result = run_cli("tasks", env=env, timeout=30)
    assert result.returncode == 1, result
    assert f"cannot reach the coordinator at {address}: " in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize(("verb", "value", "says"), [
    (("dev", "--port"), "99999", "--port: port 99999 is out of range: use 0-65535 "
                                 "(0 = any free port)"),
    (("server", "--listen"), "127.0.0.1:70000", "--listen: port 70000 is out of range: "
                                                "use 0-65535 (0 = any free port)"),
    (("server", "--listen"), "127.0.0.1:abc", "--listen '127.0.0.1:abc' is not HOST:PORT"),
])
def test_a_bad_port_is_a_usage_error(tmp_path: Path, verb: tuple[str, str], value: str,
                                     says: str) -> None:
    db = tmp_path / "r.db"
    store = ["--db", str(db)] if verb[0] == "dev" else ["--database-url", f"sqlite:///{db}"]
    result = run_cli(*verb, value, *store, timeout=30)
    assert result.returncode == 2, result
    assert result.stderr == f"ratchet: {says}\n"
    assert not db.exists()


async def test_an_unknown_task_fails_and_workers_takes_the_task_as_tasks_does(
        cluster: Cluster) -> None:
    env = cluster.cli_env("client")
    unknown = await run_cli_async("tasks", "no-such-task", env=env)
    assert unknown.returncode == 1 and unknown.stdout == "", unknown
    [line] = unknown.stderr.splitlines()
    assert "'no-such-task' is not registered" in line and "ratchet worker MODULE" in line

    worker = cluster.start_worker(slots=2)
    await cluster.wait_worker_connected(worker)
    by_argument = await run_cli_async("workers", "five-steps", "--json", env=env)
    assert by_argument.returncode == 0, by_argument.stderr
    [session] = json.loads(by_argument.stdout)
    assert "five-steps" in session["task_ids"]
    by_option = await run_cli_async("workers", "--task", "five-steps", "--json", env=env)
    assert [s["session_id"] for s in json.loads(by_option.stdout)] == [session["session_id"]]
    nobody = await run_cli_async("workers", "no-such-task", "--json", env=env)
    assert nobody.returncode == 0 and json.loads(nobody.stdout) == []
    both = await run_cli_async("workers", "five-steps", "--task", "other", env=env)
    assert both.returncode == 2 and "give one" in both.stderr, both
