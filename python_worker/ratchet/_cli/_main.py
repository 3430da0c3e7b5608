"""The `ratchet` command: its parser, assembled from one module per verb,
and what every verb's errors turn into (one line, exit code 1; 2 for usage)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from ratchet._cli import _coordinator, _runs, _serve, _tokens, _trigger
from ratchet._cli._common import CLIError, Parser
from ratchet._errors import RatchetError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ratchet", description="Durable execution for Python.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in (_coordinator, _serve, _trigger, _tokens, _runs):
        verb.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = asyncio.run(_dispatch(args))
        return _serve.exit_abandoning_threads(code) if args.command == "worker" else code
    except KeyboardInterrupt:
        return 130
    except (CLIError, RatchetError, OSError, ValueError) as exc:
        print(f"ratchet: {exc}", file=sys.stderr)
        # A worker refused mid-run (its key revoked) must not wait for a sync
        # step that ignores cancellation: the coordinator took its runs back.
        return _serve.exit_abandoning_threads(1) if args.command == "worker" else 1
    except Exception as exc:  # last resort: still one line
        print(f"ratchet: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


async def _dispatch(args: argparse.Namespace) -> int:
    command = args.command
    if command in _coordinator.COMMANDS:
        return await _coordinator.run(args, _serve.load_tasks)
    if command == "worker":
        return await _serve.run(args)
    if command == "trigger":
        return await _trigger.run(args)
    if command == "tokens":
        return await _tokens.run(args)
    return await _runs.run(args)
