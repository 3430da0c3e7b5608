"""`ratchet.Retry`: the delay maths, jitter bounds, validation and the attempt budget."""

from __future__ import annotations

import random

import pytest

from ratchet import Retry
from ratchet._retry import NO_RETRY

pytestmark = pytest.mark.timeout(10)


def test_defaults() -> None:
    r = Retry()
    assert (r.max_attempts, r.factor, r.min_delay, r.max_delay, r.jitter) == (3, 2.0, 1.0,
                                                                              60.0, False)


@pytest.mark.parametrize(("attempt", "expected"), [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0),
                                                   (6, 32.0), (7, 60.0), (20, 60.0)])
def test_delay_doubles_up_to_max_delay(attempt: int, expected: float) -> None:
    assert Retry(max_attempts=50).delay_after(attempt) == expected


@pytest.mark.parametrize(("min_delay", "factor", "max_delay"),
                         [(0.5, 3.0, 100.0), (2.0, 1.0, 10.0), (0.0, 2.0, 5.0), (0.1, 1.5, 0.4)])
def test_delay_formula(min_delay: float, factor: float, max_delay: float) -> None:
    r = Retry(max_attempts=10, factor=factor, min_delay=min_delay, max_delay=max_delay)
    for n in range(1, 11):
        assert r.delay_after(n) == pytest.approx(min(max_delay, min_delay * factor ** (n - 1)))


def test_delay_needs_a_one_based_attempt() -> None:
    with pytest.raises(ValueError, match="1-based"):
        Retry().delay_after(0)


def test_jitter_stays_within_half_and_one_and_a_half_times_and_the_cap() -> None:
    r = Retry(max_attempts=10, min_delay=2.0, factor=2.0, max_delay=10.0, jitter=True)
    rng = random.Random(1234)
    for attempt in (1, 2, 3):
        base = min(10.0, 2.0 * 2.0 ** (attempt - 1))
        delays = [r.delay_after(attempt, rng=rng) for _ in range(500)]
        assert all(0.5 * base <= d < 1.5 * base and d <= 10.0 for d in delays)
        assert len(set(delays)) > 1
    # At the cap, jitter can only shorten the wait.
    capped = [r.delay_after(8, rng=rng) for _ in range(500)]
    assert all(5.0 <= d <= 10.0 for d in capped)
    assert min(capped) < 10.0 and max(capped) == 10.0


def test_jitter_uses_the_given_rng() -> None:
    r = Retry(jitter=True)
    assert r.delay_after(2, rng=random.Random(7)) == r.delay_after(2, rng=random.Random(7))


def test_jitter_at_the_extremes_of_the_random_factor() -> None:
    class Fixed(random.Random):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def random(self) -> float:
            return self.value

    r = Retry(min_delay=4.0, max_delay=100.0, jitter=True)
    assert r.delay_after(1, rng=Fixed(0.0)) == 2.0
    assert r.delay_after(1, rng=Fixed(0.999)) == pytest.approx(5.996)


def test_delay_is_capped_for_very_late_attempts() -> None:
    r = Retry(max_attempts=10_000, factor=2.0, min_delay=1.0, max_delay=60.0)
    assert r.delay_after(2_000) == 60.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": -1}, "max_attempts"),
        ({"factor": 0.5}, "factor"),
        ({"min_delay": -1.0}, "negative"),
        ({"max_delay": -1.0, "min_delay": 0.0}, "negative"),
        ({"min_delay": 10.0, "max_delay": 5.0}, "max_delay"),
    ],
)
def test_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Retry(**kwargs)  # type: ignore[arg-type]


def test_edge_values_are_valid() -> None:
    Retry(max_attempts=1, factor=1.0, min_delay=0.0, max_delay=0.0)
    Retry(min_delay=5.0, max_delay=5.0)


@pytest.mark.parametrize(("max_attempts", "made", "allowed"),
                         [(3, 0, True), (3, 1, True), (3, 2, True), (3, 3, False), (3, 4, False),
                          (1, 0, True), (1, 1, False)])
def test_allows_another(max_attempts: int, made: int, allowed: bool) -> None:
    assert Retry(max_attempts=max_attempts).allows_another(made) is allowed


def test_no_retry_allows_exactly_one_attempt() -> None:
    assert NO_RETRY.allows_another(0) and not NO_RETRY.allows_another(1)
    assert NO_RETRY.delay_after(1) == 0.0


def test_retry_is_frozen_and_hashable() -> None:
    r = Retry()
    with pytest.raises(AttributeError):
        r.max_attempts = 5  # type: ignore[misc]
    assert hash(r) == hash(Retry()) and r == Retry()
