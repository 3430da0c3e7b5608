"""Temporal's money-transfer sample, as a Ratchet saga.

Two steps: withdraw from one account, deposit into another. The withdrawal
registers its undo (`compensate=refund`): if the deposit fails for good
(the account is frozen: a NonRetryableError; or the other bank stays
unreachable until the step's attempts are used up), the run's failure is
final, the refund runs once as the durable step `ratchet:undo:withdraw`, and
the run ends FAILED with the deposit's error, balances as they were. A run
that has started refunding never deposits, whatever crashes in between.

The bank is a small SQLite file (path in $MONEY_TRANSFER_BANK, default
./bank.db) with a table of accounts and a table of operations keyed by
`ctx.idempotency_key`: a step runs at least once (its worker may die after
the money moved and before the step's checkpoint), so each operation is
applied once per key, and a second call returns the first one's result.

    python examples/money_transfer.py open   # alice 100, bob 50, carol frozen, dave offline
    ratchet dev --worker examples/money_transfer.py
    ratchet trigger money-transfer --wait \
        --payload '{"source": "alice", "target": "bob", "amount": 30}'     # COMPLETED
    ratchet trigger money-transfer --wait \
        --payload '{"source": "alice", "target": "carol", "amount": 30}'   # FAILED, refunded
    python examples/money_transfer.py balances   # alice 70, bob 80, carol 0, dave 0
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import pydantic

import ratchet

ACCOUNTS = {"alice": (100, "open"), "bob": (50, "open"), "carol": (0, "frozen"),
            "dave": (0, "offline")}


def bank_path() -> Path:
    return Path(os.environ.get("MONEY_TRANSFER_BANK", "bank.db"))


class AccountFrozen(ratchet.NonRetryableError):
    """The account takes no operation: retrying cannot help."""


class InsufficientFunds(ratchet.NonRetryableError):
    pass


class UnknownAccount(ratchet.NonRetryableError):
    pass


class BankUnavailable(ConnectionError):
    """The account's bank does not answer: worth retrying (a transient error)."""


class Operation(pydantic.BaseModel):
    """A movement of money, applied once per idempotency key."""

    key: str
    kind: str
    account: str
    amount: int  # positive: credited


class Transfer(pydantic.BaseModel):
    source: str
    target: str
    amount: int = pydantic.Field(gt=0)


class Receipt(pydantic.BaseModel):
    withdrawal: str
    deposit: str


# --- the bank ---------------------------------------------------------------------------


@contextlib.contextmanager
def _bank(path: Path | None = None) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(path or bank_path(), timeout=30, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        yield db
    finally:
        db.close()


def open_bank(path: Path | None = None,
              accounts: dict[str, tuple[int, str]] | None = None) -> None:
    """Create the bank file with its accounts: {name: (balance, status)}, where
    status is "open", "frozen" (refuses every operation) or "offline"
    (its bank never answers)."""
    with _bank(path) as db:
        db.executescript("""
            CREATE TABLE IF NOT EXISTS accounts (
                name TEXT PRIMARY KEY, balance INTEGER NOT NULL, status TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS operations (
                key TEXT PRIMARY KEY, kind TEXT NOT NULL, account TEXT NOT NULL,
                amount INTEGER NOT NULL);
        """)
        for name, (balance, status) in (accounts or ACCOUNTS).items():
            db.execute("INSERT OR REPLACE INTO accounts VALUES (?, ?, ?)",
                       (name, balance, status))


def balances(path: Path | None = None) -> dict[str, int]:
    with _bank(path) as db:
        return dict(db.execute("SELECT name, balance FROM accounts ORDER BY name"))


def operations(path: Path | None = None) -> list[Operation]:
    with _bank(path) as db:
        rows = db.execute("SELECT key, kind, account, amount FROM operations ORDER BY rowid")
        return [Operation(key=k, kind=kind, account=a, amount=n) for k, kind, a, n in rows]


def apply(key: str, kind: str, account: str, amount: int) -> Operation:
    """Credit `amount` (negative: debit) to `account`, once per `key`: a call
    with a key already applied changes nothing and returns that operation."""
    with _bank() as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            done = db.execute("SELECT kind, account, amount FROM operations WHERE key = ?",
                              (key,)).fetchone()
            if done is not None:
                db.execute("ROLLBACK")
                return Operation(key=key, kind=done[0], account=done[1], amount=done[2])
            row = db.execute("SELECT balance, status FROM accounts WHERE name = ?",
                             (account,)).fetchone()
            if row is None:
                raise UnknownAccount(f"no account {account!r}")
            balance, status = row
            if status == "frozen":
                raise AccountFrozen(f"account {account!r} is frozen")
            if status == "offline":
                raise BankUnavailable(f"the bank of account {account!r} does not answer")
            if balance + amount < 0:
                raise InsufficientFunds(f"account {account!r} holds {balance}, "
                                        f"{-amount} asked")
            db.execute("UPDATE accounts SET balance = balance + ? WHERE name = ?",
                       (amount, account))
            db.execute("INSERT INTO operations VALUES (?, ?, ?, ?)",
                       (key, kind, account, amount))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    return Operation(key=key, kind=kind, account=account, amount=amount)


# --- the steps and the task --------------------------------------------------------------


def withdraw(account: str, amount: int) -> Operation:
    return apply(ratchet.current_context().idempotency_key, "withdraw", account, -amount)


def deposit(account: str, amount: int) -> Operation:
    return apply(ratchet.current_context().idempotency_key, "deposit", account, amount)


def refund(withdrawal: Operation) -> Operation:
    """The undo of `withdraw`: given the withdrawal step's output. Its own
    idempotency key (the undo step's) makes it apply once too."""
    return apply(ratchet.current_context().idempotency_key, "refund", withdrawal.account,
                 -withdrawal.amount)


async def report_failure(ctx: ratchet.Context, error: ratchet.RunError) -> None:
    ctx.logger.error("transfer failed, withdrawal refunded: %s: %s", error.type, error.message)


@ratchet.task(id="money-transfer", on_failure=report_failure)
async def money_transfer(ctx: ratchet.Context, transfer: Transfer) -> Receipt:
    withdrawal = await ctx.step("withdraw", withdraw, transfer.source, transfer.amount,
                                compensate=refund)
    deposited = await ctx.step(
        "deposit", deposit, transfer.target, transfer.amount,
        retry=ratchet.Retry(max_attempts=3, min_delay=0.2, max_delay=1.0))
    return Receipt(withdrawal=withdrawal.key, deposit=deposited.key)


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "open":
        open_bank()
        print(f"opened {bank_path()}: {balances()}")
    elif command == "balances":
        for name, balance in balances().items():
            print(f"{name:8} {balance:6}")
    else:
        sys.exit("usage: python examples/money_transfer.py open|balances "
                 "(the bank file is $MONEY_TRANSFER_BANK, default ./bank.db)")
