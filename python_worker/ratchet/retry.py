"""`ratchet.retry.fetch`: an HTTP call as a durable step with retries.

    response = await ratchet.retry.fetch("https://api.example.com/critical",
                                         retry=ratchet.Retry(max_attempts=10, factor=1.5))

Connection errors, timeouts, 408, 429 and 5xx are retried with the policy's
backoff, honouring `Retry-After` (seconds or an HTTP date) up to `max_delay`;
other 4xx fail at once with a `FetchError` carrying the status and a short
excerpt of the body. Each attempt is recorded as a step attempt, so the
count survives crashes, and a completed fetch is never sent again. This is
`ctx.step(..., retry=...)` underneath: the one idiom for retrying a block.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
from typing import Any

import httpx
import pydantic

from ratchet import _context
from ratchet._errors import RatchetError
from ratchet._retry import Retry

__all__ = ["FetchError", "FetchResponse", "fetch"]

RETRYABLE_STATUSES = frozenset({408, 429})
BODY_EXCERPT = 300


class FetchError(RatchetError):
    """An HTTP call failed. `status_code` is None for connection errors and timeouts."""

    def __init__(self, message: str, *, status_code: int | None, body: str = "",
                 retry_after: float | None = None, non_retryable: bool = False) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body
        self.retry_after = retry_after
        self.non_retryable = non_retryable


class FetchResponse(pydantic.BaseModel):
    """What a completed fetch recorded: enough to use the answer on every replay."""

    status_code: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:  # type: ignore[override]
        return json.loads(self.text)


async def fetch(
    url: str,
    method: str = "GET",
    *,
    retry: Retry | None = None,
    name: str | None = None,
    timeout: float = 30.0,
    **httpx_kwargs: Any,
) -> FetchResponse:
    """Send one HTTP request as a durable step of the current run (see the module doc).

    `name` is the step name (default: "<METHOD> <url>"); `httpx_kwargs` go to
    `httpx.AsyncClient.request` (json=, headers=, params=, content=, ...).
    """
    ctx = _context.current()
    policy = retry or Retry()

    async def attempt() -> FetchResponse:
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                response = await client.request(method, url, **httpx_kwargs)
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            raise FetchError(f"{method} {url}: {type(exc).__name__}: {exc}",
                             status_code=None) from exc
        status = response.status_code
        if status < 400:
            return FetchResponse(status_code=status, headers=dict(response.headers),
                                 text=response.text)
        body = response.text[:BODY_EXCERPT]
        retryable = status in RETRYABLE_STATUSES or status >= 500
        raise FetchError(f"{method} {url}: HTTP {status}: {body}", status_code=status,
                         body=body, non_retryable=not retryable,
                         retry_after=_retry_after(response.headers.get("retry-after")))

    step_name = name or f"{method} {url}".replace("#", "%23")  # '#' marks repeats
    return await ctx.step(step_name, attempt, retry=policy)


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())
