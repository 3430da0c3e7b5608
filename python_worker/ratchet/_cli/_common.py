"""What every verb of the command line shares: its one-line errors, the
duration and JSON arguments, the options that reach a coordinator."""

from __future__ import annotations

import argparse
import json
import re
import sys
import typing
from typing import Any

from ratchet._types import RunStatus

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class CLIError(Exception):
    """A problem to report in one line (exit status 1)."""


class UsageError(CLIError):
    """A command line that asks for nothing sensible, found after parsing:
    exit status 2, like argparse's own usage errors."""


# What the help of every duration option says about its format.
DURATION_FORMAT = "e.g. 500ms, 15s, 2m, 1h, 30d; a plain number is seconds"
RUN_STATUSES = tuple(s.value for s in RunStatus)


def status_option(p: argparse.ArgumentParser, help_text: str) -> None:
    """A repeatable `--status` that names the valid run statuses (any case)."""
    p.add_argument("--status", action="append", default=[], type=str.upper,
                   choices=RUN_STATUSES, metavar="STATUS",
                   help=f"{help_text}; one of {', '.join(RUN_STATUSES)} (any case; "
                        "repeat for several)")


def duration(text: str) -> float:
    """Parse `15s`, `500ms`, `2m`, `1h`, `30d` or plain seconds."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (use e.g. 15s, 500ms, 2m)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def timing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lease-ttl", type=duration, default=duration("30s"),
                   help="how long a lease lives without a heartbeat (default 30s)")
    p.add_argument("--heartbeat-interval", type=duration, default=duration("5s"),
                   help="how often workers must send a heartbeat (default 5s)")
    p.add_argument("--session-grace", type=duration, default=duration("1s"),
                   help="how long a closed session's leases wait for a reconnect (default 1s)")
    p.add_argument("--retention", type=duration, default=duration("30d"),
                   help="delete finished runs (steps, history) after this; 0 keeps them "
                        "(default 30d)")
    p.add_argument("--reconcile-interval", type=duration, default=duration("5s"),
                   help="how often each coordinator checks a page of unfinished runs for "
                        "ones nothing would move again, and repairs them; 0 disables "
                        "(default 5s)")
    p.add_argument("--key-cache", type=duration, default=duration("10s"),
                   help="how long a revoked API key may keep working: key lookups are "
                        "cached this long and open sessions' keys checked this often "
                        "(default 10s)")


def client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="the coordinator's gRPC address (default $RATCHET_COORDINATOR, "
                        "else 127.0.0.1:7420)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="API key, rk_... (default $RATCHET_API_KEY; `ratchet dev` needs none)")


class Parser(argparse.ArgumentParser):
    """Usage errors are one line too (`ratchet ... --help` shows the usage)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"ratchet: {message} (see {self.prog} --help)\n")


# What the help of every JSON-taking option says about its forms.
JSON_FORMS = "JSON text, @FILE (read the JSON from FILE) or - (read it from stdin)"


def payload(text: str, flag: str = "--payload") -> Any:
    """The JSON value an option gives: inline JSON, `@FILE` or `-` (stdin).

    The file and stdin forms get past the shell's limit on one argument
    (about 128 KiB), below the coordinator's payload limit (1 MiB). JSON
    text never starts with `@`, and `-` alone is not JSON, so neither form
    shadows a JSON value. Raises UsageError (exit 2: nothing was sent)
    naming the flag, the source and, for bad JSON, the line and column.
    """
    if text == "-":
        source = f"{flag} - (stdin)"
        try:
            raw = sys.stdin.buffer.read()
        except (OSError, ValueError) as exc:
            raise UsageError(f"{source}: cannot read stdin: {exc}") from None
    elif text.startswith("@"):
        path = text[1:]
        source = f"{flag} @{path}"
        if not path:
            raise UsageError(f"{flag} @ names no file (use @FILE, e.g. @payload.json)")
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise UsageError(f"{source}: cannot read {path}: {exc.strerror or exc} "
                             "(check the path; use - to read stdin)") from None
    else:
        try:
            return json.loads(text)
        except ValueError as exc:
            raise UsageError(f"{flag} is not valid JSON: {exc} "
                             "(quote it for the shell, or use @FILE or -)") from None
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{source} is not UTF-8 text: byte {exc.start} "
                         f"(0x{raw[exc.start]:02x}) cannot be decoded") from None
    except ValueError as exc:
        raise UsageError(f"{source} is not valid JSON: {exc}") from None


def json_object_of_strings(text: str, flag: str) -> dict[str, str]:
    """`payload`, which must give a JSON object whose values are strings."""
    value = payload(text, flag)
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise UsageError(f"{flag} must be a JSON object of strings, e.g. "
                         f"'{{\"team\": \"billing\"}}' (got {json.dumps(value)[:60]})")
    return value


def check_one_stdin(args: argparse.Namespace, *dests: str) -> None:
    """Stdin can be read once: refuse `-` for more than one option."""
    flags = ["--" + d.replace("_", "-") for d in dests if getattr(args, d, None) == "-"]
    if len(flags) > 1:
        raise UsageError(f"{' and '.join(flags)} both read stdin (-); "
                         "give all but one of them as JSON or @FILE")
