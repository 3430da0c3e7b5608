"""The coordinator's clock: wall time, which tests may move forward.

Every due time, expiry and timestamp the coordinator decides or records is
read from `now()` (engine, store, API), never from `time.time()` directly, so
`ratchet.testing` can skip an hour-long sleep by `advance(3600)` instead of
waiting for it. Waiting itself (asyncio sleeps, poll intervals) stays on real
time: only what the clock says moves.
"""

from __future__ import annotations

import time

_offset = 0.0


def now() -> float:
    """Seconds since the epoch, as this coordinator counts them."""
    return time.time() + _offset


def advance(seconds: float) -> None:
    """Move the clock forward (tests only; the process's every coordinator)."""
    global _offset
    if seconds < 0:
        raise ValueError("the clock only moves forward")
    _offset += seconds


def reset() -> None:
    """Back to wall time."""
    global _offset
    _offset = 0.0
