"""The coordinator's clock (ratchet_server.clock): wall time that tests may move forward."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from ratchet_server import clock


@pytest.fixture(autouse=True)
def wall_time() -> Iterator[None]:
    clock.reset()
    yield
    clock.reset()


def test_the_clock_is_wall_time_until_moved() -> None:
    assert abs(clock.now() - time.time()) < 1.0
    clock.advance(3600)
    assert 3599 < clock.now() - time.time() < 3601
    clock.reset()
    assert abs(clock.now() - time.time()) < 1.0


def test_the_clock_never_moves_back() -> None:
    with pytest.raises(ValueError, match="forward"):
        clock.advance(-1)
