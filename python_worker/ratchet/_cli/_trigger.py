"""`ratchet trigger`: start a run (and wait for it)."""

from __future__ import annotations

import argparse
import json

from ratchet._cli._common import client_args, duration, payload
from ratchet._cli._render import render_run
from ratchet._client import Client
from ratchet._errors import RunFailedError
from ratchet._types import RunStatus


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    client_args(p)


async def run(args: argparse.Namespace) -> int:
    async with Client(args.coordinator, api_key=args.api_key) as client:
        run = await client.trigger(args.task, payload(args.payload),
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
