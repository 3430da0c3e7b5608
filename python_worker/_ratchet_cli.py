"""The `ratchet` console script's entry point, outside the `ratchet` package.

Importing `ratchet` takes a second or two (grpc, httpx, rich): a Ctrl-C in
that window would print a KeyboardInterrupt traceback from deep inside an
import. This module is imported first, so it can quiet that window: a SIGINT
before the command has started exits with 130, the CLI's code for an
interrupt. From then on the command handles SIGINT itself. What remains is
the interpreter's own start-up, before this module runs (~20 ms): a Ctrl-C
there is Python's to report.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


def main() -> int:
    previous = signal.signal(signal.SIGINT, _interrupted)
    try:
        from ratchet._cli._main import main as run
    finally:
        signal.signal(signal.SIGINT, previous)
    return run()


def _interrupted(signum: int, frame: FrameType | None) -> None:
    sys.stderr.flush()
    raise SystemExit(130)
