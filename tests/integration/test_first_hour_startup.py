"""Starting a coordinator, as a new user meets it (issue 12, items 2, 6, 16, 18):
a port in use, a wrong Postgres URL, Ctrl-C during startup, an idle Client."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest

import ratchet
from ratchet import _client
from ratchet._session import CHANNEL_OPTIONS
from ratchet_server import app
from ratchet_server.store import StoreUnavailable, open_store
from tests.harness import ROOT, free_port, ratchet_cmd, run_cli

pytestmark = pytest.mark.timeout(60)


@contextlib.contextmanager
def occupied(port: int) -> Iterator[None]:
    """Something else listening on 127.0.0.1:PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        yield


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


# -- item 2: a port in use ---------------------------------------------------------


@pytest.mark.parametrize("which", ["grpc", "http"])
def test_dev_refuses_a_port_in_use_before_creating_the_database(tmp_path: Path,
                                                                 which: str) -> None:
    port, http_port = free_port(), free_port()
    db = tmp_path / "state" / "dev.db"
    with occupied(port if which == "grpc" else http_port):
        result = run_cli("dev", "--port", str(port), "--http-port", str(http_port),
                         "--db", str(db), timeout=30)
    assert result.returncode == 1, result
    line = one_line(result.stderr)
    flag = "--port" if which == "grpc" else "--http-port"
    busy = port if which == "grpc" else http_port
    assert f"port {busy} is already in use" in line
    assert f"with {flag}" in line
    assert "unexpected" not in line and "RuntimeError" not in line
    assert not db.exists() and not db.parent.exists()


@pytest.mark.parametrize("which", ["grpc", "http"])
def test_server_names_listen_flags_for_a_port_in_use(tmp_path: Path, which: str) -> None:
    port, http_port = free_port(), free_port()
    db = tmp_path / "server.db"
    with occupied(port if which == "grpc" else http_port):
        result = run_cli("server", "--database-url", f"sqlite:///{db}",
                         "--listen", f"127.0.0.1:{port}",
                         "--http-listen", f"127.0.0.1:{http_port}", timeout=30)
    assert result.returncode == 1, result
    line = one_line(result.stderr)
    flag = "--listen" if which == "grpc" else "--http-listen"
    assert f"with {flag}" in line, line
    assert not db.exists()


def test_second_dev_on_the_same_ports_fails_in_one_line(tmp_path: Path) -> None:
    """The usual case: a `ratchet dev` already runs (gRPC binds dual-stack)."""
    port, http_port = free_port(), free_port()
    first = subprocess.Popen(
        ratchet_cmd("dev", "--port", str(port), "--http-port", str(http_port),
                    "--db", str(tmp_path / "a.db")),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert first.stderr is not None
        for line in first.stderr:  # an event, not a sleep: its listening line
            if "listening on" in line:
                break
        else:
            pytest.fail("the first coordinator did not start")
        result = run_cli("dev", "--port", str(port), "--http-port", str(http_port),
                         "--db", str(tmp_path / "b.db"), timeout=30)
        assert result.returncode == 1, result
        assert "with --port" in one_line(result.stderr)
        assert not (tmp_path / "b.db").exists()
    finally:
        first.terminate()
        first.communicate(timeout=20)


# -- item 6: a wrong Postgres URL --------------------------------------------------


def _with(url: str, *, dbname: str | None = None, user: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if user is not None:
        netloc = f"{user}@{netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc,
                                     path=f"/{dbname}" if dbname else parts.path))


def _wrong(pg_server: str, case: str) -> tuple[str, str]:
    if case == "database":
        return (_with(pg_server, dbname="ratchet_no_such_database"),
                'database "ratchet_no_such_database" does not exist')
    return (_with(pg_server, user="ratchet_no_such_role"),
            'role "ratchet_no_such_role" does not exist')


@pytest.mark.postgres
@pytest.mark.parametrize("case", ["database", "role"])
async def test_a_wrong_database_or_role_is_not_retried(pg_server: str, case: str) -> None:
    """Timed in-process: a child interpreter's start-up is noise on a busy machine."""
    url, expected = _wrong(pg_server, case)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=expected):
        await open_store(url)
    assert time.monotonic() - started < 2  # the pool used to retry for 10 s


@pytest.mark.postgres
@pytest.mark.parametrize("case", ["database", "role"])
def test_a_wrong_database_or_role_fails_in_one_line(pg_server: str, case: str) -> None:
    url, expected = _wrong(pg_server, case)
    for verb in (["migrate"], ["server", "--listen", f"127.0.0.1:{free_port()}",
                               "--http-listen", f"127.0.0.1:{free_port()}"]):
        result = run_cli(*verb, "--database-url", url, timeout=30)
        assert result.returncode == 1, result
        line = one_line(result.stderr)  # no pool warnings
        assert expected in line and "database URL" in line, line


def test_a_malformed_postgres_url_fails_in_one_line() -> None:
    result = run_cli("migrate", "--database-url", "postgresql://u@127.0.0.1:abc/db", timeout=30)
    assert result.returncode == 1, result
    line = one_line(result.stderr)
    assert "invalid database URL" in line and "postgresql://USER" in line, line


