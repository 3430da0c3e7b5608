"""What every verb of the command line shares: its one-line errors, the
duration and JSON arguments, the options that reach a coordinator."""

from __future__ import annotations

import argparse
import json
import re
import typing
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class CLIError(Exception):
    """A problem to report in one line."""


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
    p.add_argument("--coordinator", default=None,
                   help="HOST:PORT (default $RATCHET_COORDINATOR or 127.0.0.1:7420)")
    p.add_argument("--api-key", default=None, help="API key (default $RATCHET_API_KEY)")


class Parser(argparse.ArgumentParser):
    """Usage errors are one line too (`ratchet ... --help` shows the usage)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"ratchet: {message} (see {self.prog} --help)\n")


def payload(text: str, flag: str = "--payload") -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CLIError(f"{flag} is not valid JSON: {exc}") from None
