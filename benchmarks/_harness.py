"""Shared pieces of the benchmarks: a throwaway store, real processes, figures.

Every benchmark runs the coordinator (`ratchet server`) and its workers
(`ratchet worker MODULE`) as separate processes against a throwaway database
(created on the local Postgres and dropped afterwards, or a SQLite file in a
temporary directory), reads the times the store recorded, and prints one
JSON object as the last line of stdout. Everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
TASKS = str(BENCH_DIR / "bench_tasks.py")
SERVER = os.environ.get("RATCHET_TEST_DATABASE_URL",
                        "postgresql://postgres@127.0.0.1:5432/postgres")
ENV = "bench"


def log(*parts: object) -> None:
    """Progress output: stderr, so stdout's last line stays the JSON result."""
    print(*parts, file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    """The benchmark's result: one JSON line on stdout."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def add_store_args(parser: argparse.ArgumentParser, *, sqlite: bool = True) -> None:
    parser.add_argument("--database-url", default=None,
                        help="use this database (default: a throwaway one, dropped after)")
    if sqlite:
        parser.add_argument("--store", choices=["postgres", "sqlite"], default="postgres",
                            help="throwaway store kind when --database-url is not given")


def store_kind(url: str) -> str:
    return url.split(":", 1)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ratchet_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ratchet", *args]


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(values: Sequence[float], digits: int = 2) -> dict[str, float]:
    """p50/p99/min/max of latencies, rounded."""
    return {"p50": round(statistics.median(values), digits),
            "p99": round(percentile(values, 99), digits),
            "min": round(min(values), digits), "max": round(max(values), digits)}


def query(url: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """One read through a fresh connection (Postgres %s or SQLite ? placeholders)."""
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            return conn.execute(sql.replace("%s", "?"), params).fetchall()
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


@contextlib.contextmanager
def throwaway_store(database_url: str | None, kind: str = "postgres") -> Iterator[str]:
    """The URL to benchmark against: the given one, or a fresh database dropped after."""
    if database_url is not None:
        yield database_url
        return
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="ratchet-bench-db-") as tmp:
            yield f"sqlite:///{tmp}/bench.db"
        return
    name = "ratchet_bench_" + secrets.token_hex(4)
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield SERVER.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(SERVER, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrate(url: str) -> None:
    """The coordinator's own migrations (so seeding sees the current schema)."""
    subprocess.run(ratchet_cmd("migrate", "--database-url", url), check=True,
                   stdout=sys.stderr, stderr=sys.stderr)


def admin_key(url: str, env: str = ENV) -> str:
    return subprocess.run(ratchet_cmd("keys", "create", "--database-url", url, "--env", env,
                                      "--role", "admin"),
                          capture_output=True, text=True, check=True).stdout.strip()


@dataclass
class System:
    """A running coordinator and its workers."""

    url: str
    key: str
    address: str
    tmp: Path
    coordinator: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    worker_logs: list[Path] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "RATCHET_API_KEY": self.key, "PYTHONWARNINGS": "ignore"}

    def start_worker(self, *modules: str, slots: int = 200,
                     extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        path = self.tmp / f"worker{len(self.workers)}.log"
        self.worker_logs.append(path)
        with path.open("w") as out:
            proc = subprocess.Popen(
                ratchet_cmd("worker", *modules, "--coordinator", self.address,
                            "--slots", str(slots), *extra),
                stdout=out, stderr=subprocess.STDOUT, env=self.env)
        self.workers.append(proc)
        return proc

    def start_process(self, argv: Sequence[str], name: str) -> subprocess.Popen[bytes]:
        """Another process (e.g. a session opener) stopped with the workers."""
        path = self.tmp / f"{name}.log"
        self.worker_logs.append(path)
        with path.open("w") as out:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                    env=self.env)
        self.workers.append(proc)
        return proc

    def wait_connected(self, timeout: float = 60.0, marker: str = "connected to",
                       counts: Sequence[int] | None = None) -> None:
        """Until every worker log shows `marker` (the i-th `counts[i]` times)."""
        deadline = time.monotonic() + timeout
        counts = counts or [1] * len(self.workers)
        for path, proc, count in zip(self.worker_logs, self.workers, counts, strict=True):
            while path.read_text().count(marker) < count:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{path.name} did not connect:\n{path.read_text()}\n"
                                       f"coordinator:\n{self.coordinator_log()}")
                time.sleep(0.05)

    def coordinator_log(self) -> str:
        return (self.tmp / "coordinator.log").read_text()[-4000:]

    def stop_workers(self) -> None:
        """Stop the workers (the coordinator keeps the tasks they registered)."""
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            _reap(proc)

    def stop(self) -> None:
        self.stop_workers()
        if self.coordinator.poll() is None:
            self.coordinator.send_signal(signal.SIGTERM)
        _reap(self.coordinator)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def system(url: str, *modules: str, slots: int = 200, worker_processes: int = 1,
           server_args: Sequence[str] = (), worker_args: Sequence[str] = (),
           connect: bool = True) -> Iterator[System]:
    """Migrate, make an admin key, start a coordinator and `worker_processes` workers
    serving `modules` (default the benchmark tasks), and wait until they connect."""
    modules = modules or (TASKS,)
    migrate(url)
    key = admin_key(url)
    tmp = Path(tempfile.mkdtemp(prefix="ratchet-bench-"))
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "RATCHET_API_KEY": key}
    with (tmp / "coordinator.log").open("w") as out:
        coordinator = subprocess.Popen(
            ratchet_cmd("server", "--database-url", url, "--listen", address,
                        "--http-listen", f"127.0.0.1:{free_port()}", *server_args),
            stdout=out, stderr=subprocess.STDOUT, env=env)
    sys_ = System(url=url, key=key, address=address, tmp=tmp, coordinator=coordinator)
    try:
        for _ in range(worker_processes):
            sys_.start_worker(*modules, slots=slots, extra=worker_args)
        if connect:
            sys_.wait_connected()
        yield sys_
    except BaseException:
        log("coordinator log (tail):\n" + sys_.coordinator_log())
        for path in sys_.worker_logs:
            log(f"{path.name} (tail):\n" + path.read_text()[-2000:])
        raise
    finally:
        sys_.stop()
        for path in tmp.iterdir():
            path.unlink()
        tmp.rmdir()


