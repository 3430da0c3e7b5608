"""The named SQL of `queries.sql`, and the two dialects that run it.

Every statement is written once, with `:name` parameters (sqlite3's style);
the Postgres dialect rewrites them to psycopg's `%(name)s` once per
statement and caches the result. What differs between SQLite and Postgres
lives here and nowhere else: a statement's per-dialect version
(`name@postgres`), the pieces of SQL filled into `{fragment}` placeholders
(set membership, row locks), how a list parameter is passed, and whether
group commit may use set-based statements.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

QUERIES_FILE = Path(__file__).with_name("queries.sql")
_PARAM = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")
_NAME = re.compile(r"^-- name: (\S+)\s*$", re.MULTILINE)
# Sections of queries.sql that are pieces of several statements, filled into
# any `{name}` placeholder of theirs without the caller naming them.
SHARED_FRAGMENTS = ("step_conflict",)


def load_queries(text: str) -> dict[str, str]:
    """`-- name: x` sections of a .sql file, by name; the comment lines that
    open a section are for readers and are not sent to the database."""
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = body.strip("\n").split("\n")
        while lines and lines[0].startswith("--"):
            lines.pop(0)
        if name in queries:
            raise ValueError(f"query {name!r} appears twice in {QUERIES_FILE.name}")
        queries[name] = "\n".join(lines).strip() + "\n"
    return queries


QUERIES = load_queries(QUERIES_FILE.read_text(encoding="utf-8"))


def to_pyformat(sql: str) -> str:
    """Rewrite `:name` parameters as psycopg's `%(name)s` (constant SQL only)."""
    return _PARAM.sub(r"%(\1)s", sql)


class TransientConflict(RuntimeError):
    """A concurrent transaction changed what this one relied on; running the
    whole transaction again gives the right answer."""


class Row(Protocol):
    def __getitem__(self, key: str) -> Any: ...


class Connection(Protocol):
    def execute(self, sql: str, params: Mapping[str, Any] = ..., /) -> Any: ...

    def cursor(self) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Dialect:
    """What one database needs said differently."""

    name: str
    # "column IN <this>" for a list parameter `:ids` passed via `in_param`.
    in_list: str
    # Row locks for work that any coordinator may claim (timers).
    skip_locked: str
    # Locks the rows a SELECT returns until the transaction ends (SQLite has
    # one writer at a time, so it needs none).
    for_update: str
    # How a list parameter travels (a native array, or JSON text).
    encode_list: Callable[[list[str]], Any]
    # Group commit may apply a batch as a few set-based statements.
    batch_writes: bool
    # A batch of step writes alone may go as one statement in autocommit
    # (apply_step_writes): one round trip per checkpoint.
    one_statement_steps: bool
    # lease_ready writes the LEASED history itself and says which runs may
    # have steps (has_steps), so leasing new runs is one statement.
    one_statement_lease: bool
    # Run first in a transaction whose statements must all see one snapshot
    # ("" where a transaction already does: SQLite's one writer).
    consistent_read: str
    translate: Callable[[str], str]
    _cache: dict[tuple[Any, ...], str] = dataclasses.field(default_factory=dict, compare=False)

    def in_param(self, values: Sequence[str]) -> Any:
        return self.encode_list(list(values))

    def text(self, name: str) -> str:
        """The statement `name` as written for this dialect (untranslated)."""
        return QUERIES.get(f"{name}@{self.name}") or QUERIES[name]

    def sql(self, name: str, **fragments: str) -> str:
        """The statement `name`, fragments filled in, ready to execute."""
        key = (name, *sorted(fragments.items()))
        cached = self._cache.get(key)
        if cached is None:
            text = self.text(name)
            shared = {f: self.text(f) for f in SHARED_FRAGMENTS if "{" + f + "}" in text}
            cached = self._cache[key] = self.translate(text.format(**shared, **fragments))
        return cached


SQLITE = Dialect(
    name="sqlite",
    in_list="(SELECT value FROM json_each({param}))",
    skip_locked="",
    for_update="",
    encode_list=json.dumps,
    batch_writes=False,
    one_statement_steps=False,
    one_statement_lease=False,
    consistent_read="",
    translate=lambda s: s,
)
POSTGRES = Dialect(
    name="postgres",
    in_list="(SELECT unnest(CAST({param} AS text[])))",
    skip_locked="FOR UPDATE SKIP LOCKED",
    for_update="FOR UPDATE",
    encode_list=lambda values: values,
    batch_writes=True,
    one_statement_steps=True,
    one_statement_lease=True,
    consistent_read="SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
    translate=to_pyformat,
)
