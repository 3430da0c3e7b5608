"""Issue 12, the worker's errors, through real processes: a task module that
raises at import (item 1); a step too large to checkpoint (item 9); a step
whose value JSON cannot carry (item 17); queue / concurrency_key refused by
the coordinator and in child triggers (item 5)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from ratchet.v1 import run_pb2, run_pb2_grpc
from tests.harness import ROOT, Cluster, count_lines

pytestmark = pytest.mark.timeout(90)

TASKS = str(ROOT / "tests" / "integration" / "first_hour_worker_tasks.py")
CLOSED = "127.0.0.1:1"  # the module fails before any connection is tried

BROKEN = '''\
import ratchet

CONFIG = {}


def setting(name):
    return CONFIG[name]


@ratchet.task(id="never-served")
async def never_served(ctx, payload):
    return None


TIMEOUT = setting("missing")
'''


def ratchet_in(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ratchet", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


def broken_module(tmp_path: Path, source: str = BROKEN) -> Path:
    (tmp_path / "tasks.py").write_text(source)
    return tmp_path


@pytest.mark.parametrize("spec", ["tasks.py", "tasks"])
def test_a_module_raising_at_import_is_one_line_naming_file_and_line(
    tmp_path: Path, spec: str
) -> None:
    done = ratchet_in(broken_module(tmp_path), "worker", spec, "--coordinator", CLOSED)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"ratchet: importing {spec} failed: KeyError: 'missing' (tasks.py, line 7); "
        "run with -v for the traceback")
    assert "unexpected" not in done.stderr


def test_with_v_the_traceback_of_the_users_code_is_shown(tmp_path: Path) -> None:
    done = ratchet_in(broken_module(tmp_path), "-v", "worker", "tasks.py",
                      "--coordinator", CLOSED)
    assert done.returncode == 1
    err = done.stderr
    tb = err[err.index("Traceback (most recent call last):"):]
    lines = tb.strip().splitlines()
    # From the user's module on: no frame of Ratchet or importlib before it.
    assert lines[1].startswith(f'  File "{tmp_path / "tasks.py"}", line 15, in <module>')
    assert 'line 7, in setting' in tb and "KeyError: 'missing'" in tb
    assert "importlib" not in tb and "_serve.py" not in tb
    # The summary is still the last line, without pointing to -v again.
    assert lines[-1] == "ratchet: importing tasks.py failed: KeyError: 'missing' " \
                        "(tasks.py, line 7)"
    assert "unexpected" not in err


def test_an_import_the_module_makes_that_fails_names_the_module_line(tmp_path: Path) -> None:
    source = "import os\n\nimport not_installed_package_xyz  # noqa\n"
    done = ratchet_in(broken_module(tmp_path, source), "worker", "tasks.py",
                      "--coordinator", CLOSED)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "ratchet: importing tasks.py failed: ModuleNotFoundError: No module named "
        "'not_installed_package_xyz' (tasks.py, line 3); run with -v for the traceback")


def test_a_syntax_error_names_its_line(tmp_path: Path) -> None:
    done = ratchet_in(broken_module(tmp_path, "x = 1\ndef broken(:\n"), "worker", "tasks.py",
                      "--coordinator", CLOSED)
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("ratchet: importing tasks.py failed: SyntaxError: ")
    assert "(tasks.py, line 2)" in line


def test_dev_with_a_broken_worker_module(tmp_path: Path) -> None:
    done = ratchet_in(broken_module(tmp_path), "dev", "--worker", "tasks.py",
                      "--port", "0", "--http-port", "0")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "ratchet: importing tasks.py failed: KeyError: 'missing' (tasks.py, line 7); "
        "run with -v for the traceback")
    assert "unexpected" not in done.stderr


# --- through a coordinator and a worker --------------------------------------------------


async def started(cluster: Cluster) -> None:
    worker = cluster.start_worker(TASKS, slots=4)
    await cluster.wait_worker_connected(worker)


async def test_an_oversize_step_output_names_the_step_size_and_limit(cluster: Cluster) -> None:
    await started(cluster)
    async with cluster.client() as client:
        run = await client.trigger("big-step", {})
        final = await client.wait(run.id, timeout=30)
    assert final.status == "FAILED" and final.attempt == 1  # non-retryable
    assert final.error is not None and final.error.type == "ratchet.WriteRefusedError"
    assert final.error.step_key == "big"
    assert final.error.message.startswith(
        f"step 'big': the coordinator refused a write: output is {2 * 1024 * 1024 + 2} "
        "bytes; the limit is 1048576")


async def test_a_step_value_json_cannot_carry_is_not_retried(
    cluster: Cluster, tmp_path: Path
) -> None:
    await started(cluster)
    async with cluster.client() as client:
        run = await client.trigger("unencodable-step", {"dir": str(tmp_path)})
        final = await client.wait(run.id, timeout=30)
    assert final.status == "FAILED" and final.attempt == 1
    assert count_lines(tmp_path / "calls") == 1
    assert final.error is not None and final.error.step_key == "produce"
    assert "step 'produce' returned a value of type first_hour_worker_tasks.Unencodable" \
        in final.error.message


async def test_a_child_trigger_with_a_concurrency_key_fails_the_run_at_once(
    cluster: Cluster
) -> None:
    await started(cluster)
    async with cluster.client() as client:
        run = await client.trigger("child-with-key", {})
        final = await client.wait(run.id, timeout=30)
        children, _ = await client.list(parent=run.id)
    assert final.status == "FAILED" and final.attempt == 1
    assert final.error is not None and final.error.type == "ratchet.NotSupportedError"
    assert "concurrency_key= is not supported yet" in final.error.message
    assert children == []


@pytest.mark.parametrize("options", [run_pb2.TriggerOptions(concurrency_key="customer-1"),
                                     run_pb2.TriggerOptions(queue="emails")])
async def test_other_clients_are_refused_and_nothing_is_created(
    cluster: Cluster, options: run_pb2.TriggerOptions
) -> None:
    await started(cluster)
    metadata = (("authorization", f"Bearer {cluster.key()}"),)
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        stub = run_pb2_grpc.RunServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Trigger(run_pb2.TriggerRequest(task_id="big-step", payload=b"{}",
                                                      options=options), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "is not supported yet" in (caught.value.details() or "")
        listed = await stub.ListRuns(run_pb2.ListRunsRequest(), metadata=metadata)
        assert list(listed.runs) == []
        # The task's own queue is what every run has anyway: accepted.
        ok = await stub.Trigger(run_pb2.TriggerRequest(
            task_id="big-step", payload=b"{}",
            options=run_pb2.TriggerOptions(queue="big-step")), metadata=metadata)
        assert ok.created
