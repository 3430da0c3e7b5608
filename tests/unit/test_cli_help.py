"""`ratchet --help` and every `ratchet VERB [SUB] --help` explain themselves:
each command has a description, each option and argument has help text, an
option with a default says it, a duration shows its format, a `--status`
lists its values. The parser is walked, so verbs added later are covered."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ratchet._cli import build_parser, duration

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
# A duration's help gives its format, or at least an example with a unit.
DURATION_EXAMPLE = re.compile(r"\d+(ms|s|m|h|d)\b")


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str | None]]:
    """Every (command words, parser, help in its parent's list), depth first."""
    yield path, parser, None
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                for words, sub, helped in commands(child, (*path, name)):
                    yield words, sub, helps.get(name) if words == (*path, name) else helped


ALL = [(words, parser, helped) for words, parser, helped in commands(build_parser())]
IDS = [" ".join(words) or "ratchet" for words, _, _ in ALL]


def options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            yield action


def name(action: argparse.Action) -> str:
    return "/".join(action.option_strings) or action.dest


def test_the_walk_finds_every_verb() -> None:
    found = {words for words, _, _ in ALL}
    for expected in [(), ("worker",), ("trigger",), ("runs",), ("runs", "list"),
                     ("runs", "show"), ("runs", "cancel"), ("runs", "replay"), ("dev",),
                     ("keys", "create"), ("tokens", "complete")]:
        assert expected in found


@pytest.mark.parametrize(("words", "parser", "helped"), ALL, ids=IDS)
def test_every_command_has_a_description_and_help(
        words: tuple[str, ...], parser: argparse.ArgumentParser, helped: str | None) -> None:
    assert (parser.description or "").strip(), f"`ratchet {' '.join(words)}` has no description"
    if words:
        assert (helped or "").strip(), f"`ratchet {' '.join(words)}` has no help in its " \
                                       "parent's list of commands"


@pytest.mark.parametrize(("words", "parser", "helped"), ALL, ids=IDS)
def test_every_option_has_help_with_its_default_and_format(
        words: tuple[str, ...], parser: argparse.ArgumentParser, helped: str | None) -> None:
    where = f"ratchet {' '.join(words)}".strip()
    missing = []
    for action in options(parser):
        text = action.help or ""
        if not text.strip() or text == argparse.SUPPRESS:
            missing.append(f"{name(action)}: no help")
            continue
        default = action.default
        shows_default = (action.option_strings and not action.required
                         and default not in (None, False, [], "", argparse.SUPPRESS))
        if shows_default and "default" not in text:
            missing.append(f"{name(action)}: its default ({default!r}) is not named")
        if action.type is duration and not DURATION_EXAMPLE.search(text):
            missing.append(f"{name(action)}: a duration without its format")
        if action.dest == "status" and not action.choices:
            missing.append(f"{name(action)}: does not list its values")
    assert not missing, f"`{where}`: " + "; ".join(missing)


def help_of(*words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ratchet", *words, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30, check=False)


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(("words", "parser", "helped"), ALL, ids=IDS)
def test_help_renders_in_a_real_process(
        words: tuple[str, ...], parser: argparse.ArgumentParser, helped: str | None) -> None:
    done = help_of(*words)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith(f"usage: ratchet {' '.join(words)}".rstrip())
    assert flat(parser.description or "") in flat(done.stdout)
    for action in options(parser):
        for flag in action.option_strings:
            assert flag in done.stdout


def test_priority_states_the_range_the_coordinator_accepts() -> None:
    from ratchet_server.engine.validate import MAX_PRIORITY

    [trigger] = [p for words, p, _ in ALL if words == ("trigger",)]
    [priority] = [a for a in trigger._actions if "--priority" in a.option_strings]
    text = (priority.help or "").replace(",", "")
    assert str(MAX_PRIORITY) in text and "default 0" in text, priority.help