def wait_finished(url: str, count: int, timeout: float = 600.0, since: float = 0.0) -> None:
    """Poll the store until `count` runs created after `since` are final."""
    deadline = time.monotonic() + timeout
    while True:
        done = query(url, "SELECT count(*) FROM runs WHERE status IN "
                          "('COMPLETED', 'FAILED', 'CANCELED', 'TIMED_OUT', 'EXPIRED') "
                          "AND env = %s AND created_at >= %s", (ENV, since))[0][0]
        if done >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done}/{count} runs finished in {timeout}s")
        time.sleep(0.1)


# Each run's trigger time and its first step's start, as the store recorded them.
START_SQL = """
SELECT r.id, r.created_at, MIN(s.started_at) AS first_step, r.status, r.finished_at
FROM runs r LEFT JOIN steps s ON s.run_id = r.id
WHERE r.env = %s AND r.created_at >= %s
GROUP BY r.id, r.created_at, r.status, r.finished_at
"""


def start_latencies_ms(url: str, since: float) -> tuple[list[float], int]:
    """Trigger → first step started (ms) of runs created after `since`, and how many
    of them did not complete."""
    rows = query(url, START_SQL, (ENV, since))
    lat = [(r[2] - r[1]) * 1000 for r in rows if r[2] is not None]
    return lat, sum(1 for r in rows if r[3] != "COMPLETED")


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc/<pid>/stat, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    """VmRSS of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")