# -- item 16: Ctrl-C during startup -----------------------------------------------


def test_sigint_at_any_moment_of_dev_startup_exits_cleanly(tmp_path: Path) -> None:
    """SIGINT as soon as each startup line appears: no traceback, 130 before
    the coordinator serves (the CLI's interrupted code), 0 once it does (a
    graceful stop)."""
    for n, moment in enumerate(("ratchet dev:", "listening on")):
        port, http_port = free_port(), free_port()
        proc = subprocess.Popen(
            ratchet_cmd("-v", "dev", "--port", str(port), "--http-port", str(http_port),
                        "--db", str(tmp_path / f"dev{n}.db")),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
            # A shell's background job ignores SIGINT; a terminal's does not.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if moment in line:
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=30)
        output = "".join(seen) + rest
        assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
        assert proc.returncode in (0, 130), (proc.returncode, output)


@pytest.mark.parametrize("after", [0.0, 0.1, 0.4])
def test_sigint_while_the_ratchet_command_imports_exits_quietly(
        tmp_path: Path, after: float) -> None:
    """The `ratchet` console script spends a second or more importing
    before any of its code runs; a Ctrl-C then exits 130 with no traceback
    (the entry point, _ratchet_cli, is outside the package for that). The
    signal goes once the import of `ratchet` has begun (grpc's extension is
    mapped: the entry point's handler is in place; before it runs, Python
    itself is starting up, which is not Ratchet's to quiet), then `after` s."""
    script = Path(sys.executable).with_name("ratchet")
    proc = subprocess.Popen(
        [str(script), "dev", "--port", str(free_port()), "--http-port", str(free_port()),
         "--db", str(tmp_path / "dev.db")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 20
    while not _importing_ratchet(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline, "never imported grpc"
        time.sleep(0.002)
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=30)
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert proc.returncode in (0, 130), (proc.returncode, output)


def _importing_ratchet(pid: int) -> bool:
    """Whether the process has begun importing `ratchet` (grpc's C extension,
    its first heavy import, is mapped)."""
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        return "cygrpc" in Path(f"/proc/{pid}/maps").read_text()
    return False


# -- item 18: an idle Client ---------------------------------------------------------


async def test_idle_client_keeps_its_connection_past_several_pings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK pings every 10 s even when idle; gRPC's default server takes
    pings without data more often than every 5 minutes as abuse and answers
    GOAWAY too_many_pings after the third. Scaled down here: the client pings
    every second, the coordinator accepts one every half second."""
    monkeypatch.setattr(app, "KEEPALIVE_MIN_PING_MS", 500)
    # gRPC's client stops pinging after two pings without data, then pings
    # again after a minute (which is how the SDK's idle Client met the limit
    # after a few minutes); unlimited here, so that the limit shows in seconds.
    fast = [(k, 1000 if k == "grpc.keepalive_time_ms" else v) for k, v in CHANNEL_OPTIONS]
    fast.append(("grpc.http2.max_pings_without_data", 0))
    monkeypatch.setattr(_client, "CHANNEL_OPTIONS", fast)
    store = await open_store("sqlite://:memory:")
    await store.migrate()
    coordinator = app.Coordinator(store, app.ServerOptions(listen="127.0.0.1:0",
                                                           http_listen=None, auth=False))
    await coordinator.start()
    try:
        async with ratchet.Client(f"127.0.0.1:{coordinator.port}") as client:
            assert (await client.list())[0] == []
            channel = client._channel
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            # Five ping intervals, idle. A GOAWAY drops the channel to IDLE.
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                assert channel.get_state() == grpc.ChannelConnectivity.READY
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        channel.wait_for_state_change(grpc.ChannelConnectivity.READY),
                        deadline - time.monotonic())
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            assert (await client.list())[0] == []
    finally:
        await coordinator.stop(drain=0)


def test_server_accepts_the_sdk_keepalive() -> None:
    """The real numbers: the coordinator takes pings at least twice as often
    as the SDK sends them (timers jitter)."""
    sdk_ping_ms = dict(CHANNEL_OPTIONS)["grpc.keepalive_time_ms"]
    assert isinstance(sdk_ping_ms, int)
    assert app.KEEPALIVE_MIN_PING_MS * 2 <= sdk_ping_ms


@pytest.mark.parametrize("which", ["gRPC", "HTTP"])
async def test_coordinator_start_reports_a_port_taken_meanwhile(which: str) -> None:
    """The check before start-up can lose a race: Coordinator.start then
    names the address too (an OSError, which the CLI prints in one line),
    never gRPC's RuntimeError."""
    port, http_port = free_port(), free_port()
    busy = f"127.0.0.1:{port if which == 'gRPC' else http_port}"
    store = await open_store("sqlite://:memory:")
    await store.migrate()
    coordinator = app.Coordinator(store, app.ServerOptions(
        listen=f"127.0.0.1:{port}", http_listen=f"127.0.0.1:{http_port}", auth=False))
    with occupied(port if which == "gRPC" else http_port):
        with pytest.raises(OSError, match=rf"cannot listen on {busy} \({which}\)"):
            await coordinator.start()
        await coordinator.stop(drain=0)
