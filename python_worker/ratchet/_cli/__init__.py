"""The `ratchet` command line: one module per verb, assembled by `_main`.

Errors are one line on stderr and a non-zero exit, never a traceback.
Commands that run a coordinator (`dev`, `server`, `migrate`, `keys`) need the
`server` extra; the others need only the SDK.
"""

from ratchet._cli._common import CLIError, duration
from ratchet._cli._main import build_parser, main
from ratchet._cli._render import render_history, render_run
from ratchet._cli._serve import load_tasks

__all__ = ["CLIError", "build_parser", "duration", "load_tasks", "main", "render_history",
           "render_run"]
