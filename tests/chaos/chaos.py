"""The chaos suite's machinery: a throwaway Postgres, two coordinators, three
workers, a load of runs whose outcome is known from their payload, faults, and
the checks afterwards.

Faults (while the load runs): a worker SIGKILLed every ~2 s and restarted; a
coordinator SIGKILLed and restarted; Postgres restarted; a worker SIGSTOPped
for 3x the lease TTL, then SIGCONTed. Afterwards every run must have reached
its expected status and output; no step may run again after its completion
was recorded, and every other re-execution must be explained by a fault;
children exist exactly once per parent step; every history agrees with its
run; nothing is lost, stuck or duplicated.

`run_chaos(config, tmp)` returns a `Report`; its `problems` are what failed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ratchet
from tests.chaos import tasks
from tests.harness import LEASE_TTL, Cluster, Process, free_port, stuck_runs

TTL_SECONDS = float(LEASE_TTL.rstrip("s"))
NON_FINAL = ["QUEUED", "RUNNING", "WAITING"]
FINISHING = {"finished", "canceled", "expired", "timed_out"}
LEASE_ENDS = {"lease_lost", "retry_scheduled", "lease_released", "suspended", *FINISHING}


@dataclasses.dataclass
class Config:
    runs: int = 300
    seed: int = 1
    load_seconds: float = 60.0  # triggers are spread over this
    fault_seconds: float = 80.0  # faults go on this long (from the first trigger)
    settle_seconds: float = 60.0  # then every run must be final within this
    worker_kill_every: float = 2.0
    coordinator_kills: int = 2
    postgres_restarts: int = 1
    worker_stops: int = 1
    slots: int = 4


@dataclasses.dataclass
class Report:
    runs: int = 0
    top_level: int = 0
    children: int = 0
    kills: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    re_executions: int = 0
    stale: int = 0
    leases_lost: int = 0
    unexplained: int = 0
    lost: int = 0
    stuck: int = 0
    repaired: int = 0
    duplicated: int = 0
    wrong: int = 0
    seconds: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)

    def table(self) -> str:
        rows = [
            ("runs (top-level + children)", f"{self.runs} ({self.top_level} + {self.children})"),
            ("workers SIGKILLed", self.kills["worker_kill"]),
            ("coordinators SIGKILLed", self.kills["coordinator_kill"]),
            ("Postgres restarts", self.kills["postgres_restart"]),
            ("workers SIGSTOPped (3x lease TTL)", self.kills["worker_stop"]),
            ("processes exited on their own", self.kills["unexpected_exit"]),
            ("leases lost (history)", self.leases_lost),
            ("step re-executions (explained by a fault)", self.re_executions - self.unexplained),
            ("  of which under a stale lease (a zombie worker)", self.stale),
            ("step re-executions (unexplained)", self.unexplained),
            ("lost", self.lost),
            ("stuck", self.stuck),
            ("repaired by the reconciler (were stuck)", self.repaired),
            ("duplicated", self.duplicated),
            ("wrong status or output", self.wrong),
            ("other problems", len(self.problems) - self.unexplained - self.lost - self.stuck
             - self.repaired - self.duplicated - self.wrong),
            ("wall time", f"{self.seconds:.0f} s"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


class ThrowawayPostgres:
    """A Postgres cluster of our own on a free port, made with initdb (never the shared one).

    initdb and postgres refuse to run as root, so as root every command runs
    as the `postgres` OS user in a directory that user can write.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ratchet-chaos-pg-"))
        self.dir.chmod(0o777)
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        tool = shutil.which(args[0]) or args[0]
        command = [tool, *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                cwd=self.dir)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")

    def _pg_ctl(self, action: str, *extra: str) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "postgres.log"),
                  "-o", f"-p {self.port} -k {self.dir} -c max_connections=200 -c fsync=off",
                  *extra, action)

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust")
        self._pg_ctl("start", "-w")

    def restart(self, mode: str) -> None:
        self._pg_ctl("restart", "-w", "-m", mode)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class Chaos:
    """One chaos run: processes, load, faults, and the record of what happened."""

    def __init__(self, config: Config, tmp: Path) -> None:
        self.config = config
        self.tmp = tmp
        self.rng = random.Random(config.seed)
        self.dir = tmp / "effects"
        (self.dir / "runs").mkdir(parents=True)
        (self.dir / "tokens").mkdir()
        self.postgres = ThrowawayPostgres()
        self.coordinators: list[Cluster] = []
        self.workers: list[tuple[Process, int]] = []  # process, index of its coordinator
        self.stopped: set[int] = set()
        self.faults: list[tuple[float, float, str, int]] = []  # start, end, kind, pid
        self.report = Report()
        self.triggered: dict[str, tuple[str, dict[str, Any]]] = {}  # run id -> task, payload
        self.keys: dict[str, str] = {}  # idempotency key -> run id
        self.clients: list[ratchet.Client] = []
        self._stop_faults = asyncio.Event()
        self._completed_tokens: set[str] = set()

    # ----- processes

    async def start(self) -> None:
        await asyncio.to_thread(self.postgres.start)
        for n in range(2):
            (self.tmp / f"c{n}").mkdir()
            cluster = Cluster(self.postgres.url, self.tmp / f"c{n}")
            if self.coordinators:
                cluster.keys = self.coordinators[0].keys
            await cluster.start_coordinator()
            self.coordinators.append(cluster)
        self.clients = [ratchet.Client(c.address, api_key=c.key(), timeout=10)
                        for c in self.coordinators]
        for n in range(3):
            self.start_worker(n % 2)
        for worker, _ in self.workers:
            await self._connected(worker)

    def start_worker(self, coordinator: int) -> Process:
        cluster = self.coordinators[coordinator]
        n = len(self.workers) + 1
        worker = Process(
            [sys.executable, "-m", "tests.chaos.worker", "--coordinator", cluster.address,
             "--slots", str(self.config.slots)],
            self.tmp / f"worker-{n}.log", env={"RATCHET_API_KEY": cluster.key("worker")})
        self.workers.append((worker, coordinator))
        return worker

    async def _connected(self, worker: Process, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while "connected to" not in worker.output():
            if worker.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("a worker did not connect:\n" + worker.output()[-3000:])
            await asyncio.sleep(0.1)

    def live_workers(self) -> list[tuple[Process, int]]:
        return [(w, c) for w, c in self.workers if w.proc.poll() is None]

    async def close(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()
        for worker, _ in self.workers:
            worker.terminate(timeout=5)
        for cluster in self.coordinators:
            if cluster.coordinator is not None:
                cluster.coordinator.terminate()
        await asyncio.to_thread(self.postgres.stop)

    def logs(self, tail: int = 4000) -> str:
        parts = []
        for path in sorted(self.tmp.rglob("*.log")):
            parts.append(f"===== {path.relative_to(self.tmp)}\n{path.read_text()[-tail:]}")
        return "\n".join(parts)

    # ----- faults

    def _fault(self, started: float, kind: str, pid: int) -> None:
        self.faults.append((started, time.time(), kind, pid))
        self.report.kills[kind] += 1

    async def kill_workers(self, until: float) -> None:
        """SIGKILL a random worker every ~2 s and start a fresh one on its coordinator."""
        while time.monotonic() < until and not self._stop_faults.is_set():
            await asyncio.sleep(self.rng.uniform(0.6, 1.4) * self.config.worker_kill_every)
            victims = [(w, c) for w, c in self.live_workers() if w.pid not in self.stopped]
            if not victims:
                continue
            worker, coordinator = self.rng.choice(victims)
            now = time.time()
            worker.kill()
            self._fault(now, "worker_kill", worker.pid)
            self.start_worker(coordinator)

    async def other_faults(self, until: float) -> None:
        """Coordinator kills, Postgres restarts and worker stops, one at a time,
        spread over the fault window in a random order."""
        plan = (["coordinator_kill"] * self.config.coordinator_kills
                + ["postgres_restart"] * self.config.postgres_restarts
                + ["worker_stop"] * self.config.worker_stops)
        self.rng.shuffle(plan)
        gap = (until - time.monotonic()) / (len(plan) + 1)
        for n, kind in enumerate(plan):
            await asyncio.sleep(gap * self.rng.uniform(0.7, 1.0))
            if self._stop_faults.is_set():
                return
            now = time.time()
            if kind == "coordinator_kill":
                cluster = self.coordinators[n % 2]
                assert cluster.coordinator is not None
                pid = cluster.coordinator.pid
                cluster.coordinator.kill()
                await asyncio.sleep(self.rng.uniform(0.2, 1.5))
                await cluster.start_coordinator()
                self._fault(now, kind, pid)
            elif kind == "postgres_restart":
                mode = "immediate" if n % 2 == 0 else "fast"
                await asyncio.to_thread(self.postgres.restart, mode)
                self._fault(now, kind, 0)
            else:
                victims = [w for w, _ in self.live_workers() if w.pid not in self.stopped]
                worker = self.rng.choice(victims)
                self.stopped.add(worker.pid)
                worker.signal(signal.SIGSTOP)
                await asyncio.sleep(3 * TTL_SECONDS)
                with contextlib.suppress(ProcessLookupError):
                    worker.signal(signal.SIGCONT)
                self.stopped.discard(worker.pid)
                self._fault(now, kind, worker.pid)

    async def watch_processes(self) -> None:
        """A process that dies without being killed is a finding; it is restarted so
        the rest of the run still means something."""
        killed = {pid for _, _, kind, pid in self.faults if kind == "worker_kill"}
        while not self._stop_faults.is_set():
            await asyncio.sleep(0.5)
            killed = {pid for _, _, kind, pid in self.faults if kind == "worker_kill"}
            for i, (worker, coordinator) in enumerate(self.workers):
                code = worker.proc.poll()
                if code is not None and code != -signal.SIGKILL and worker.pid not in killed:
                    self.report.problems.append(
                        f"worker pid {worker.pid} exited with {code}: "
                        + worker.output()[-800:])
                    self._fault(time.time(), "unexpected_exit", worker.pid)
                    killed.add(worker.pid)
                    self.workers[i] = (worker, -1)
                    self.start_worker(coordinator)
            for cluster in self.coordinators:
                process = cluster.coordinator
                if process is not None and process.proc.poll() not in (None, -signal.SIGKILL):
                    self.report.problems.append(
                        f"coordinator pid {process.pid} exited with {process.proc.returncode}: "
                        + process.output()[-1500:])
                    self._fault(time.time(), "unexpected_exit", process.pid)
                    with contextlib.suppress(Exception):
                        await cluster.start_coordinator()

    # ----- load

    def payload(self, i: int) -> tuple[str, dict[str, Any]]:
        r, d = self.rng, str(self.dir)
        kind = r.choices(["steps", "exhaust", "sleeper", "token", "parent", "gather"],
                         weights=[30, 4, 20, 22, 16, 8])[0]
        if kind == "steps":
            fails = [r.choice([0, 0, 0, 1, 2]) for _ in range(r.randint(2, 5))]
            payload: dict[str, Any] = {"dir": d, "fails": fails,
                                       "seconds": r.choice([0.01, 0.05, 0.2])}
            if r.random() < 0.1:
                payload["fatal"] = r.randrange(len(fails))
            return "chaos-steps", payload
        if kind == "exhaust":
            return "chaos-exhaust", {"dir": d}
        if kind == "sleeper":
            return "chaos-sleeper", {"dir": d, "seconds": round(r.uniform(1.0, 3.0), 2)}
        if kind == "token":
            complete = r.random() < 0.85
            payload = {"dir": d, "complete": complete, "secret": f"s{i}"}
            if not complete:
                payload["timeout"] = round(r.uniform(1.0, 2.0), 2)
            return "chaos-token", payload
        if kind == "parent":
            children = r.randint(1, 4)
            payload = {"dir": d, "children": children,
                       "sleep": r.choice([0, 0, 0, 1.2]),
                       "fail": [0] if r.random() < 0.15 else []}
            return "chaos-parent", payload
        return "chaos-gather", {"dir": d, "secret": f"g{i}", "seconds": 1.0}

    async def call(self, what: str, fn: Any, *args: Any, deadline: float = 120,
                   **kwargs: Any) -> Any:
        """Call a client method on either coordinator until one answers (retrying
        is safe: triggers carry an idempotency key, token completion is idempotent)."""
        end = time.monotonic() + deadline
        errors: list[str] = []
        while True:
            client = self.rng.choice(self.clients)
            try:
                return await getattr(client, fn)(*args, **kwargs)
            except ratchet.NotFoundError:
                raise
            except (ratchet.ClientError, OSError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                if time.monotonic() > end:
                    raise AssertionError(f"{what} failed for {deadline}s: {errors[-3:]}") from exc
                await asyncio.sleep(0.2)

    async def trigger(self, i: int) -> None:
        task, payload = self.payload(i)
        key = f"chaos-{self.config.seed}-{i}"
        run = await self.call(f"trigger {key}", "trigger", task, payload, idempotency_key=key,
                              tags=["chaos"])
        if key in self.keys and self.keys[key] != run.id:
            self.report.problems.append(f"idempotency key {key} answered two run ids: "
                                        f"{self.keys[key]} and {run.id}")
        self.keys[key] = run.id
        self.triggered[run.id] = (task, payload)

    async def load(self) -> None:
        interval = self.config.load_seconds / self.config.runs
        start = time.monotonic()
        pending = []
        for i in range(self.config.runs):
            await asyncio.sleep(max(0.0, start + i * interval - time.monotonic()))
            pending.append(asyncio.create_task(self.trigger(i)))
        await asyncio.gather(*pending)

    async def complete_tokens(self) -> None:
        """Complete published tokens at random moments: a third at once (usually
        before the run suspends), the rest within 0-400 ms."""
        tokens = self.dir / "tokens"
        inflight: set[asyncio.Task[None]] = set()
        while True:
            for path in list(tokens.iterdir()):
                run_id = path.name
                if run_id in self._completed_tokens or run_id not in self.triggered:
                    continue
                task, payload = self.triggered[run_id]
                if task == "chaos-token" and not payload["complete"]:
                    continue
                token = path.read_text().strip()
                if not token:
                    continue  # being written
                self._completed_tokens.add(run_id)
                t = asyncio.create_task(self._complete(run_id, token, payload["secret"]))
                inflight.add(t)
                t.add_done_callback(inflight.discard)
            await asyncio.sleep(0.02)

    async def _complete(self, run_id: str, token: str, data: str) -> None:
        if self.rng.random() > 0.33:
            await asyncio.sleep(self.rng.uniform(0, 0.4))
        try:
            await self.call(f"complete the token of {run_id}", "complete_token", token, data)
        except ratchet.NotFoundError:
            self.report.problems.append(f"{run_id}: its published token {token} is unknown")

    # ----- the whole run

    async def run(self) -> Report:
        started = time.monotonic()
        await self.start()
        until = time.monotonic() + self.config.fault_seconds
        background = [asyncio.create_task(self.complete_tokens()),
                      asyncio.create_task(self.watch_processes())]
        faults = [asyncio.create_task(self.kill_workers(until)),
                  asyncio.create_task(self.other_faults(until))]
        try:
            await self.load()
            await asyncio.gather(*faults)
            self._stop_faults.set()
            for worker, _ in self.workers:  # nothing stays stopped
                if worker.proc.poll() is None:
                    worker.signal(signal.SIGCONT)
            await self.settle()
            await check(self)
        finally:
            self._stop_faults.set()
            for t in (*background, *faults):
                t.cancel()
            await asyncio.gather(*background, *faults, return_exceptions=True)
            self.report.seconds = time.monotonic() - started
        return self.report

    async def settle(self) -> None:
        """Wait until no run is QUEUED, RUNNING or WAITING, or the settle time is up."""
        deadline = time.monotonic() + self.config.settle_seconds
        while time.monotonic() < deadline:
            runs, _ = await self.call("list runs", "list", status=NON_FINAL, limit=1)
            if not runs:
                return
            await asyncio.sleep(1.0)


async def all_runs(chaos: Chaos) -> list[ratchet.Run]:
    runs: list[ratchet.Run] = []
    token = ""
    while True:
        page, token = await chaos.call("list runs", "list", limit=1000, page_token=token)
        runs += page
        if not token:
            return runs


async def check(chaos: Chaos) -> None:
    """Every assertion of the suite, recorded as problems rather than raised, so
    one report shows everything that went wrong."""
    report = chaos.report
    listed = {r.id: r for r in await all_runs(chaos)}
    sem = asyncio.Semaphore(8)

    async def fetch(run_id: str) -> tuple[ratchet.Run, list[ratchet.RunEvent]] | None:
        async with sem:
            try:
                run = await chaos.call(f"get {run_id}", "get", run_id)
            except ratchet.NotFoundError:
                return None
            return run, await chaos.call(f"history of {run_id}", "history", run_id)

    fetched = await asyncio.gather(*(fetch(run_id) for run_id in listed))
    runs = {item[0].id: item for item in fetched if item is not None}
    report.runs = len(runs)
    report.top_level = sum(1 for run, _ in runs.values() if not run.parent_run_id)
    report.children = report.runs - report.top_level

    # The engine's invariant check (what the reconciler would repair) finds nothing.
    for line in await stuck_runs(chaos.postgres.url):
        report.problems.append(f"INVARIANT {line}")
    # Lost: a trigger was acknowledged, and the run is gone.
    for run_id in chaos.triggered:
        if run_id not in runs:
            report.lost += 1
            report.problems.append(f"LOST {run_id}: triggered, acknowledged, now not found")
    # Duplicated: two runs for one idempotency key, or runs nobody triggered.
    by_key = collections.defaultdict(list)
    for run, _ in runs.values():
        if not run.parent_run_id:
            by_key[run.idempotency_key].append(run.id)
    for key, ids in by_key.items():
        if len(ids) > 1:
            report.duplicated += len(ids) - 1
            report.problems.append(f"DUPLICATED idempotency key {key}: runs {ids}")

    executions = read_executions(chaos.dir)
    children_of = collections.defaultdict(list)
    for run, _ in runs.values():
        if run.parent_run_id:
            children_of[run.parent_run_id].append(run)
    for run, events in runs.values():
        if not run.status.is_final:
            report.stuck += 1
            steps = ", ".join(f"{s.key}:{s.kind}:{s.status}" for s in run.steps)
            tail = ", ".join(e.type + (f"({e.step_key})" if e.step_key else "")
                             for e in events[-8:])
            report.problems.append(f"STUCK {run.id} ({run.task_id}) {run.status} attempt "
                                   f"{run.attempt}; steps [{steps}]; history ... {tail}")
            continue
        report.leases_lost += sum(1 for e in events if e.type == "lease_lost")
        for e in events:
            if e.type == "repaired":
                # The reconciler only repairs a run nothing would move again:
                # a lost wake-up (or another stranding) happened.
                report.repaired += 1
                report.problems.append(f"REPAIRED {run.id} ({run.task_id}) at attempt "
                                       f"{e.attempt}: {e.data}; history: {describe(events)}")
        check_outcome(report, run)
        report.problems += check_history(run, events)
        check_executions(chaos, report, run, events, executions.get(run.id, []))
        if run.task_id in ("chaos-parent", "chaos-gather"):
            check_children(report, run, children_of.get(run.id, []))


def check_outcome(report: Report, run: ratchet.Run) -> None:
    status, output = tasks.expected(run.task_id, run.payload)
    wrong = run.status.value != status or (output is not None and run.output != output)
    if run.task_id == "chaos-sleeper" and run.status.value == "COMPLETED":
        slept = float(run.output["slept"])
        wrong = wrong or slept < run.payload["seconds"] - 0.01
    if wrong:
        report.wrong += 1
        report.problems.append(
            f"WRONG {run.id} ({run.task_id}): {run.status.value} output {run.output!r} error "
            f"{run.error}; expected {status} {output!r} for payload {run.payload!r}")


def check_history(run: ratchet.Run, events: list[ratchet.RunEvent]) -> list[str]:
    """How the history of a final run disagrees with the run (nothing when it agrees)."""
    problems = []
    types = [e.type for e in events]
    where = f"HISTORY {run.id} ({run.task_id}):"
    if [e.id for e in events] != sorted(e.id for e in events):
        problems.append(f"{where} events out of order")
    if not events or events[0].type != "triggered":
        problems.append(f"{where} does not start with triggered: {types[:3]}")
    finishing = [e for e in events if e.type in FINISHING]
    if len(finishing) != 1:
        problems.append(f"{where} {len(finishing)} final entries: {types}")
    elif events[-1] is not finishing[0]:
        problems.append(f"{where} entries after the final one: {types}")
    if finishing and finishing[-1].data.get("status", run.status.value) != run.status.value:
        problems.append(f"{where} final entry says {finishing[-1].data.get('status')}, "
                        f"run is {run.status.value}")
    # Step entries carry the step's attempt; the others the run's. A lost or
    # released lease gives its attempt back, so a run that ends before its next
    # lease (canceled while queued) may end one below such an entry's attempt.
    over = [e.attempt for e in events if not e.step_key and e.attempt > run.attempt
            and e.type not in ("lease_lost", "lease_released", "leased")]
    if over:
        problems.append(f"{where} attempts {over} above the run's {run.attempt}: "
                        + describe(events))
    leases = [e.attempt for e in events if e.type == "leased"]
    if leases != sorted(leases):
        problems.append(f"{where} lease attempts go down: {leases}")
    current = None
    for e in events:
        if e.type == "leased":
            if current is not None:
                problems.append(f"{where} two leases at once: {types}")
                break
            current = e.lease_id
        elif e.type in LEASE_ENDS and e.lease_id and e.lease_id == current:
            current = None
    completed = collections.Counter(e.step_key for e in events if e.type == "step_completed")
    twice = [k for k, n in completed.items() if n > 1]
    if twice:
        problems.append(f"{where} steps completed twice: {twice}")
    missing = {s.key for s in run.steps if s.status == "COMPLETED" and s.kind == "run"}
    missing -= set(completed)
    if missing:
        problems.append(f"{where} completed steps without step_completed: {sorted(missing)}")
    return problems


def describe(events: list[ratchet.RunEvent]) -> str:
    """A history in one line: type/attempt(step key)."""
    return ", ".join(f"{e.type}/{e.attempt}" + (f"({e.step_key})" if e.step_key else "")
                     for e in events)


@dataclasses.dataclass(frozen=True)
class Execution:
    key: str
    outcome: str
    pid: int
    attempt: int
    started: float
    finished: float
    lease: str


def read_executions(directory: Path) -> dict[str, list[Execution]]:
    found: dict[str, list[Execution]] = {}
    for path in (directory / "runs").iterdir():
        rows = []
        for line in path.read_text().splitlines():
            key, outcome, pid, attempt, started, finished, lease = line.split()
            rows.append(Execution(key, outcome, int(pid), int(attempt), float(started),
                                  float(finished), lease))
        found[path.name] = rows
    return found


def check_executions(chaos: Chaos, report: Report, run: ratchet.Run,
                     events: list[ratchet.RunEvent], rows: list[Execution]) -> None:
    """A successful execution of a step after the first is a re-execution. It is
    explained if the earlier one's checkpoint may have been lost to a fault
    (its worker killed or stopped, a coordinator killed, Postgres restarted,
    or its lease lost); it is a violation if it started after the step's
    completion was recorded."""
    completed_at = {}
    for e in events:
        if e.type == "step_completed" and e.step_key not in completed_at and e.at is not None:
            completed_at[e.step_key] = e.at.timestamp()
    lost_at = [e.at.timestamp() for e in events
               if e.type in ("lease_lost", "lease_released") and e.at is not None]
    leases = [(e.at.timestamp(), e.lease_id or "") for e in events
              if e.type == "leased" and e.at is not None]
    by_key = collections.defaultdict(list)
    for row in rows:
        if row.outcome == "ok":
            by_key[row.key].append(row)
    for key, oks in by_key.items():
        oks.sort(key=lambda r: r.started)
        for before, again in itertools.pairwise(oks):
            report.re_executions += 1
            done = completed_at.get(key)
            if done is not None and again.started > done and zombie(chaos, again, leases):
                # A worker that lost its lease without knowing it (it was
                # stopped, or its coordinator or the database went away) keeps
                # executing until a write is refused (guarantees §3, Partial).
                report.stale += 1
                continue
            if done is not None and again.started > done:
                report.unexplained += 1
                report.problems.append(
                    f"RE-RAN {run.id} step {key}: completed at {done:.3f}, ran again at "
                    f"{again.started:.3f} (pid {again.pid}, attempt {again.attempt}; "
                    f"first pid {before.pid}, attempt {before.attempt})")
                continue
            if not explained(chaos, before, again, lost_at):
                report.unexplained += 1
                report.problems.append(
                    f"RE-RAN {run.id} step {key} with no fault to explain it: first pid "
                    f"{before.pid} attempt {before.attempt} at {before.started:.3f}, again pid "
                    f"{again.pid} attempt {again.attempt} at {again.started:.3f}")


def zombie(chaos: Chaos, again: Execution, leases: list[tuple[float, str]]) -> bool:
    """Whether `again` ran under a lease that was no longer current, in a worker a
    fault could have cut off from its coordinator."""
    granted = [lease for at, lease in sorted(leases) if at <= again.started]
    if not granted or again.lease == granted[-1]:
        return False
    for start, end, kind, pid in chaos.faults:
        if kind == "worker_stop" and pid == again.pid:
            return True
        if kind in ("coordinator_kill", "postgres_restart") and \
                start <= again.started <= end + 3 * TTL_SECONDS + 2:
            return True
    return False


def explained(chaos: Chaos, before: Execution, again: Execution, lost_at: list[float]) -> bool:
    if before.lease == again.lease:
        return False  # the same lease ran the step twice
    for start, end, kind, pid in chaos.faults:
        if kind in ("worker_kill", "worker_stop", "unexpected_exit") and pid == before.pid:
            return True
        if kind in ("coordinator_kill", "postgres_restart") and \
                start - 1.0 <= again.started and end + 3 * TTL_SECONDS >= before.finished:
            return True
    return any(before.started <= t <= again.started + 0.5 for t in lost_at)


def check_children(report: Report, parent: ratchet.Run, children: list[ratchet.Run]) -> None:
    """Each parent step created its children exactly once."""
    seen: collections.Counter[tuple[str, Any]] = collections.Counter()
    for child in children:
        steps = [t for t in child.tags if t.startswith("step:")]
        seen[(steps[0] if steps else "?", child.payload.get("n"))] += 1
    if parent.task_id == "chaos-parent":
        want = collections.Counter({("step:batch", i): 1
                                    for i in range(parent.payload["children"])})
        want[("step:single", 10)] = 1
    else:
        want = collections.Counter({("step:kid", 3): 1})
    if parent.status.value == "COMPLETED" and seen != want:
        report.problems.append(f"CHILDREN {parent.id} ({parent.task_id}): {dict(seen)}, "
                               f"expected {dict(want)}")
    elif seen - want:
        report.problems.append(f"CHILDREN {parent.id}: extra children {dict(seen - want)}")


async def run_chaos(config: Config, tmp: Path) -> tuple[Report, str]:
    """Run the suite once; return the report and the processes' logs (tails)."""
    chaos = Chaos(config, tmp)
    try:
        report = await chaos.run()
    finally:
        await chaos.close()
    return report, chaos.logs()

