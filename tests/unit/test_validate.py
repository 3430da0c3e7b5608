"""The request checks of engine/validate.py, without a coordinator."""

from __future__ import annotations

import math
import time

import pytest

from ratchet_server.engine import errors, validate


@pytest.mark.parametrize("doc", [
    b'{"a": [1, 2, {"b": null}]}',
    b'"\\\\u0000"',  # an escaped backslash then the text u0000: no NUL
    b'"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["',
    b"[" * 64 + b"]" * 64,
    b"[" + b"[1]," * 10_000 + b"[1]]",  # many brackets, shallow
])
def test_accepted_documents(doc: bytes) -> None:
    assert validate.json_document(doc, "payload", 1 << 20) == doc.decode()


@pytest.mark.parametrize(("doc", "why"), [
    (b"[" * 65 + b"]" * 65, "nested more than 64"),
    (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested more than 64"),
    (b"[" * 1_000_000, "nested more than 64"),  # no RecursionError
    (b'"\\u0000"', "NUL"),
    (b'{"k\\\\\\u0000": 1}', "NUL"),  # escaped backslash, then a real \u0000
    (b'"\x00"', "NUL"),
    (b"NaN", "not valid JSON"),
    (b"\xff", "not valid JSON"),
])
def test_refused_documents(doc: bytes, why: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=why):
        validate.json_document(doc, "payload", 2 << 20)


def test_a_large_document_is_checked_quickly() -> None:
    doc = b'{"rows": [' + b",".join([b'{"id": 1, "name": "x"}'] * 40_000) + b"]}"
    started = time.perf_counter()
    validate.json_document(doc, "payload", 2 << 20)
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan, 1e12])
def test_durations_out_of_bounds(value: float) -> None:
    with pytest.raises(errors.InvalidArgument):
        validate.duration(value, "delay")


def test_page_tokens() -> None:
    assert validate.list_page_token("12.5|run_x") == (12.5, "run_x")
    for bad in ("nan|x", "inf|x", "1e400|x", "12.5", "x|y"):
        with pytest.raises(errors.InvalidArgument):
            validate.list_page_token(bad)
    assert validate.history_page_token("42") == 42
    for bad in ("-1", "9" * 30, "x"):
        with pytest.raises(errors.InvalidArgument):
            validate.history_page_token(bad)
