"""`ratchet runs`: list, show, cancel, history, replay, discard, retry."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ratchet._cli._common import (
    DURATION_FORMAT,
    JSON_FORMS,
    CLIError,
    UsageError,
    client_args,
    duration,
    payload,
    status_option,
)
from ratchet._cli._render import render_history, render_run, run_json, shown_attempt
from ratchet._client import Client
from ratchet._errors import ClientError, RatchetError
from ratchet._types import Run, RunStatus


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    runs = sub.add_parser(
        "runs", help="list, inspect, cancel and replay runs",
        description="List, inspect, cancel, replay, retry and discard runs.").add_subparsers(
        dest="runs_command", required=True, metavar="SUBCOMMAND")
    p = runs.add_parser("list", help="runs, newest first, one line each",
                        description="List runs, newest first: id, task, status, attempt and "
                                    "creation time (summaries: no payload or output).")
    status_option(p, "only runs in this status (default: every status)")
    p.add_argument("--task", default=None, metavar="TASK", help="only runs of this task")
    p.add_argument("--tag", default=None, metavar="TAG", help="only runs with this tag")
    p.add_argument("--parent", default=None, metavar="RUN_ID",
                   help="only the child runs of this run")
    p.add_argument("--error-type", default=None, metavar="TYPE",
                   help="only runs whose last error has exactly this type, as `runs show` "
                        "prints it (e.g. KeyError, ratchet.NonRetryableError)")
    p.add_argument("--since", type=duration, default=None, metavar="DURATION",
                   help=f"only runs created in the last DURATION ({DURATION_FORMAT}; "
                        "default: any time)")
    p.add_argument("--include-discarded", action="store_true",
                   help="list discarded runs too (default: hidden)")
    p.add_argument("--stuck", action="store_true",
                   help="only unfinished runs that nothing would move again, and why "
                        "(the reconciler's check; admin key)")
    p.add_argument("--limit", type=int, default=50, metavar="N",
                   help="at most N runs, 1 to 1000 (default 50)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON array of run summaries instead of lines")
    client_args(p)
    p = runs.add_parser("show", help="one run: status, step tree, error",
                        description="Show one run: its status, attempts, payload and output, "
                                    "and its steps as a tree with durations, attempts and "
                                    "errors.")
    p.add_argument("run_id", metavar="RUN_ID", help="the run's id (run_...)")
    p.add_argument("--json", action="store_true", help="print the whole run as JSON")
    client_args(p)
    p = runs.add_parser("cancel", help="cancel a run and its unfinished child runs",
                        description="Cancel a run that is not final, and its unfinished "
                                    "child runs; a running attempt is told to stop. Prints "
                                    "RUN_ID CANCELED.")
    p.add_argument("run_id", metavar="RUN_ID", help="the run's id (run_...)")
    p.add_argument("--reason", default="", metavar="TEXT",
                   help="why, kept with the run (default: none)")
    client_args(p)
    p = runs.add_parser("history", help="a run's history as a timeline",
                        description="A run's history, oldest first: time since the first "
                                    "entry, entry type, attempt, lease, step and details.")
    p.add_argument("run_id", metavar="RUN_ID", help="the run's id (run_...)")
    p.add_argument("--json", action="store_true", help="print every entry in full as JSON")
    client_args(p)
    p = runs.add_parser("replay", help="a new attempt from the last checkpoint (one run, "
                                       "or every run matching the filters)",
                        description="Replay a run after a fix: a new attempt of the same run "
                                    "from its last checkpoint (completed steps are not run "
                                    "again). With no RUN_ID, replay every run matching "
                                    "--status, --task and --tag (at least one of them).")
    p.add_argument("run_id", nargs="?", metavar="RUN_ID",
                   help="the run to replay (omit it to select runs with the filters)")
    p.add_argument("--from-scratch", action="store_true",
                   help="start a new run of the same task with the same payload instead")
    p.add_argument("--rerun-compensated", action="store_true",
                   help="replay runs whose compensations (undos) have run, too")
    status_option(p, "with no RUN_ID: runs in this status (default FAILED)")
    p.add_argument("--task", default=None, metavar="TASK",
                   help="with no RUN_ID: runs of this task")
    p.add_argument("--tag", default=None, metavar="TAG", help="with no RUN_ID: runs with this tag")
    client_args(p)
    p = runs.add_parser("discard", help="hide a final run from listings",
                        description="Hide a final run from `runs list` (its data and history "
                                    "stay until retention deletes them).")
    p.add_argument("run_id", metavar="RUN_ID", help="the run's id (run_...)")
    client_args(p)
    p = runs.add_parser("retry", help="a new run with a corrected payload",
                        description="Start a new run of the same task with a corrected "
                                    "payload, linked to the old run (replay_of). Prints the "
                                    "new run's id.")
    p.add_argument("run_id", metavar="RUN_ID", help="the run to retry (run_...)")
    p.add_argument("--payload", required=True, metavar="JSON",
                   help=f"the corrected payload (required): {JSON_FORMS}")
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
                          f"attempt {shown_attempt(r)}  {created}")
        elif args.runs_command == "show":
            await _show(client, args)
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


async def _show(client: Client, args: argparse.Namespace) -> None:
    """The run, with its child runs and, when canceled, the reason given."""
    run = await client.get(args.run_id)
    children: list[Run] = []
    token = ""
    while True:
        page, token = await client.list(parent=run.id, limit=1000, page_token=token)
        children += page
        if not token:
            break
    reason = await _cancel_reason(client, run) if run.status is RunStatus.CANCELED else ""
    if args.json:
        print(json.dumps(run_json(run, children, reason), indent=2))
    else:
        print(render_run(run, children, reason))


async def _cancel_reason(client: Client, run: Run) -> str:
    """The reason given when the run was canceled (its last canceled event)."""
    for event in reversed(await client.history(run.id)):
        if event.type == "canceled":
            return str(event.data.get("reason", "") or "")
    return ""


async def _replay(client: Client, args: argparse.Namespace) -> None:
    if args.run_id:
        run = await client.replay(args.run_id, from_scratch=args.from_scratch,
                                  rerun_compensated=args.rerun_compensated)
        print(f"{run.id} {run.status.value}")
        return
    if not (args.status or args.task or args.tag):
        raise UsageError("name a run, or select runs with --status, --task or --tag "
                         "(see ratchet runs replay --help)")
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
