"""The `ratchet` command's exit statuses, through real processes: 0 ok, 1
failure, 2 usage, 141 (silently) when its reader closed stdout; `--version`."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

import ratchet
import ratchet_server
from ratchet._types import RunStatus
from tests.harness import Cluster, ratchet_cmd, run_cli_async

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
CLOSED = "127.0.0.1:1"  # nothing listens on port 1: connections are refused at once
STDOUT_CLOSED = 141


def ratchet_with_closed_stdout(*args: str, env: dict[str, str] | None = None
                               ) -> subprocess.CompletedProcess[str]:
    """Run with stdout a pipe whose reader is gone, as after `| head -1` has
    read its line: every write the command makes fails with EPIPE."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(ratchet_cmd(*args), stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=30, check=False, cwd=ROOT,
                              env={**os.environ, **(env or {})})
    finally:
        os.close(write)


def ratchet_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RATCHET_COORDINATOR", "RATCHET_API_KEY")}
    return subprocess.run(ratchet_cmd(*args), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=35, check=False)


def test_version_names_the_sdk_and_the_server() -> None:
    done = ratchet_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"ratchet {ratchet.__version__}, " \
                          f"ratchet-server {ratchet_server.__version__}\n"


def test_closed_stdout_ends_quietly_without_a_coordinator() -> None:
    done = ratchet_with_closed_stdout("--version")
    assert (done.returncode, done.stderr) == (STDOUT_CLOSED, "")
    # argparse drops its own write errors: help into a closed pipe ends 0.
    done = ratchet_with_closed_stdout("runs", "list", "--help")
    assert (done.returncode, done.stderr) == (0, "")


async def test_runs_list_into_a_closed_pipe_ends_quietly(cluster: Cluster) -> None:
    # `ratchet runs list --json | head -1` printed `[Errno 32] Broken pipe`, exit 1.
    worker = cluster.start_worker()
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    run = await client.trigger("typed-order", {"order_id": "A1", "quantity": 2})
    await client.result(run.id, timeout=20)
    env = cluster.cli_env()
    for args in [("runs", "list", "--json"), ("runs", "list"), ("runs", "show", run.id),
                 ("runs", "history", run.id)]:
        done = await asyncio.to_thread(ratchet_with_closed_stdout, *args, env=env)
        assert (done.returncode, done.stderr) == (STDOUT_CLOSED, ""), args
    # The same command with a reader prints, exits 0.
    done = await run_cli_async("runs", "list", "--json", env=env)
    assert done.returncode == 0 and run.id in done.stdout, done.stderr


@pytest.mark.parametrize("args", [
    ("runs",),                                   # no subcommand
    ("runs", "list", "--status", "BROKEN"),      # not a status
    ("runs", "list", "--limit", "many"),
    ("runs", "replay"),                          # nothing selected
    ("trigger",),
    ("nonsense",),
])
def test_usage_errors_exit_2_in_one_line(args: tuple[str, ...]) -> None:
    done = ratchet_cli(*args, "--coordinator", CLOSED) if args[0] == "runs" and len(args) > 1 \
        else ratchet_cli(*args)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("ratchet: ")


def test_a_wrong_status_lists_the_valid_ones() -> None:
    done = ratchet_cli("runs", "list", "--status", "BROKEN")
    assert done.returncode == 2
    for status in RunStatus:
        assert status.value in done.stderr


def test_statuses_are_taken_in_any_case() -> None:
    # Past parsing: the failure is the refused connection (1), not usage (2).
    done = ratchet_cli("runs", "list", "--status", "failed", "--status", "Timed_Out",
                       "--coordinator", CLOSED)
    assert done.returncode == 1, done.stderr
    assert "cannot reach the coordinator" in done.stderr


def test_a_run_that_fails_exits_1() -> None:
    done = ratchet_cli("runs", "show", "run_x", "--coordinator", CLOSED)
    assert done.returncode == 1


def test_ctrl_c_exits_130_without_a_traceback() -> None:
    # A "coordinator" that accepts the connection and never answers holds the
    # command in its first call until Ctrl-C.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        proc = subprocess.Popen(ratchet_cmd("runs", "list", "--coordinator", f"127.0.0.1:{port}"),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            server.settimeout(20)
            conn, _ = server.accept()
            with conn:
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and out == ""
