"""`ratchet tokens`: complete, create, get and list wait tokens."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Any

from ratchet._cli._common import JSON_FORMS, CLIError, client_args, duration, payload
from ratchet._client import Client
from ratchet._types import Token


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tokens = sub.add_parser(
        "tokens", help="wait tokens",
        description="Wait tokens: what a run's ctx.wait_for_token waits on. Complete one "
                    "to wake its run; list a run's tokens with `tokens list --run RUN`."
    ).add_subparsers(dest="tokens_command", required=True, metavar="COMMAND")
    p = tokens.add_parser("complete", help="complete a wait token, waking its run",
                          description="Deliver data to a wait token; the run waiting on "
                                      "it resumes with the data. Exit status 1 when "
                                      "nothing changed (the token was completed or timed "
                                      "out before, or its run is final): the "
                                      "coordinator's reason is printed on stderr.")
    p.add_argument("token", help="the token's id (see `tokens list --run RUN`)")
    p.add_argument("--data", default="null",
                   help=f"what the waiting task receives: {JSON_FORMS} (default null; "
                        "at most 1 MiB)")
    client_args(p)
    p = tokens.add_parser("create", help="create a wait token outside any run; print it",
                          description="Create a wait token outside any run and print its "
                                      "id and completion URL (POST JSON to the URL to "
                                      "complete it, no API key needed).")
    p.add_argument("--timeout", type=duration, default=None,
                   help="TIMED_OUT after DURATION from now, e.g. 30s, 15m, 2h, 7d or plain "
                        "seconds (default never)")
    p.add_argument("--idempotency-key", default="",
                   help="at most one token per key: a repeat returns the first token "
                        "(default none)")
    p.add_argument("--tag", action="append", default=[],
                   help="a label to list tokens by; repeat for more (default none)")
    p.add_argument("--json", action="store_true",
                   help="print the token as JSON (default: its id, then its URL)")
    client_args(p)
    p = tokens.add_parser("get", help="show a token created outside a run, with its URL",
                          description="Show a token created with `tokens create`, with "
                                      "its completion URL.")
    p.add_argument("token", help="the token's id")
    p.add_argument("--json", action="store_true",
                   help="print the token as JSON (default: one line, then its URL)")
    client_args(p)
    p = tokens.add_parser(
        "list", help="list wait tokens, newest first (--run: the tokens a run waits on)",
        description="Without --run: tokens created outside runs (`tokens create`), newest "
                    "first. With --run: every token that run waits on or has waited on, "
                    "whether the run created it or was given it, with its status.")
    p.add_argument("--run", default=None,
                   help="only the tokens this run (its id) waits on or waited on "
                        "(default: tokens created outside runs)")
    p.add_argument("--status", action="append", default=[], type=str.upper,
                   choices=["WAITING", "COMPLETED", "TIMED_OUT"],
                   help="only tokens with this status: WAITING, COMPLETED or TIMED_OUT; "
                        "repeat for more (default all)")
    p.add_argument("--tag", action="append", default=[],
                   help="only tokens with every tag given; repeat for more (default none)")
    p.add_argument("--limit", type=int, default=50,
                   help="at most this many, 1 to 1000 (default 50)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON array (default: one line per token)")
    client_args(p)


async def run(args: argparse.Namespace) -> int:
    data = payload(args.data, "--data") if args.tokens_command == "complete" else None
    async with Client(args.coordinator, api_key=args.api_key) as client:
        if args.tokens_command == "complete":
            completed, why = await client._complete_token(args.token, data)
            if completed:
                print(f"{args.token} completed")
            else:  # the coordinator says why: completed or timed out before, or run final
                # A failure, so `tokens complete T && next-step` stops on a no-op.
                raise CLIError(f"{args.token}: "
                               f"{why or 'already completed or timed out; nothing changed'}")
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
