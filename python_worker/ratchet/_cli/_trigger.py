"""`ratchet trigger`: start a run (and wait for it)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ratchet._cli._common import (
    JSON_FORMS,
    check_one_stdin,
    client_args,
    duration,
    json_object_of_strings,
    payload,
)
from ratchet._cli._render import render_run
from ratchet._client import Client
from ratchet._errors import ClientError, RunFailedError
from ratchet._types import Run, RunStatus


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "trigger", help="start a run",
        description="Start a run of TASK and print its id (with --wait, its result). "
                    "With --idempotency-key, a key already in use starts nothing: the "
                    "existing run is printed, a note on stderr says so (and warns if its "
                    "payload differs), and the exit code is 0.")
    p.add_argument("task", help="the task's id, as its worker registered it")
    p.add_argument("--payload", default="{}",
                   help=f"the run's input: {JSON_FORMS} (default {{}}; at most 1 MiB)")
    p.add_argument("--metadata", default=None,
                   help="labels kept with the run, shown by `runs show`: a JSON object of "
                        "strings, e.g. '{\"team\": \"billing\"}', or @FILE or - "
                        "(default none)")
    p.add_argument("--idempotency-key", default=None,
                   help="at most one run per task and key for 24 hours; a repeat returns "
                        "the existing run and starts nothing (default none)")
    p.add_argument("--delay", type=duration, default=None,
                   help="do not start before now + DELAY: a duration such as 30s, 500ms, "
                        "5m, 2h, 1d or plain seconds (default 0)")
    p.add_argument("--ttl", type=duration, default=None,
                   help="EXPIRED if still not started DURATION after it was due, e.g. 10m "
                        "(default never)")
    p.add_argument("--max-duration", type=duration, default=None,
                   help="TIMED_OUT once the run has taken longer than DURATION since its "
                        "first start, e.g. 1h (default the task's)")
    p.add_argument("--priority", type=int, default=0,
                   help="an integer from -1000 to 1000; higher runs of a task start "
                        "first (default 0)")
    p.add_argument("--tag", action="append", default=[],
                   help="a label to list runs by (`runs list --tag`); repeat for more "
                        "(default none)")
    p.add_argument("--wait", action="store_true",
                   help="wait until the run is final and show it; exit 1 unless it "
                        "COMPLETED (default: print the id and return)")
    p.add_argument("--timeout", type=duration, default=None,
                   help="with --wait: give up (exit 1) after DURATION, e.g. 30s "
                        "(default wait forever)")
    p.add_argument("--json", action="store_true",
                   help="print the run as JSON, with \"created\" (default: its id)")
    client_args(p)


async def run(args: argparse.Namespace) -> int:
    check_one_stdin(args, "payload", "metadata")
    sent = payload(args.payload)
    metadata = (None if args.metadata is None
                else json_object_of_strings(args.metadata, "--metadata"))
    async with Client(args.coordinator, api_key=args.api_key) as client:
        run = await client.trigger(args.task, sent,
                                   idempotency_key=args.idempotency_key, delay=args.delay,
                                   ttl=args.ttl, max_duration=args.max_duration,
                                   priority=args.priority, tags=args.tag, metadata=metadata)
        created = run.created
        if not created:
            _say_not_created(run, sent, args.idempotency_key)
        if args.wait:
            try:
                run = await client.wait(run.id, timeout=args.timeout)
            except TimeoutError as exc:
                raise TimeoutError(await _why_still_waiting(client, run.id, args.task,
                                                            exc)) from None
            run = await client.get(run.id)
        if args.json:
            print(json.dumps({**run.to_dict(), "created": created}, indent=2))
        elif args.wait:
            print(render_run(run))
        else:
            print(run.id)
        if args.wait and run.status is not RunStatus.COMPLETED:
            raise RunFailedError(run)
    return 0


def _say_not_created(run: Run, sent: Any, key: str | None) -> None:
    """On stderr, so that stdout stays the run (its id, or JSON) for scripts:
    the key matched a run that exists, so this is not a failure (exit 0)."""
    print(f"ratchet: idempotency key {key!r} matched existing run {run.id} "
          f"({run.status.value}); no new run was created", file=sys.stderr)
    if _canonical(run.payload) != _canonical(sent):
        print("ratchet: warning: the existing run's payload differs from --payload; it "
              "keeps its own payload (use a new --idempotency-key to start a run with "
              "this one)", file=sys.stderr)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


async def _why_still_waiting(client: Client, run_id: str, task: str, exc: TimeoutError) -> str:
    """The --timeout message; for a run still QUEUED whose task no worker
    connected to this coordinator serves, also why and what to do."""
    try:
        if (await client.get(run_id)).status is not RunStatus.QUEUED or \
                await client.workers(task):
            return str(exc)
    except ClientError:  # e.g. a coordinator without ListWorkers: no hint then
        return str(exc)
    return (f"{exc}: no worker connected to the coordinator at {client.coordinator} serves "
            f"task {task!r}; start one with `ratchet worker MODULE` (MODULE defines the "
            f"task) and the run will start")
