"""Retry policies: how many attempts, and how long to wait between them.

One policy type serves task attempts, step attempts and (later) fetch
attempts, so the maths lives in one place and the coordinator uses the same.
"""

from __future__ import annotations

import dataclasses
import random

__all__ = ["NO_RETRY", "Retry"]


@dataclasses.dataclass(frozen=True, slots=True)
class Retry:
    """A retry policy.

    `max_attempts` includes the first attempt; None means no limit (Temporal's
    default for activities): a task's run attempts then end only with its max
    duration (`@ratchet.task(max_duration=...)` or the trigger's), a step's
    attempts only with its run. The delay before attempt n+1 is
    ``min(max_delay, min_delay * factor ** (n - 1))`` seconds, multiplied by a
    random factor in [0.5, 1.5) when `jitter` is true (and still capped by
    `max_delay`).

    `max_lease_losses` applies to task policies: how many times the run's
    worker may die or go silent (a lost lease) before the run fails with
    `ratchet.LeaseLossLimit`. A lost lease does not use up an attempt; this
    bound stops a run that crashes its worker every time.

    `rerun_failed_steps` also applies to task policies: what a later run
    attempt does with a step that FAILED (its own attempts used up, or a
    non-retryable error). False (the default): the step stays failed, its
    recorded error is raised again as `StepFailedError` without calling its
    function, so a failure the task handled (a refund after a failed deposit)
    stays handled. True: the step gets a fresh budget of attempts on each
    run attempt. `Client.replay()` re-runs failed steps either way.
    """

    max_attempts: int | None = 3
    factor: float = 2.0
    min_delay: float = 1.0
    max_delay: float = 60.0
    jitter: bool = False
    max_lease_losses: int = 10
    rerun_failed_steps: bool = False
    # Exception types worth retrying (empty = all but NonRetryableError), and
    # types never retried. Checked in the worker; not sent to the coordinator.
    retry_on: tuple[type[BaseException], ...] = dataclasses.field(default=(), compare=False)
    no_retry_on: tuple[type[BaseException], ...] = dataclasses.field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.factor < 1:
            raise ValueError("factor must be at least 1")
        if self.min_delay < 0 or self.max_delay < 0:
            raise ValueError("delays must not be negative")
        if self.max_delay < self.min_delay:
            raise ValueError("max_delay must not be below min_delay")
        if self.max_lease_losses < 1:
            raise ValueError("max_lease_losses must be at least 1")

    def delay_after(self, attempt: int, *, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based) before the next one."""
        if attempt < 1:
            raise ValueError("attempt is 1-based")
        try:
            base = min(self.max_delay, self.min_delay * self.factor ** (attempt - 1))
        except OverflowError:  # a very late attempt of a long budget
            base = self.max_delay
        if self.jitter:
            base = min(self.max_delay, base * (0.5 + (rng or random).random()))
        return base

    def retries(self, exc: BaseException) -> bool:
        """Whether this policy would try again after `exc` (attempts aside)."""
        if self.no_retry_on and isinstance(exc, self.no_retry_on):
            return False
        return not self.retry_on or isinstance(exc, self.retry_on)

    def allows_another(self, attempts_made: int) -> bool:
        """True if a further attempt is within the budget after `attempts_made` attempts."""
        return self.max_attempts is None or attempts_made < self.max_attempts


NO_RETRY = Retry(max_attempts=1, min_delay=0.0, max_delay=0.0)
"""One attempt: `ctx.step(..., retry=ratchet.NO_RETRY)`, or a task that is never retried."""
