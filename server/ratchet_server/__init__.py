"""The Ratchet coordinator: gRPC servicers (api), rules (engine), SQL (store)."""

from __future__ import annotations

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1
