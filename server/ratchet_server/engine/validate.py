"""What a request may contain: bounds, sizes and characters, checked before anything is written.

Every check raises `errors.InvalidArgument` (or `errors.ResourceExhausted`
for sizes) with a one-line message naming the field, so a bad request is
refused whole and never half-applied. The bounds keep every value inside
what both stores and the protocol's own types can hold: a delay of 10^12 s
would be stored, but its due time could not be sent back as a
`google.protobuf.Timestamp` (years 1 to 9999), and Postgres `text` cannot
hold a NUL character at all.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ratchet import Retry
from ratchet_server import model
from ratchet_server.engine import errors

if TYPE_CHECKING:
    from ratchet_server.engine.engine import TriggerSpec

# Durations (delay, TTL, max duration, idempotency key TTL, retry delays).
MAX_DURATION = 10 * 365.25 * 24 * 3600.0
# Times a client may send (ListRuns bounds): google.protobuf.Timestamp's range,
# 0001-01-01 to 9999-12-31.
MIN_TIME = -62_135_596_800.0
MAX_TIME = 253_402_300_799.0
MAX_PRIORITY = 1000
# Names that go into indexes (task id, idempotency key, queue, ...): Postgres
# refuses a btree entry over about 2.7 kB, and 4 bytes a character at worst.
MAX_NAME = 256
MAX_TAG = 128
MAX_TAGS = 64
# A cancel's reason: stored in the run's history and shown by `runs show`.
MAX_REASON = 1024
MAX_METADATA_ENTRIES = 64
MAX_METADATA_BYTES = 64 * 1024
MAX_RETRY_ATTEMPTS = 100_000
MAX_RETRY_FACTOR = 1000.0
# Nesting deeper than this is refused (readers in other languages recurse).
MAX_JSON_DEPTH = 64
MAX_INT64 = 2**63 - 1

# `\u0000` as an escape: preceded by an even number of backslashes.
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def text(value: str, what: str, max_len: int | None = MAX_NAME) -> None:
    """A string field: no NUL character, at most `max_len` characters."""
    if "\x00" in value:
        raise errors.InvalidArgument(f"{what} must not contain NUL characters (\\x00)")
    if max_len is not None and len(value) > max_len:
        raise errors.InvalidArgument(f"{what} is {len(value)} characters; at most {max_len}")


def duration(value: float | None, what: str, *, positive: bool = False) -> None:
    """A duration in seconds: finite, not negative (or above 0), at most 10 years."""
    if value is None:
        return
    if not math.isfinite(value):
        raise errors.InvalidArgument(f"{what} must be a finite duration")
    if value < 0 or (positive and value == 0):
        raise errors.InvalidArgument(
            f"{what} must be {'positive' if positive else 'zero or more'}; got {value:g}s")
    if value > MAX_DURATION:
        raise errors.InvalidArgument(
            f"{what} is {value:g}s; at most {MAX_DURATION:.0f}s (10 years)")


def timestamp(value: float | None, what: str) -> None:
    """A point in time (seconds since the epoch) within years 1 to 9999."""
    if value is None:
        return
    if not math.isfinite(value) or not MIN_TIME <= value <= MAX_TIME:
        raise errors.InvalidArgument(f"{what} must be a time between years 1 and 9999")


def retry(policy: Retry | None, what: str = "retry") -> None:
    if policy is None:
        return
    if policy.max_attempts is not None and policy.max_attempts > MAX_RETRY_ATTEMPTS:
        raise errors.InvalidArgument(
            f"{what}.max_attempts is {policy.max_attempts}; at most {MAX_RETRY_ATTEMPTS}")
    if not math.isfinite(policy.factor) or policy.factor > MAX_RETRY_FACTOR:
        raise errors.InvalidArgument(f"{what}.factor must be finite and at most "
                                     f"{MAX_RETRY_FACTOR:g}")
    duration(policy.min_delay, f"{what}.min_delay")
    duration(policy.max_delay, f"{what}.max_delay")


def trigger_spec(spec: TriggerSpec) -> None:
    """Everything about one trigger that does not need the task's definition."""
    if not spec.task_id:
        raise errors.InvalidArgument("task_id must not be empty")
    text(spec.task_id, "task_id")
    for value, what in ((spec.idempotency_key, "idempotency_key"), (spec.queue, "queue"),
                        (spec.concurrency_key, "concurrency_key")):
        if value is not None:
            text(value, what)
    unsupported(spec)
    duration(spec.idempotency_ttl, "idempotency_key_ttl")
    duration(spec.delay, "delay")
    duration(spec.ttl, "ttl")
    duration(spec.max_duration, "max_duration")
    if not -MAX_PRIORITY <= spec.priority <= MAX_PRIORITY:
        raise errors.InvalidArgument(
            f"priority must be between {-MAX_PRIORITY} and {MAX_PRIORITY}")
    tags(spec.tags)
    metadata(spec.metadata)
    retry(spec.retry)


def unsupported(spec: TriggerSpec) -> None:
    """Options the protocol carries but the engine does not act on yet are
    refused, not stored and ignored: a client that sets them expects them to
    work. The queue may name the task itself (every task is its own queue)."""
    if spec.queue and spec.queue != spec.task_id:
        raise errors.InvalidArgument(
            "queue is not supported yet: runs are dispatched by task id; leave it empty")
    if spec.concurrency_key:
        raise errors.InvalidArgument(
            "concurrency_key is not supported yet: runs are not limited per key; leave it empty")


