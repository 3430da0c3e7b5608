"""The `ratchet` command: errors are one line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ratchet._cli import duration
from ratchet_server.store.base import MIGRATIONS

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
CLOSED = "127.0.0.1:1"  # nothing listens on port 1: connections are refused at once


def ratchet(*args: str, timeout: float = 35.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RATCHET_COORDINATOR", "RATCHET_API_KEY")}
    return subprocess.run([sys.executable, "-m", "ratchet", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    [line] = lines
    assert line.startswith("ratchet: "), line
    for needle in needles:
        assert needle in line
    return line


def test_bad_payload_json() -> None:
    done = ratchet("trigger", "some-task", "--payload", "{nope", "--coordinator", CLOSED)
    assert_one_line_error(done, "--payload is not valid JSON")
    assert done.returncode == 2 and done.stdout == ""  # a usage error: nothing was sent


@pytest.mark.parametrize("args", [("trigger", "some-task"), ("runs", "list"),
                                  ("runs", "show", "run_x"), ("runs", "cancel", "run_x")])
def test_unreachable_coordinator(args: tuple[str, ...]) -> None:
    # A refused connection fails fast. (An address that drops packets instead
    # would wait for ratchet.Client's default 30 s deadline, which the CLI does
    # not let one shorten: `trigger --timeout` only bounds `--wait`.)
    started = time.monotonic()
    done = ratchet(*args, "--coordinator", CLOSED)
    assert time.monotonic() - started < 35
    assert_one_line_error(done, f"cannot reach the coordinator at {CLOSED}", "ratchet dev")
    assert done.returncode == 1


def test_unknown_database_url_scheme_for_migrate() -> None:
    done = ratchet("migrate", "--database-url", "mysql://localhost/db")
    assert_one_line_error(done, "unsupported database URL", "mysql://")
    assert done.returncode == 1


def test_migrate_an_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    first = ratchet("migrate", "--database-url", url)
    assert first.returncode == 0, first.stderr
    files = sorted(p.name for p in (MIGRATIONS / "sqlite").glob("*.sql"))
    assert files[:6] == ["0001_init.sql", "0002_waits.sql", "0003_history.sql",
                         "0004_step_state.sql", "0005_tokens.sql", "0006_lease_losses.sql"]
    assert first.stdout.strip() == "applied: " + ", ".join(files)
    second = ratchet("migrate", "--database-url", url)
    assert second.returncode == 0 and second.stdout.strip() == "schema is up to date"


def test_worker_with_a_module_that_does_not_exist() -> None:
    done = ratchet("worker", "no_such_module_xyz", "--coordinator", CLOSED)
    assert_one_line_error(done, "cannot import", "no_such_module_xyz")


def test_bad_duration_is_a_usage_error_without_traceback() -> None:
    done = ratchet("dev", "--lease-ttl", "abc")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "argument --lease-ttl: invalid duration 'abc'" in last


def test_bad_duration_is_one_line() -> None:
    assert_one_line_error(ratchet("dev", "--lease-ttl", "abc"), "invalid duration 'abc'")


def test_heartbeat_not_shorter_than_lease_ttl() -> None:
    done = ratchet("dev", "--lease-ttl", "5s", "--heartbeat-interval", "5s")
    assert_one_line_error(done, "--heartbeat-interval must be shorter than --lease-ttl")


def test_zero_poll_interval_is_refused() -> None:
    done = ratchet("server", "--database-url", "sqlite:///unused.db", "--poll-interval", "0")
    assert_one_line_error(done, "--poll-interval must be more than 0")


@pytest.mark.parametrize(("argv", "seconds"), [
    ((), 1.0), (("--no-notify",), 0.25), (("--no-notify", "--poll-interval", "2s"), 2.0),
    (("--poll-interval", "100ms"), 0.1),
])
def test_the_dispatcher_poll_interval(argv: tuple[str, ...], seconds: float) -> None:
    from ratchet._cli import build_parser
    from ratchet_server import cli as server_cli

    args = build_parser().parse_args(["server", "--database-url", "sqlite://:memory:", *argv])
    assert server_cli._config(args).poll_interval == seconds


# --- duration parsing --------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("15s", 15.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), ("30", 30.0),
    ("0", 0.0), ("1.5s", 1.5), ("0.25m", 15.0), (" 15 s ", 15.0), ("10 ms", 0.01),
])
def test_duration(text: str, seconds: float) -> None:
    assert duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["abc", "", "s", "-1s", "1.s", ".5s", "1e3", "15sec",
                                  "1 h m", "1,5s", "15S"])
def test_invalid_duration(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="invalid duration"):
        duration(text)
