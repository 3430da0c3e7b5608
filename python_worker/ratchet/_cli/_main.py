"""The `ratchet` command: its parser, assembled from one module per verb,
and what every verb's errors turn into (one line, exit code 1; 2 for usage).

Exit status: 0 ok, 1 failure, 2 usage, 130 interrupted (Ctrl-C), 141 stdout
closed by its reader (`ratchet runs list | head -1`), silently, as a
program killed by SIGPIPE would report it to the shell.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from ratchet._cli import _admin, _coordinator, _runs, _serve, _tokens, _trigger
from ratchet._cli._common import CLIError, Parser, UsageError
from ratchet._errors import RatchetError, UnavailableError
from ratchet._worker import DEFAULT_COORDINATOR

EXIT_STDOUT_CLOSED = 128 + 13  # 128 + SIGPIPE, what a shell reports for `yes | head -1`

_EPILOG = ("Run `ratchet COMMAND --help` for a command's options. Exit status: 0 ok, "
           "1 failure, 2 usage error, 130 interrupted, 141 output closed by its reader "
           "(e.g. `| head`). Errors are one line on stderr.")


class _Version(argparse.Action):
    """`--version`: the SDK's version, and the server package's when it is
    installed (imported only when asked: the SDK alone does not have it)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        from ratchet import __version__
        line = f"ratchet {__version__}"
        try:
            from ratchet_server import __version__ as server_version
        except ImportError:
            line += " (server extra not installed)"
        else:
            line += f", ratchet-server {server_version}"
        print(line)
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ratchet", description="Durable execution for Python: run a "
                    "coordinator and workers, start runs and inspect them.", epilog=_EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging to stderr (goes before COMMAND)")
    parser.add_argument("--version", action=_Version,
                        help="print the versions of the SDK and the server package, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in (_coordinator, _serve, _trigger, _tokens, _runs, _admin):
        verb.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line; return its exit status (see the module docstring)."""
    try:
        try:
            code = _main(argv)
        finally:
            sys.stdout.flush()  # a buffered stdout meets its closed pipe here
    except BrokenPipeError:
        # The reader has all it wanted; the rest of the output goes nowhere, and
        # the interpreter's last flush must not fail too (Python docs, "Note on
        # SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_STDOUT_CLOSED
    return code


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = asyncio.run(_dispatch(args))
        return _serve.exit_abandoning_threads(code) if args.command == "worker" else code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        raise
    except UsageError as exc:
        print(f"ratchet: {exc}", file=sys.stderr)
        return 2
    except (CLIError, RatchetError, OSError, ValueError) as exc:
        if isinstance(exc, UnavailableError) and _is_client_verb(args):
            print(f"ratchet: cannot reach the coordinator at {_coordinator_address(args)}: "
                  "start one (`ratchet dev`) or point --coordinator / $RATCHET_COORDINATOR "
                  "at it", file=sys.stderr)
            return 1
        if args.verbose and isinstance(exc, _serve.UserCodeError):
            print(exc.traceback(), end="", file=sys.stderr)
        print(f"ratchet: {exc}", file=sys.stderr)
        # A worker refused mid-run (its key revoked) must not wait for a sync
        # step that ignores cancellation: the coordinator took its runs back.
        return _serve.exit_abandoning_threads(1) if args.command == "worker" else 1
    except Exception as exc:  # last resort: still one line
        print(f"ratchet: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _is_client_verb(args: argparse.Namespace) -> bool:
    """A verb that calls a coordinator once (not one that runs a coordinator
    or a worker, which reconnects on its own)."""
    return args.command not in _coordinator.COMMANDS and args.command != "worker"


def _coordinator_address(args: argparse.Namespace) -> str:
    """The address a client verb dialled, resolved as Client resolves it."""
    return (getattr(args, "coordinator", None) or os.environ.get("RATCHET_COORDINATOR")
            or DEFAULT_COORDINATOR)


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
    if command in _admin.COMMANDS:
        return await _admin.run(args)
    return await _runs.run(args)
