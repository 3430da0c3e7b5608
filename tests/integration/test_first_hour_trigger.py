"""Issue 12, the trigger and tokens verbs through real processes: payloads
from a file or stdin (past the shell's ~128 KiB argument limit), --metadata,
an idempotency key that matched an existing run, a run's tokens
(`tokens list --run`), and help text on every option."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT, Cluster, eventually, ratchet_cmd, run_cli, run_cli_async

pytestmark = pytest.mark.timeout(120)

TASKS = str(ROOT / "tests" / "integration" / "first_hour_trigger_tasks.py")
BLOB = "x" * (300 * 1024)  # past what one shell argument can carry


def cli_stdin(stdin: str, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ratchet_cmd(*args), input=stdin, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})}, cwd=ROOT)


async def test_a_300_kib_payload_from_a_file_and_from_stdin_reaches_the_run(
        cluster: Cluster, tmp_path: Path) -> None:
    worker = cluster.start_worker(TASKS, slots=2)
    await cluster.wait_worker_connected(worker)
    env = cluster.cli_env("client")
    sent = {"blob": BLOB, "n": 1}
    big = tmp_path / "big.json"
    big.write_text(json.dumps(sent))
    from_file = await run_cli_async("trigger", "fh-echo", "--payload", f"@{big}", "--wait",
                                    "--timeout", "30s", "--json", env=env)
    assert from_file.returncode == 0, from_file.stderr
    shown = json.loads(from_file.stdout)
    assert shown["payload"] == sent and shown["created"] is True
    assert shown["output"] == {"blob_len": len(BLOB), "keys": ["blob", "n"]}

    from_stdin = await asyncio.to_thread(
        cli_stdin, json.dumps({**sent, "n": 2}), "trigger", "fh-echo", "--payload", "-",
        env=env)
    assert from_stdin.returncode == 0, from_stdin.stderr
    run_id = from_stdin.stdout.strip()
    client = cluster.client()
    final = await client.wait(run_id, timeout=30)
    assert final.payload == {**sent, "n": 2}
    assert final.output == {"blob_len": len(BLOB), "keys": ["blob", "n"]}


async def test_metadata_inline_and_from_a_file_shows_in_runs_show(
        cluster: Cluster, tmp_path: Path) -> None:
    worker = cluster.start_worker(TASKS, slots=2)
    await cluster.wait_worker_connected(worker)
    env = cluster.cli_env("client")
    inline = await run_cli_async("trigger", "fh-echo", "--metadata",
                                 '{"team": "billing", "ticket": "T-1"}', env=env)
    assert inline.returncode == 0, inline.stderr
    shown = await run_cli_async("runs", "show", inline.stdout.strip(), "--json", env=env)
    assert json.loads(shown.stdout)["metadata"] == {"team": "billing", "ticket": "T-1"}

    meta = tmp_path / "meta.json"
    meta.write_text('{"source": "file"}')
    both = await asyncio.to_thread(cli_stdin, '{"from": "stdin"}', "trigger", "fh-echo",
                                   "--payload", "-", "--metadata", f"@{meta}", env=env)
    assert both.returncode == 0, both.stderr
    shown = await run_cli_async("runs", "show", both.stdout.strip(), "--json", env=env)
    run = json.loads(shown.stdout)
    assert run["metadata"] == {"source": "file"} and run["payload"] == {"from": "stdin"}


async def test_an_idempotency_key_that_matched_says_so_and_warns_on_another_payload(
        cluster: Cluster) -> None:
    worker = cluster.start_worker(TASKS, slots=2)
    await cluster.wait_worker_connected(worker)
    env = cluster.cli_env("client")
    args = ("trigger", "fh-echo", "--idempotency-key", "order-7")
    first = await run_cli_async(*args, "--payload", '{"a": 1, "b": [1, 2]}', env=env)
    assert first.returncode == 0 and first.stderr == "", first.stderr
    run_id = first.stdout.strip()

    # The same payload (keys in another order): a note, no warning, exit 0.
    same = await run_cli_async(*args, "--payload", '{"b": [1, 2], "a": 1}', env=env)
    assert same.returncode == 0 and same.stdout.strip() == run_id
    [note] = same.stderr.splitlines()
    assert "'order-7' matched existing run " + run_id in note
    assert "no new run was created" in note

    # Another payload: still the existing run and exit 0, with a warning.
    other = await run_cli_async(*args, "--payload", '{"a": 2}', "--json", env=env)
    assert other.returncode == 0, other.stderr
    shown = json.loads(other.stdout)
    assert (shown["id"], shown["created"], shown["payload"]) == (
        run_id, False, {"a": 1, "b": [1, 2]})
    note, warning = other.stderr.splitlines()
    assert "no new run was created" in note
    assert warning.startswith("ratchet: warning: the existing run's payload differs")
    assert "new --idempotency-key" in warning


async def test_tokens_list_run_shows_every_token_the_run_waits_or_waited_on(
        cluster: Cluster, tmp_path: Path) -> None:
    worker = cluster.start_worker(TASKS, slots=2)
    await cluster.wait_worker_connected(worker)
    env = cluster.cli_env("client")
    client = cluster.client()
    outside = await client.create_token(tags=["given"])
    unrelated = await client.create_token()
    run = await client.trigger("fh-three-tokens", {"token_id": outside.id})

    async def listed(*extra: str) -> list[dict[str, Any]]:
        done = await run_cli_async("tokens", "list", "--run", run.id, "--json", *extra,
                                   env=env)
        assert done.returncode == 0, done.stderr
        return list(json.loads(done.stdout))

    async def first_wait() -> list[dict[str, Any]]:
        return await listed()

    [approve] = await eventually(first_wait, what="the run's own token to be listed")
    assert (approve["status"], approve["run_id"], approve["step_key"]) == (
        "WAITING", run.id, "approve")
    text = await run_cli_async("tokens", "list", "--run", run.id, env=env)
    assert approve["id"] in text.stdout and "WAITING" in text.stdout

    data = tmp_path / "approval.json"
    data.write_text('{"by": "ana"}')
    done = await run_cli_async("tokens", "complete", approve["id"], "--data", f"@{data}",
                               env=env)
    assert done.returncode == 0 and "completed" in done.stdout, done.stderr

    async def three() -> list[dict[str, Any]] | None:
        found = await listed()
        return found if len(found) == 3 else None

    # Newest first by creation: the run's own tokens were created by the run,
    # the one from outside before the run started.
    tokens = await eventually(three, what="the run to wait on the token from outside")
    assert [(t["id"], t["status"], t["step_key"]) for t in tokens] == [
        (tokens[0]["id"], "TIMED_OUT", "quick"),
        (approve["id"], "COMPLETED", "approve"),
        (outside.id, "WAITING", f"token:{outside.id}")]
    assert tokens[1]["data"] == {"by": "ana"} and tokens[1]["completed_at"]
    assert tokens[2]["tags"] == ["given"] and tokens[0]["expires_at"]
    assert unrelated.id not in {t["id"] for t in tokens}
    assert [t["id"] for t in await listed("--status", "completed")] == [approve["id"]]
    assert [t["id"] for t in await listed("--status", "WAITING")] == [outside.id]
    assert [t["id"] for t in await listed("--tag", "given")] == [outside.id]
    assert [t["id"] for t in await listed("--limit", "1")] == [tokens[0]["id"]]
    paged, page = [], ""
    while True:  # pages of one cross from the run's own tokens to the one from outside
        found, page = await client.list_tokens(run_id=run.id, limit=1, page_token=page)
        paged += [t.id for t in found]
        if not page:
            break
    assert paged == [t["id"] for t in tokens]

    # Without --run: only tokens created outside runs, as before.
    everything = await run_cli_async("tokens", "list", "--json", env=env)
    assert {t["id"] for t in json.loads(everything.stdout)} == {outside.id, unrelated.id}

    done = await asyncio.to_thread(cli_stdin, '"go"', "tokens", "complete", outside.id,
                                   "--data", "-", env=env)
    assert done.returncode == 0, done.stderr
    final = await client.wait(run.id, timeout=30)
    assert final.output == {"approved": {"by": "ana"}, "quick_timed_out": True, "given": "go"}

    missing = await run_cli_async("tokens", "list", "--run", "run_missing", env=env)
    assert missing.returncode == 1 and "run_missing" in missing.stderr
    assert "not found" in missing.stderr


@pytest.mark.timeout(60)
def test_bad_payload_sources_are_one_line_naming_flag_file_and_position(
        tmp_path: Path) -> None:
    # No coordinator: the payload is read before anything is sent, and a bad
    # one is a usage error (exit 2: nothing was done).
    env = {"RATCHET_COORDINATOR": "127.0.0.1:1"}
    missing = run_cli("trigger", "t", "--payload", f"@{tmp_path}/nope.json", env=env)
    assert missing.returncode == 2
    [line] = missing.stderr.splitlines()
    assert line.startswith(f"ratchet: --payload @{tmp_path}/nope.json: cannot read ")
    assert "No such file or directory" in line

    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "a": 1,\n  "b": \n}\n')
    for flag, args in [("--payload", ("trigger", "t", "--payload", f"@{bad}")),
                       ("--metadata", ("trigger", "t", "--metadata", f"@{bad}")),
                       ("--data", ("tokens", "complete", "tok_x", "--data", f"@{bad}")),
                       ("--payload", ("runs", "retry", "run_x", "--payload", f"@{bad}"))]:
        done = run_cli(*args, env=env)
        assert done.returncode == 2, done
        [line] = done.stderr.splitlines()
        assert line.startswith(f"ratchet: {flag} @{bad} is not valid JSON: "), line
        assert "line 4 column 1" in line, line

    piped = cli_stdin("[1,", "trigger", "t", "--payload", "-", env=env)
    assert piped.returncode == 2
    assert piped.stderr.startswith("ratchet: --payload - (stdin) is not valid JSON: ")

    not_strings = run_cli("trigger", "t", "--metadata", '{"a": 1}', env=env)
    assert not_strings.returncode == 2
    assert "--metadata must be a JSON object of strings" in not_strings.stderr

    twice = cli_stdin("{}", "trigger", "t", "--payload", "-", "--metadata", "-", env=env)
    assert twice.returncode == 2 and "both read stdin" in twice.stderr


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_option_of_trigger_and_tokens_has_help_with_its_default() -> None:
    from ratchet._cli._main import build_parser

    verbs = subparsers(build_parser())
    checked = {"trigger": verbs["trigger"],
               **{f"tokens {k}": v for k, v in subparsers(verbs["tokens"]).items()}}
    assert set(checked) == {"trigger", "tokens complete", "tokens create", "tokens get",
                            "tokens list"}
    for name, sub in checked.items():
        assert sub.description, name
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, (name, action.dest)
            if action.option_strings:
                assert "default" in action.help, (name, action.option_strings)
