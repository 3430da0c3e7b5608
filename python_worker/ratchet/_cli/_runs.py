"""`ratchet runs`: list, show, cancel, history, replay, discard, retry."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ratchet._cli._common import CLIError, client_args, duration, payload
from ratchet._cli._render import render_history, render_run
from ratchet._client import Client
from ratchet._errors import ClientError, RatchetError


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    client_args(p)
    p = runs.add_parser("show")
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true")
    client_args(p)
    p = runs.add_parser("cancel")
    p.add_argument("run_id")
    p.add_argument("--reason", default="")
    client_args(p)
    p = runs.add_parser("history", help="a run's history as a timeline")
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true")
    client_args(p)
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
    client_args(p)
    p = runs.add_parser("discard", help="hide a final run from listings")
    p.add_argument("run_id")
    client_args(p)
    p = runs.add_parser("retry", help="a new run with a corrected payload")
    p.add_argument("run_id")
    p.add_argument("--payload", required=True)
    client_args(p)


async def run(args: argparse.Namespace) -> int:
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
            run = await client.retry(args.run_id, payload(args.payload))
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