def tags(values: Sequence[str]) -> None:
    if len(values) > MAX_TAGS:
        raise errors.InvalidArgument(f"{len(values)} tags; at most {MAX_TAGS}")
    for tag in values:
        if not tag or len(tag) > MAX_TAG:
            raise errors.InvalidArgument(f"tags must be 1 to {MAX_TAG} characters")
        text(tag, "a tag")


def metadata(values: Mapping[str, str]) -> None:
    items = list(values.items())
    if len(items) > MAX_METADATA_ENTRIES:
        raise errors.InvalidArgument(
            f"{len(items)} metadata entries; at most {MAX_METADATA_ENTRIES}")
    size = 0
    for key, value in items:
        if not key:
            raise errors.InvalidArgument("metadata keys must not be empty")
        text(key, "a metadata key")
        text(value, f"metadata[{key[:40]!r}]", max_len=None)
        size += len(key.encode("utf-8")) + len(value.encode("utf-8"))
    if size > MAX_METADATA_BYTES:
        raise errors.ResourceExhausted(
            f"metadata is {size} bytes; the limit is {MAX_METADATA_BYTES}")


def run_filter(flt: model.RunFilter) -> None:
    """A ListRuns filter: the strings it compares and the times it bounds by."""
    for value, what in ((flt.task_id, "task_id"), (flt.tag, "tag"),
                        (flt.parent_run_id, "parent_run_id"), (flt.error_type, "error_type")):
        if value is not None:
            text(value, what, max_len=None)
    timestamp(flt.created_after, "created_after")
    timestamp(flt.created_before, "created_before")


def list_page_token(token: str) -> tuple[float, str] | None:
    """ListRuns' page token: `<created_at>|<run id>` (opaque to clients)."""
    if not token:
        return None
    at, sep, run_id = token.partition("|")
    try:
        if not sep or "\x00" in run_id:
            raise ValueError
        created_at = float(at)
        timestamp(created_at, "page_token")
    except (ValueError, errors.InvalidArgument):
        raise errors.InvalidArgument("malformed page_token") from None
    return created_at, run_id


def history_page_token(token: str) -> int:
    """GetRunHistory's page token: the id of the last event seen (an int64)."""
    if not token:
        return 0
    try:
        after = int(token)
        if not 0 <= after <= MAX_INT64:
            raise ValueError
    except ValueError:
        raise errors.InvalidArgument("malformed page_token") from None
    return after


def json_document(data: bytes, what: str, limit: int) -> str:
    """One UTF-8 JSON document within `limit` bytes, nested at most 64 deep,
    with no NUL character (raw or as a `\\u0000` escape); returned as text."""
    if len(data) > limit:
        raise errors.ResourceExhausted(f"{what} is {len(data)} bytes; the limit is {limit}")
    try:
        text_ = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.InvalidArgument(f"{what} is not valid JSON (not UTF-8): {exc}") from None
    if "\x00" in text_ or ("\\u0000" in text_ and _NUL_ESCAPE.search(text_)):
        raise errors.InvalidArgument(
            f"{what} must not contain NUL characters (\\u0000): the store cannot hold them")
    try:
        value = json.loads(text_, parse_constant=_reject_constant)
    except RecursionError:
        raise errors.InvalidArgument(
            f"{what} is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as exc:
        raise errors.InvalidArgument(f"{what} is not valid JSON: {exc}") from None
    if text_.count("[") + text_.count("{") > MAX_JSON_DEPTH:
        # Few brackets in all (the common case) cannot nest too deep.
        _check_depth(value, what)
    return text_


def _check_depth(value: Any, what: str) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH, one level of the parsed
    document at a time (no recursion; a text scan for brackets outside
    strings cost three times the parse on a 1 MiB document)."""
    level = [value] if isinstance(value, dict | list) else []
    depth = 0
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise errors.InvalidArgument(
                f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
        inner: list[Any] = []
        for container in level:
            items = container.values() if isinstance(container, dict) else container
            inner.extend(v for v in items if isinstance(v, dict | list))
        level = inner


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# ListRuns replies stay well under the 16 MiB a client accepts: a page ends
# early once the runs in it carry this many bytes.
MAX_PAGE_BYTES = 8 * 1024 * 1024


def run_size(run: model.Run) -> int:
    """At least the bytes a run takes in a reply (its documents, error and labels)."""

    def n(s: str | None) -> int:
        return 0 if not s else len(s.encode("utf-8"))

    size = 512 + n(run.payload) + n(run.output) + n(run.state)
    if run.error is not None:
        size += n(run.error.message) + n(run.error.stack) + n(run.error.type)
    size += sum(n(t) for t in run.tags)
    size += sum(n(k) + n(v) for k, v in run.metadata.items())
    return size


def fit_page(runs: Sequence[model.Run], budget: int = MAX_PAGE_BYTES) -> int:
    """How many of `runs` fit in one reply (at least one)."""
    total = 0
    for n, run in enumerate(runs):
        total += run_size(run)
        if total > budget and n > 0:
            return n
    return len(runs)
