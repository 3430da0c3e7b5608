"""The `ratchet` command line.

Errors are one line on stderr and a non-zero exit, never a traceback.
Commands that run a coordinator (`dev`, `server`, `migrate`, `keys`) need the
`server` extra; the others need only the SDK.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import threading
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ratchet._client import Client
from ratchet._errors import ClientError, RatchetError, RunFailedError
from ratchet._task import Task
from ratchet._types import Run, RunEvent, RunStatus, Token
from ratchet._worker import Worker

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class CLIError(Exception):
    """A problem to report in one line."""


def duration(text: str) -> float:
    """Parse `15s`, `500ms`, `2m`, `1h`, `30d` or plain seconds."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (use e.g. 15s, 500ms, 2m)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _timing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lease-ttl", type=duration, default=duration("30s"),
                   help="how long a lease lives without a heartbeat (default 30s)")
    p.add_argument("--heartbeat-interval", type=duration, default=duration("5s"),
                   help="how often workers must send a heartbeat (default 5s)")
    p.add_argument("--session-grace", type=duration, default=duration("1s"),
                   help="how long a closed session's leases wait for a reconnect (default 1s)")
    p.add_argument("--retention", type=duration, default=duration("30d"),
                   help="delete finished runs (steps, history) after this; 0 keeps them "
                        "(default 30d)")
    p.add_argument("--reconcile-interval", type=duration, default=duration("5s"),
                   help="how often each coordinator checks a page of unfinished runs for "
                        "ones nothing would move again, and repairs them; 0 disables "
                        "(default 5s)")
    p.add_argument("--key-cache", type=duration, default=duration("10s"),
                   help="how long a revoked API key may keep working: key lookups are "
                        "cached this long and open sessions' keys checked this often "
                        "(default 10s)")


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", default=None,
                   help="HOST:PORT (default $RATCHET_COORDINATOR or 127.0.0.1:7420)")
    p.add_argument("--api-key", default=None, help="API key (default $RATCHET_API_KEY)")


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line too (`ratchet ... --help` shows the usage)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"ratchet: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ratchet", description="Durable execution for Python.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("dev", help="coordinator on the embedded SQLite store (loopback, no auth)")
    p.add_argument("--port", type=int, default=7420)
    p.add_argument("--http-port", type=int, default=7421)
    p.add_argument("--public-url", default="", metavar="URL",
                   help="base of the token completion URLs handed out (default "
                        "http://127.0.0.1:HTTP_PORT)")
    p.add_argument("--db", default=".ratchet/dev.db", help="SQLite file (default .ratchet/dev.db)")
    p.add_argument("--worker", action="append", default=[], metavar="MODULE",
                   help="serve this module's tasks in-process (repeatable)")
    p.add_argument("--slots", type=int, default=8, help="slots of in-process workers")
    _timing_args(p)

    p = sub.add_parser("server", help="coordinator against Postgres or SQLite (auth required)")
    p.add_argument("--database-url", required=True)
    p.add_argument("--listen", default="127.0.0.1:7420",
                   help="gRPC HOST:PORT (default loopback; use 0.0.0.0:7420 to serve remote "
                        "workers, behind TLS until Ratchet terminates it itself)")
    p.add_argument("--http-listen", default="127.0.0.1:7421", help="HTTP HOST:PORT")
    p.add_argument("--public-url", default="", metavar="URL",
                   help="where clients reach the HTTP port, the base of token completion "
                        "URLs, e.g. https://ratchet.example.com (default http://HTTP_LISTEN)")
    p.add_argument("--no-notify", action="store_true",
                   help="Postgres: send no NOTIFY and LISTEN for none, for distributed "
                        "Postgres-compatible databases without LISTEN/NOTIFY (CockroachDB). "
                        "Runs made ready on another coordinator are then found by this "
                        "one's dispatcher poll (--poll-interval) instead of at once; "
                        "nothing else changes (docs/operations.md, 'Past one Postgres')")
    p.add_argument("--poll-interval", type=duration, default=None,
                   help="how often the dispatcher looks for ready runs when nothing wakes "
                        "it: the bound on how late a run made ready on another coordinator "
                        "starts without NOTIFY (default 1s; 250ms with --no-notify)")
    _timing_args(p)

    p = sub.add_parser("migrate", help="apply schema migrations")
    p.add_argument("--database-url", required=True)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command",
                                                                  required=True)
    p = keys.add_parser("create", help="create a key and print it (once)")
    p.add_argument("--database-url", required=True)
    p.add_argument("--env", required=True)
    p.add_argument("--role", required=True, choices=["client", "worker", "admin"])
    p.add_argument("--name", default="")
    p = keys.add_parser("list", help="every key: id, environment, role, name, dates "
                                     "(never the key itself)")
    p.add_argument("--database-url", required=True)
    p.add_argument("--env", default=None, help="only the keys of this environment")
    p.add_argument("--json", action="store_true")
    p = keys.add_parser("revoke", help="revoke a key: coordinators refuse it and end the "
                                       "sessions it opened (within --key-cache)")
    p.add_argument("key_id", metavar="KEY_ID")
    p.add_argument("--database-url", required=True)

    p = sub.add_parser("worker", help="serve the tasks defined in modules")
    p.add_argument("modules", nargs="+", metavar="MODULE[:ATTR]")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--drain-timeout", type=duration, default=duration("30s"))
    _client_args(p)

    p = sub.add_parser("trigger", help="start a run")
    p.add_argument("task")
    p.add_argument("--payload", default="{}", help="JSON payload (default {})")
    p.add_argument("--idempotency-key", default=None)
    p.add_argument("--delay", type=duration, default=None, help="not before now + DELAY")
    p.add_argument("--ttl", type=duration, default=None, help="EXPIRED if not started in time")
    p.add_argument("--max-duration", type=duration, default=None, help="TIMED_OUT after this")
    p.add_argument("--priority", type=int, default=0, help="higher runs of a task start first")
    p.add_argument("--tag", action="append", default=[])
    p.add_argument("--wait", action="store_true", help="wait until the run is final")
    p.add_argument("--timeout", type=duration, default=None, help="with --wait")
    p.add_argument("--json", action="store_true")
    _client_args(p)

    tokens = sub.add_parser("tokens", help="wait tokens").add_subparsers(
        dest="tokens_command", required=True)
    p = tokens.add_parser("complete", help="complete a wait token, waking its run")
    p.add_argument("token")
    p.add_argument("--data", default="null", help="JSON handed to the waiting task")
    _client_args(p)
    p = tokens.add_parser("create", help="create a wait token outside any run; print it")
    p.add_argument("--timeout", type=duration, default=None, help="TIMED_OUT after this")
    p.add_argument("--idempotency-key", default="")
    p.add_argument("--tag", action="append", default=[])
    p.add_argument("--json", action="store_true")
    _client_args(p)
    p = tokens.add_parser("get", help="show a token created outside a run, with its URL")
    p.add_argument("token")
    p.add_argument("--json", action="store_true")
    _client_args(p)
    p = tokens.add_parser("list", help="tokens created outside runs, newest first")
    p.add_argument("--run", default=None, help="only the token this run waits on")
    p.add_argument("--status", action="append", default=[],
                   choices=["WAITING", "COMPLETED", "TIMED_OUT"])
    p.add_argument("--tag", action="append", default=[], help="only tokens with every tag")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    _client_args(p)

    runs = sub.add_parser("runs", help="inspect and cancel runs").add_subparsers(
        dest="runs_command", required=True)
    p = runs.add_parser("list")
    p.add_argument("--status", action="append", default=[])
    p.add_argument("--task", default=None)
    p.add_argument("--tag", default=None)
    p.add_argument("--parent", default=None, help="only the child runs of this run")
    p.add_argument("--error-type", default=None, help="only runs failed with this error type")
    p.add_argument("--since", type=duration, default=None, help="only runs created this recently")
    p.add_argument("--include-discarded", action="store_true")
    p.add_argument("--stuck", action="store_true",
                   help="only unfinished runs that nothing would move again, and why "
                        "(the reconciler's check; admin key)")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    _client_args(p)
    p = runs.add_parser("show")
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true")
    _client_args(p)
    p = runs.add_parser("cancel")
    p.add_argument("run_id")
    p.add_argument("--reason", default="")
    _client_args(p)
    p = runs.add_parser("history", help="a run's history as a timeline")
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true")
    _client_args(p)
    p = runs.add_parser("replay", help="a new attempt from the last checkpoint (one run, "
                                       "or every run matching the filters)")
    p.add_argument("run_id", nargs="?")
    p.add_argument("--from-scratch", action="store_true", help="a new run, same payload")
    p.add_argument("--rerun-compensated", action="store_true",
                   help="replay runs whose compensations (undos) have run, too")
    p.add_argument("--status", action="append", default=[],
                   help="with no RUN: runs in this status (default FAILED)")
    p.add_argument("--task", default=None)
    p.add_argument("--tag", default=None)
    _client_args(p)
    p = runs.add_parser("discard", help="hide a final run from listings")
    p.add_argument("run_id")
    _client_args(p)
    p = runs.add_parser("retry", help="a new run with a corrected payload")
    p.add_argument("run_id")
    p.add_argument("--payload", required=True)
    _client_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = asyncio.run(_dispatch(args))
        return _exit_abandoning_threads(code) if args.command == "worker" else code
    except KeyboardInterrupt:
        return 130
    except (CLIError, RatchetError, OSError, ValueError) as exc:
        print(f"ratchet: {exc}", file=sys.stderr)
        # A worker refused mid-run (its key revoked) must not wait for a sync
        # step that ignores cancellation: the coordinator took its runs back.
        return _exit_abandoning_threads(1) if args.command == "worker" else 1
    except Exception as exc:  # last resort: still one line
        print(f"ratchet: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


async def _dispatch(args: argparse.Namespace) -> int:
    command = args.command
    if command in ("dev", "server", "migrate", "keys"):
        try:
            from ratchet_server import cli as server_cli
        except ImportError as exc:
            raise CLIError(f"`ratchet {command}` needs the server extra "
                           f"(pip install 'ratchet[server]'): {exc}") from None
        return await server_cli.run(args, load_tasks)
    if command == "worker":
        return await _worker(args)
    if command == "trigger":
        return await _trigger(args)
    if command == "tokens":
        return await _tokens(args)
    return await _runs(args)


def load_tasks(specs: Sequence[str]) -> list[Task[Any, Any]]:
    """Import `module`, `module:attr` or `path/to/file.py` and collect its tasks."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    found: dict[str, Task[Any, Any]] = {}
    for spec in specs:
        name, _, attr = spec.partition(":")
        try:
            if name.endswith(".py"):
                path = Path(name).resolve()
                loader = importlib.util.spec_from_file_location(path.stem, path)
                if loader is None or loader.loader is None:
                    raise CLIError(f"cannot load {name}")
                module = importlib.util.module_from_spec(loader)
                sys.modules[path.stem] = module
                loader.loader.exec_module(module)
            else:
                module = importlib.import_module(name)
        except (ImportError, FileNotFoundError) as exc:
            raise CLIError(f"cannot import {name!r}: {exc}") from None
        objects = [getattr(module, attr, None)] if attr else list(vars(module).values())
        if attr and objects[0] is None:
            raise CLIError(f"{name!r} has no attribute {attr!r}")
        for obj in objects:
            items = obj if isinstance(obj, list | tuple) else [obj]
            for item in items:
                if isinstance(item, Task):
                    found[item.id] = item
    if not found:
        raise CLIError(f"no @ratchet.task found in {', '.join(specs)}")
    return list(found.values())


async def _worker(args: argparse.Namespace) -> int:
    # gRPC hands every message between its own thread and the event loop; the
    # default 5 ms GIL switch interval makes each hand-off wait (BENCHMARKS.md).
    sys.setswitchinterval(0.0005)
    tasks = load_tasks(args.modules)
    worker = Worker(tasks, args.coordinator, slots=args.slots, api_key=args.api_key,
                    drain_timeout=args.drain_timeout)
    logging.getLogger("ratchet.worker").info(
        "serving %s with %d slots on %s", ", ".join(t.id for t in tasks), args.slots,
        worker.coordinator)
    await worker.run()
    return 0


def _exit_abandoning_threads(code: int) -> int:
    """A drained worker exits even if a sync step ignores cancellation: its run
    was released (or its lease will expire), so the thread's work is moot."""
    steps = [t for t in threading.enumerate() if t.name.startswith("ratchet-step")]
    for thread in steps:
        thread.join(0.2)
    stuck = [t for t in steps if t.is_alive()]
    if stuck:
        logging.getLogger("ratchet.worker").warning(
            "exiting with %d step thread(s) still running", len(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _payload(text: str, flag: str = "--payload") -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CLIError(f"{flag} is not valid JSON: {exc}") from None


async def _tokens(args: argparse.Namespace) -> int:
    async with Client(args.coordinator, api_key=args.api_key) as client:
        if args.tokens_command == "complete":
            if await client.complete_token(args.token, _payload(args.data, "--data")):
                print(f"{args.token} completed")
            else:
                print(f"{args.token} was already completed or timed out; nothing changed")
        elif args.tokens_command == "create":
            token = await client.create_token(timeout=args.timeout, tags=args.tag,
                                              idempotency_key=args.idempotency_key)
            print(json.dumps(_token_dict(token), indent=2) if args.json
                  else f"{token.id}\n{token.url}")
        elif args.tokens_command == "get":
            token = await client.get_token(args.token)
            if args.json:
                print(json.dumps(_token_dict(token), indent=2))
            else:
                print(_token_line(token))
                print(f"url: {token.url}")
                if token.status == "COMPLETED":
                    print(f"data: {json.dumps(token.data)}")
        else:
            found, _ = await client.list_tokens(run_id=args.run, status=args.status,
                                                tags=args.tag, limit=args.limit)
            if args.json:
                print(json.dumps([_token_dict(t) for t in found], indent=2))
            for t in [] if args.json else found:
                print(_token_line(t))
    return 0


def _token_dict(token: Token) -> dict[str, Any]:
    def iso(value: dt.datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    return {"id": token.id, "status": token.status, "url": token.url or None,
            "tags": list(token.tags), "idempotency_key": token.idempotency_key or None,
            "created_at": iso(token.created_at), "expires_at": iso(token.expires_at),
            "completed_at": iso(token.completed_at), "data": token.data,
            "run_id": token.run_id or None, "step_key": token.step_key or None}


def _token_line(t: Token) -> str:
    created = t.created_at.strftime("%Y-%m-%d %H:%M:%S") if t.created_at else ""
    expires = f"  expires {t.expires_at:%Y-%m-%d %H:%M:%S}" if t.expires_at else ""
    run = f"  run {t.run_id} ({t.step_key})" if t.run_id else ""
    tags = f"  tags {','.join(t.tags)}" if t.tags else ""
    return f"{t.id}  {t.status:<10} {created}{expires}{run}{tags}"


async def _trigger(args: argparse.Namespace) -> int:
    async with Client(args.coordinator, api_key=args.api_key) as client:
        run = await client.trigger(args.task, _payload(args.payload),
                                   idempotency_key=args.idempotency_key, delay=args.delay,
                                   ttl=args.ttl, max_duration=args.max_duration,
                                   priority=args.priority, tags=args.tag)
        if args.wait:
            run = await client.wait(run.id, timeout=args.timeout)
            run = await client.get(run.id)
        if args.json:
            print(json.dumps(run.to_dict(), indent=2))
        elif args.wait:
            print(render_run(run))
        else:
            print(run.id)
        if args.wait and run.status is not RunStatus.COMPLETED:
            raise RunFailedError(run)
    return 0


async def _runs(args: argparse.Namespace) -> int:
    async with Client(args.coordinator, api_key=args.api_key) as client:
        if args.runs_command == "list" and args.stuck:
            found = await client.stuck(args.limit)
            if args.json:
                print(json.dumps([{**r.to_dict(), "stuck_because": why} for r, why in found],
                                 indent=2))
            else:
                for r, why in found:
                    print(f"{r.id}  {r.task_id:<24} {r.status.value:<10} {why}")
                if not found:
                    print("no stuck runs")
        elif args.runs_command == "list":
            since = None if args.since is None else time.time() - args.since
            runs, _ = await client.list(status=args.status or None, task=args.task,
                                        tag=args.tag, parent=args.parent, limit=args.limit,
                                        error_type=args.error_type, created_after=since,
                                        include_discarded=args.include_discarded)
            if args.json:
                print(json.dumps([r.to_dict() for r in runs], indent=2))
            else:
                for r in runs:
                    created = r.created_at.strftime("%Y-%m-%d %H:%M:%S") if r.created_at else ""
                    print(f"{r.id}  {r.task_id:<24} {r.status.value:<10} "
                          f"attempt {r.attempt}  {created}")
        elif args.runs_command == "show":
            run = await client.get(args.run_id)
            print(json.dumps(run.to_dict(), indent=2) if args.json else render_run(run))
        elif args.runs_command == "cancel":
            run = await client.cancel(args.run_id, args.reason)
            print(f"{run.id} {run.status.value}")
        elif args.runs_command == "history":
            events = await client.history(args.run_id)
            if args.json:
                print(json.dumps([e.to_dict() for e in events], indent=2))
            else:
                print(render_history(events))
        elif args.runs_command == "discard":
            run = await client.discard(args.run_id)
            print(f"{run.id} discarded")
        elif args.runs_command == "retry":
            run = await client.retry(args.run_id, _payload(args.payload))
            print(run.id)
        else:
            await _replay(client, args)
    return 0


async def _replay(client: Client, args: argparse.Namespace) -> None:
    if args.run_id:
        run = await client.replay(args.run_id, from_scratch=args.from_scratch,
                                  rerun_compensated=args.rerun_compensated)
        print(f"{run.id} {run.status.value}")
        return
    if not (args.status or args.task or args.tag):
        raise CLIError("name a run, or select runs with --status, --task or --tag")
    if not args.status:
        args.status = ["FAILED"]  # a bulk replay is about failed runs unless told otherwise
    selected: list[str] = []
    token = ""
    while True:
        page, token = await client.list(status=args.status or None, task=args.task,
                                        tag=args.tag, limit=1000, page_token=token)
        selected += [r.id for r in page]
        if not token:
            break
    failures = skipped = 0
    for n, run_id in enumerate(selected, 1):
        try:
            await client.replay(run_id, from_scratch=args.from_scratch,
                                rerun_compensated=args.rerun_compensated)
        except RatchetError as exc:
            if isinstance(exc, ClientError) and _compensated(exc):
                skipped += 1
            else:
                failures += 1
                print(f"\n{run_id}: {exc}", file=sys.stderr)
        _progress(n, len(selected))
    print(f"\nreplayed {len(selected) - failures - skipped} of {len(selected)} run(s)")
    if skipped:
        print(f"skipped {skipped} compensated run(s): their undos have run "
              "(--rerun-compensated replays them anyway, --from-scratch starts them over)")
    if failures:
        raise CLIError(f"{failures} run(s) could not be replayed")


def _compensated(exc: ClientError) -> bool:
    """The coordinator refused to replay a run because its undos have run (its
    refusal names the flag that would force it)."""
    return exc.code == "FAILED_PRECONDITION" and "--rerun-compensated" in exc.message


def _progress(done: int, total: int, width: int = 30) -> None:
    filled = width * done // max(total, 1)
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="",
          file=sys.stderr, flush=True)


def render_history(events: Sequence[RunEvent]) -> str:
    """A run's history as a timeline: offset, event, attempt, lease, step, details."""
    if not events:
        return "(no history)"
    start = events[0].at
    lines = []
    for e in events:
        offset = "" if e.at is None or start is None else \
            f"+{(e.at - start).total_seconds() * 1000:9.0f}ms"
        detail = ", ".join(f"{k}={v}" for k, v in e.data.items()) if e.data else ""
        lease = e.lease_id[-12:] if e.lease_id else "-"
        lines.append(f"{offset:>13}  {e.type:<18} attempt {e.attempt:<3} lease {lease:<12} "
                     f"{e.step_key or '':<14} {detail}".rstrip())
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f}ms" if seconds < 10 else f"{seconds:.1f}s"


def render_run(run: Run) -> str:
    """A readable tree of a run and its steps."""
    total = None
    if run.started_at and run.finished_at:
        total = (run.finished_at - run.started_at).total_seconds()
    lost = f"lost leases {run.lease_losses}  " if run.lease_losses else ""
    lines = [f"{run.id}  {run.task_id}  {run.status.value}  attempt {run.attempt}  "
             f"{lost}{_ms(total)}"]
    failed_key = run.error.step_key if run.error is not None else ""
    for i, step in enumerate(run.steps):
        branch = "└─" if i == len(run.steps) - 1 else "├─"
        tries = f"{step.attempts} attempt" + ("s" if step.attempts != 1 else "")
        mark = "✗" if step.status == "FAILED" or step.key == failed_key else " "
        line = (f"{branch}{mark}{step.key:<20} {step.status:<10} {tries:<11} "
                f"{_ms(step.duration)}")
        if step.token_id and step.status == "RUNNING":
            line += f"  waiting on token {step.token_id}"
            if step.wake_at is not None:
                line += f" (times out {step.wake_at:%Y-%m-%d %H:%M:%S})"
        if step.error is not None:
            label = "last error" if step.status == "COMPLETED" else "error"
            line += f"  {label}: {step.error.type}: {step.error.message}"
        lines.append(line)
    if run.output is not None:
        lines.append(f"output: {json.dumps(run.output)}")
    if run.error is not None:
        where = f" in step {run.error.step_key}" if run.error.step_key else ""
        lines.append(f"error{where}: {run.error.type}: {run.error.message}")
        if run.status is RunStatus.FAILED and run.error.stack:
            lines.append("  " + run.error.stack.rstrip().splitlines()[-1])
            if any(s.key.startswith("ratchet:undo:") for s in run.steps):
                lines.append(f"  (attempt {run.attempt}; compensated: its undo steps ran, so "
                             f"`ratchet runs replay` needs --rerun-compensated; "
                             f"`ratchet runs history {run.id}` shows every try)")
            else:
                lines.append(f"  (attempt {run.attempt}; `ratchet runs history {run.id}` "
                             f"shows every try, `ratchet runs replay {run.id}` tries again)")
    return "\n".join(lines)
