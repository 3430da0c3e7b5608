"""`ratchet tasks` and `ratchet workers`: what the environment has registered,
and which workers are connected to serve it."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from ratchet._cli._common import CLIError, UsageError, client_args
from ratchet._client import Client
from ratchet._retry import Retry
from ratchet._types import TaskInfo, WorkerInfo

COMMANDS = ("tasks", "workers")

_SCOPE = ("Sessions live on the coordinator a worker streams to: with several "
          "coordinators, each shows its own (pass each one's --coordinator).")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "tasks", help="list the registered tasks and the workers serving them now",
        description="The tasks registered in the key's environment (by any worker's "
                    "hello), with their retry policy, payload schema and the worker "
                    "sessions connected to this coordinator that serve them now. A task "
                    "stays registered after its workers stop; it is then served by "
                    "nobody and its runs wait QUEUED. " + _SCOPE)
    p.add_argument("task", nargs="?", default=None,
                   help="show only this task id (default: every task)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON array of tasks, schemas in full (default: a table)")
    client_args(p)
    p = sub.add_parser(
        "workers", help="list the worker sessions connected to this coordinator",
        description="The worker sessions of the key's environment connected to this "
                    "coordinator, oldest first: session id, worker id, tasks, slots used "
                    "and free, and when the coordinator last heard from the worker. "
                    + _SCOPE)
    p.add_argument("task", nargs="?", default=None,
                   help="show only the sessions serving this task id (default: all)")
    p.add_argument("--task", dest="task_option", default=None, metavar="TASK",
                   help="the same as the TASK argument (default: all)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON array of sessions (default: a table)")
    client_args(p)


async def run(args: argparse.Namespace) -> int:
    async with Client(args.coordinator, api_key=args.api_key) as client:
        if args.command == "tasks":
            tasks = await client.tasks(args.task)
            if args.task and not tasks:  # like `runs show` of an unknown run: a failure
                raise CLIError(f"task {args.task!r} is not registered in this environment: "
                               "start a worker that serves it (ratchet worker MODULE)")
            workers = await client.workers()
            if args.json:
                print(json.dumps([t.to_dict() for t in tasks], indent=2))
            else:
                _print_tasks(tasks, workers)
        else:
            if args.task and args.task_option and args.task != args.task_option:
                raise UsageError(f"two tasks given ({args.task!r} and --task "
                                 f"{args.task_option!r}): give one")
            task = args.task or args.task_option
            found = await client.workers(task)
            if args.json:
                print(json.dumps([w.to_dict() for w in found], indent=2))
            else:
                _print_workers(found, task)
    return 0


def _console() -> Console:
    console = Console(highlight=False, markup=False, emoji=False)
    if not console.is_terminal:
        # Piped: never fold an id over two lines.
        console = Console(highlight=False, markup=False, emoji=False, width=10_000)
    return console


def _print_tasks(tasks: Sequence[TaskInfo], workers: Sequence[WorkerInfo]) -> None:
    if not tasks:
        print("no tasks registered in this environment: start a worker "
              "(ratchet worker MODULE)")
        return
    worker_of = {w.session_id: w.worker_id for w in workers}
    table = Table(box=None, pad_edge=False)
    for column in ("TASK", "RETRY", "MAX DURATION", "PAYLOAD SCHEMA", "SERVED BY"):
        table.add_column(column, overflow="fold")
    for t in tasks:
        served = ", ".join(f"{s} ({worker_of[s]})" if s in worker_of else s
                           for s in t.served_by) or "nobody: its runs wait QUEUED"
        duration = "-" if t.max_duration is None else _seconds(t.max_duration)
        table.add_row(t.id, _retry(t.retry), duration, _schema(t.payload_schema), served)
    _console().print(table)


def _print_workers(workers: Sequence[WorkerInfo], only: str | None) -> None:
    if not workers:
        print(f"no worker connected to this coordinator serves {only!r}: start one "
              "(ratchet worker MODULE)" if only else
              "no workers connected to this coordinator: start one (ratchet worker MODULE)")
        return
    now = dt.datetime.now(dt.UTC)
    table = Table(box=None, pad_edge=False)
    for column in ("SESSION", "WORKER", "SLOTS USED", "FREE", "LAST HEARTBEAT", "CONNECTED",
                   "TASKS"):
        table.add_column(column, overflow="fold")
    for w in workers:
        table.add_row(w.session_id, w.worker_id, str(w.slots_used), str(w.slots_free),
                      _ago(w.last_seen_at, now), _ago(w.connected_at, now), ",".join(w.task_ids))
    _console().print(table)


def _retry(r: Retry) -> str:
    attempts = "unlimited attempts" if r.max_attempts is None else \
        f"{r.max_attempts} attempt" + ("s" if r.max_attempts != 1 else "")
    return (f"{attempts}, backoff {_seconds(r.min_delay)}..{_seconds(r.max_delay)} "
            f"x{r.factor:g}" + (" jitter" if r.jitter else ""))


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:g}s"


def _schema(schema: object) -> str:
    if schema is None:
        return "any JSON"
    text = json.dumps(schema, separators=(",", ":"))
    return text if len(text) <= 60 else text[:57] + "..."


def _ago(when: dt.datetime | None, now: dt.datetime) -> str:
    if when is None:
        return "-"
    seconds = max(0.0, (now - when).total_seconds())
    return f"{when:%H:%M:%S} ({seconds:.0f}s ago)"
