"""Identifiers: time-ordered so that listings and indexes stay local."""

from __future__ import annotations

import secrets

from ratchet_server import clock


def new_id(prefix: str) -> str:
    """`prefix_` + 12 hex digits of milliseconds + 16 random hex digits."""
    return f"{prefix}_{int(clock.now() * 1000):012x}{secrets.token_hex(8)}"
