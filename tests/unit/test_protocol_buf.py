"""The protocol passes buf lint (STANDARD) and never breaks its released form."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = Path(sys.executable).with_name("buf")
RELEASED = ROOT / "protos" / "released.binpb"

pytestmark = pytest.mark.timeout(120)


def buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BUF), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=100)


def test_lint_is_clean() -> None:
    result = buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_against_the_released_protos() -> None:
    result = buf("breaking", "--against", str(RELEASED))
    assert result.returncode == 0, result.stdout + result.stderr


def test_renumbering_a_field_is_caught(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "protos" / "ratchet", tmp_path / "protos" / "ratchet")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    proto = tmp_path / "protos" / "ratchet" / "v1" / "worker.proto"
    text = proto.read_text()
    assert "  string lease_id = 1;\n  string run_id = 2;\n  string step_key = 3;" in text
    proto.write_text(text.replace("  string step_key = 3;", "  string step_key = 33;", 1))
    result = buf("breaking", "--against", str(RELEASED), cwd=tmp_path)
    assert result.returncode != 0
    assert "step_key" in result.stdout + result.stderr
