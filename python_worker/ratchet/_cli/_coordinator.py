"""`ratchet dev`, `server`, `migrate` and `keys`: the verbs that run or
manage a coordinator (they need the server extra; ratchet_server.cli runs them)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from ratchet._cli._common import CLIError, duration, timing_args
from ratchet._task import Task

COMMANDS = ("dev", "server", "migrate", "keys")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    timing_args(p)

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
    timing_args(p)

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


async def run(args: argparse.Namespace,
              load_tasks: Callable[[Sequence[str]], list[Task[Any, Any]]]) -> int:
    try:
        from ratchet_server import cli as server_cli
    except ImportError as exc:
        raise CLIError(f"`ratchet {args.command}` needs the server extra "
                       f"(pip install 'ratchet[server]'): {exc}") from None
    return await server_cli.run(args, load_tasks)
