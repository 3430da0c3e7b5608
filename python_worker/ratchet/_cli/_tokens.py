"""`ratchet tokens`: complete, create, get and list wait tokens."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Any

from ratchet._cli._common import client_args, duration, payload
from ratchet._client import Client
from ratchet._types import Token


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tokens = sub.add_parser("tokens", help="wait tokens").add_subparsers(
        dest="tokens_command", required=True)
    p = tokens.add_parser("complete", help="complete a wait token, waking its run")
    p.add_argument("token")
    p.add_argument("--data", default="null", help="JSON handed to the waiting task")
    client_args(p)
    p = tokens.add_parser("create", help="create a wait token outside any run; print it")
    p.add_argument("--timeout", type=duration, default=None, help="TIMED_OUT after this")
    p.add_argument("--idempotency-key", default="")
    p.add_argument("--tag", action="append", default=[])
    p.add_argument("--json", action="store_true")
    client_args(p)
    p = tokens.add_parser("get", help="show a token created outside a run, with its URL")
    p.add_argument("token")
    p.add_argument("--json", action="store_true")
    client_args(p)
    p = tokens.add_parser("list", help="tokens created outside runs, newest first")
    p.add_argument("--run", default=None, help="only the token this run waits on")
    p.add_argument("--status", action="append", default=[],
                   choices=["WAITING", "COMPLETED", "TIMED_OUT"])
    p.add_argument("--tag", action="append", default=[], help="only tokens with every tag")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    client_args(p)


async def run(args: argparse.Namespace) -> int:
    async with Client(args.coordinator, api_key=args.api_key) as client:
        if args.tokens_command == "complete":
            if await client.complete_token(args.token, payload(args.data, "--data")):
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
