"""Real processes for integration tests: a coordinator and workers, each its own process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

import ratchet
from ratchet.v1 import system_pb2, system_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
TASKS = str(ROOT / "tests" / "integration" / "tasks.py")
EXAMPLE = str(ROOT / "examples" / "process_document.py")

# Short timings so that failure paths finish quickly in tests.
LEASE_TTL = "2s"
HEARTBEAT = "400ms"
GRACE = "200ms"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ratchet_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ratchet", *args]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(ratchet_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=cwd or ROOT)


async def run_cli_async(*args: str, env: dict[str, str] | None = None,
                        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_cli, *args, env=env, timeout=timeout)


async def eventually(check: Callable[[], Any], *, timeout: float = 20.0,
                     interval: float = 0.05, what: str = "condition") -> Any:
    """Await until `check()` (sync or async) returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class Process:
    """A child process whose output goes to a log file we can read."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._file = log.open("w")
        self.proc = subprocess.Popen(args, stdout=self._file, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=ROOT,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._file.close()

    def terminate(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not self._file.closed:
            self._file.close()
        return int(self.proc.returncode)


class Cluster:
    """A coordinator process on a store, with API keys, and worker processes."""

    def __init__(self, database_url: str, tmp: Path) -> None:
        self.database_url = database_url
        self.tmp = tmp
        self.port = free_port()
        self.http_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.coordinator: Process | None = None
        self.workers: list[Process] = []
        self.keys: dict[tuple[str, str], str] = {}
        self._clients: list[ratchet.Client] = []
        self._n = 0

    def key(self, role: str = "admin", env: str = "test") -> str:
        if (env, role) not in self.keys:
            result = run_cli("keys", "create", "--database-url", self.database_url,
                             "--env", env, "--role", role)
            assert result.returncode == 0, result.stderr
            self.keys[(env, role)] = result.stdout.strip()
        return self.keys[(env, role)]

    async def start_coordinator(self, *extra: str) -> Process:
        self.key("admin")
        self._n += 1
        self.coordinator = Process(
            ratchet_cmd("server", "--database-url", self.database_url, "--listen",
                        self.address, "--http-listen", f"127.0.0.1:{self.http_port}",
                        "--lease-ttl", LEASE_TTL, "--heartbeat-interval", HEARTBEAT,
                        "--session-grace", GRACE, *extra),
            self.tmp / f"coordinator-{self._n}.log")
        await self.wait_ready()
        return self.coordinator

    async def wait_ready(self, timeout: float = 30) -> None:
        async def ready() -> bool:
            assert self.coordinator is not None
            if self.coordinator.proc.poll() is not None:
                raise AssertionError("coordinator exited:\n" + self.coordinator.output())
            try:
                async with grpc.aio.insecure_channel(self.address) as channel:
                    stub = system_pb2_grpc.SystemServiceStub(channel)
                    await stub.GetVersion(system_pb2.GetVersionRequest(), timeout=1,
                                          metadata=(("authorization",
                                                     f"Bearer {self.key()}"),))
                return True
            except grpc.aio.AioRpcError:
                return False

        await eventually(ready, timeout=timeout, interval=0.1, what="the coordinator")

    def start_worker(self, module: str = TASKS, *, slots: int = 4, env: str = "test",
                     extra_env: dict[str, str] | None = None) -> Process:
        n = len(self.workers) + 1
        worker = Process(
            ratchet_cmd("worker", module, "--coordinator", self.address, "--slots", str(slots),
                        "--drain-timeout", "2s"),
            self.tmp / f"worker-{n}.log",
            env={"RATCHET_API_KEY": self.key("worker", env), **(extra_env or {})})
        self.workers.append(worker)
        return worker

    async def wait_worker_connected(self, worker: Process, timeout: float = 30) -> None:
        def connected() -> bool:
            if worker.proc.poll() is not None:
                raise AssertionError("worker exited:\n" + worker.output())
            return "connected to" in worker.output()

        await eventually(connected, timeout=timeout, what="the worker to connect")

    def client(self, role: str = "admin", env: str = "test") -> ratchet.Client:
        client = ratchet.Client(self.address, api_key=self.key(role, env))
        self._clients.append(client)
        return client

    def cli_env(self, role: str = "admin", env: str = "test") -> dict[str, str]:
        return {"RATCHET_COORDINATOR": self.address, "RATCHET_API_KEY": self.key(role, env)}

    async def close(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.close()
        for worker in self.workers:
            worker.terminate(timeout=5)
        if self.coordinator is not None:
            self.coordinator.terminate()

    def logs(self) -> str:
        parts = []
        for path in sorted(self.tmp.glob("*.log")):
            parts.append(f"===== {path.name}\n{path.read_text()[-6000:]}")
        return "\n".join(parts)


async def stuck_runs(database_url: str) -> list[str]:
    """What the invariant check finds in a database: runs nothing would move again."""
    from ratchet_server.engine import timers
    from ratchet_server.store import open_store

    store = await open_store(database_url)
    try:
        await store.migrate()  # a test may never have started a coordinator
        return [f"{s.run.id} ({s.run.task_id}, {s.run.status.value}): {s.why}"
                for s in await timers.find_stuck(store)]
    finally:
        await store.close()


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def lines(path: Path) -> Sequence[str]:
    return path.read_text().splitlines() if path.exists() else []
