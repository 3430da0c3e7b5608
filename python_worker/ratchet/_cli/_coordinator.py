"""`ratchet dev`, `server`, `migrate` and `keys`: the verbs that run or
manage a coordinator (they need the server extra; ratchet_server.cli runs them)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from ratchet._cli._common import CLIError, UsageError, duration, timing_args
from ratchet._task import Task

COMMANDS = ("dev", "server", "migrate", "keys")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("dev", help="coordinator on the embedded SQLite store (loopback, no auth)",
                       description="Run a development coordinator on a SQLite file, listening "
                                   "on 127.0.0.1 only, with authentication off; --worker also "
                                   "serves your tasks in the same process. Ctrl-C stops it.")
    p.add_argument("--port", type=int, default=7420, metavar="PORT",
                   help="gRPC port on 127.0.0.1 that workers and clients connect to "
                        "(default 7420)")
    p.add_argument("--http-port", type=int, default=7421, metavar="PORT",
                   help="HTTP port on 127.0.0.1: health and token completion URLs "
                        "(default 7421)")
    p.add_argument("--public-url", default="", metavar="URL",
                   help="base of the token completion URLs handed out (default "
                        "http://127.0.0.1:HTTP_PORT)")
    p.add_argument("--db", default=".ratchet/dev.db", metavar="PATH",
                   help="SQLite file, created with its directory if missing "
                        "(default .ratchet/dev.db)")
    p.add_argument("--worker", action="append", default=[], metavar="MODULE",
                   help="serve this module's tasks in-process: a dotted module name or a "
                        ".py file (repeatable; default none)")
    p.add_argument("--slots", type=int, default=8, metavar="N",
                   help="how many runs the in-process worker executes at once (default 8)")
    timing_args(p)

    p = sub.add_parser("server", help="coordinator against Postgres or SQLite (auth required)",
                       description="Run a production coordinator: every call needs an API key "
                                   "(`ratchet keys create`); any number of them may share one "
                                   "Postgres database. SIGINT or SIGTERM stops it gracefully.")
    _database_url(p)
    p.add_argument("--listen", default="127.0.0.1:7420", metavar="HOST:PORT",
                   help="gRPC address (default 127.0.0.1:7420; use 0.0.0.0:7420 to serve remote "
                        "workers, behind TLS until Ratchet terminates it itself)")
    p.add_argument("--http-listen", default="127.0.0.1:7421", metavar="HOST:PORT",
                   help="HTTP address: health and token completion URLs (default "
                        "127.0.0.1:7421)")
    p.add_argument("--public-url", default="", metavar="URL",
                   help="where clients reach the HTTP port, the base of token completion "
                        "URLs, e.g. https://ratchet.example.com (default http://HTTP_LISTEN)")
    p.add_argument("--no-notify", action="store_true",
                   help="(default off) Postgres: send no NOTIFY and LISTEN for none, for "
                        "distributed Postgres-compatible databases without LISTEN/NOTIFY "
                        "(CockroachDB). "
                        "Runs made ready on another coordinator are then found by this "
                        "one's dispatcher poll (--poll-interval) instead of at once; "
                        "nothing else changes (docs/operations.md, 'Past one Postgres')")
    p.add_argument("--poll-interval", type=duration, default=None,
                   help="how often the dispatcher looks for ready runs when nothing wakes "
                        "it: the bound on how late a run made ready on another coordinator "
                        "starts without NOTIFY (default 1s; 250ms with --no-notify)")
    timing_args(p)

    p = sub.add_parser("migrate", help="apply schema migrations",
                       description="Apply the schema migrations the database lacks and list "
                                   "them (coordinators also migrate when they start).")
    _database_url(p)

    keys = sub.add_parser("keys", help="API keys",
                          description="Create, list and revoke API keys, straight on the "
                                      "database (no coordinator needs to run).",
                          ).add_subparsers(dest="keys_command", required=True,
                                           metavar="{create,list,revoke}")
    p = keys.add_parser("create", help="create a key and print it (once)",
                        description="Create an API key and print it on stdout: it is shown "
                                    "only this once (the database keeps its hash).")
    _database_url(p)
    p.add_argument("--env", required=True, metavar="ENV",
                   help="the environment the key opens, e.g. prod (required; runs and "
                        "workers of other environments stay invisible to it)")
    p.add_argument("--role", required=True, choices=["client", "worker", "admin"],
                   help="what the key may do: client (trigger and read runs), worker "
                        "(serve tasks) or admin (everything) (required)")
    p.add_argument("--name", default="", metavar="TEXT",
                   help="a label shown by `keys list` (default none)")
    p = keys.add_parser("list", help="every key: id, environment, role, name, dates "
                                     "(never the key itself)",
                        description="List every API key: id, environment, role, name, "
                                    "created and revoked dates (never the key itself).")
    _database_url(p)
    p.add_argument("--env", default=None, metavar="ENV",
                   help="only the keys of this environment (default all)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON array instead of a table (default off)")
    p = keys.add_parser("revoke", help="revoke a key: coordinators refuse it and end the "
                                       "sessions it opened (within --key-cache)",
                        description="Revoke an API key: coordinators refuse it and end the "
                                    "sessions it opened within their --key-cache.")
    p.add_argument("key_id", metavar="KEY_ID", help="the key's id, as `keys list` shows it")
    _database_url(p)


def _database_url(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", required=True, metavar="URL",
                   help="the store: postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE, or "
                        "sqlite:///RELATIVE.db, sqlite:////ABSOLUTE.db (required)")


async def run(args: argparse.Namespace,
              load_tasks: Callable[[Sequence[str]], list[Task[Any, Any]]]) -> int:
    try:
        from ratchet_server import cli as server_cli
    except ImportError as exc:
        raise CLIError(f"`ratchet {args.command}` needs the server extra "
                       f"(pip install 'ratchet[server]'): {exc}") from None
    try:
        return await server_cli.run(args, load_tasks)
    except server_cli.ServerUsageError as exc:
        raise UsageError(str(exc)) from None
