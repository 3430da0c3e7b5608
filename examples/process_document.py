"""The `processDocument` task of the article, written with Ratchet.

download -> extract -> analyse, each a durable step. The download step has
its own retry policy because its source is flaky: it fails on the first
attempt of every run with a connection error and succeeds on the next. Run it
with `make demo`, or by hand:

    ratchet dev --worker examples/process_document.py
    ratchet trigger process-document --payload '{"url": "local://lorem"}' --wait
"""

from __future__ import annotations

import collections

import pydantic

import ratchet

DOCUMENTS = {
    "local://lorem": (
        "Durable execution keeps the result of every completed step. "
        "A crash, a retry or a redeploy never runs a completed step again. "
        "Progress only moves forward."
    ),
}

_failures: collections.Counter[str] = collections.Counter()


class Document(pydantic.BaseModel):
    url: str


class Analysis(pydantic.BaseModel):
    top_words: list[str]
    sentences: int


class Result(pydantic.BaseModel):
    analysis: Analysis
    word_count: int


def download_file(url: str, run_key: str) -> str:
    """A flaky local source: the first attempt for each run fails, like a network blip."""
    if url not in DOCUMENTS:
        raise ratchet.NonRetryableError(f"no document at {url}")
    _failures[run_key] += 1
    if _failures[run_key] == 1:
        raise ConnectionError(f"connection reset while fetching {url}")
    return DOCUMENTS[url]


def extract_text(raw: str) -> str:
    return " ".join(raw.split())


def analyse_content(text: str) -> Analysis:
    words = [w.strip(".,").lower() for w in text.split()]
    common = collections.Counter(w for w in words if len(w) > 4).most_common(3)
    return Analysis(top_words=[w for w, _ in common], sentences=text.count("."))


@ratchet.task(
    id="process-document",
    retry=ratchet.Retry(max_attempts=3, factor=2, min_delay=1.0, max_delay=60.0),
)
async def process_document(ctx: ratchet.Context, payload: Document) -> Result:
    file = await ctx.step(
        "download", download_file, payload.url, ctx.run_id,
        retry=ratchet.Retry(max_attempts=5, factor=2, min_delay=0.05, max_delay=1.0),
    )
    text = await ctx.step("extract", extract_text, file)
    analysis = await ctx.step("analyse", analyse_content, text)
    return Result(analysis=analysis, word_count=len(text.split()))
