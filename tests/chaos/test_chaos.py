"""Chaos: two coordinators on one Postgres, three workers, and faults of every
kind while a mixed load runs; afterwards every run is where it must be.

The short version runs in the suite. The long one (docs/guarantees.md, "Chaos"):

    RATCHET_CHAOS_RUNS=2000 .venv/bin/python -m pytest tests/chaos -k long -s
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.chaos.chaos import Config, run_chaos
from tests.conftest import IN_CI

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.serial,
    # Under CI=true a missing Postgres toolchain fails the run instead.
    pytest.mark.skipif(not IN_CI and (shutil.which("initdb") is None
                                      or shutil.which("pg_ctl") is None),
                       reason="needs initdb and pg_ctl for a throwaway Postgres"),
]

LONG_RUNS = int(os.environ.get("RATCHET_CHAOS_RUNS", "0"))


async def _run(config: Config, tmp_path: Path) -> None:
    report, logs = await run_chaos(config, tmp_path)
    print(report.table())
    if report.problems:
        print(logs)  # shown by pytest only when the test failed
        print("\n".join(report.problems))
    assert not report.problems, "\n".join(report.problems[:60])


@pytest.mark.timeout(300)
async def test_chaos_short(tmp_path: Path) -> None:
    seed = int(os.environ.get("RATCHET_CHAOS_SEED", "1"))
    await _run(Config(runs=300, seed=seed, load_seconds=50, fault_seconds=65,
                      settle_seconds=45, coordinator_kills=2, postgres_restarts=1,
                      worker_stops=1), tmp_path)


@pytest.mark.timeout(7200)
@pytest.mark.skipif(LONG_RUNS < 1, reason="set RATCHET_CHAOS_RUNS (e.g. 2000) to run it")
async def test_chaos_long(tmp_path: Path) -> None:
    seed = int(os.environ.get("RATCHET_CHAOS_SEED", "2"))
    # The same rate as the short version (6 runs/s), faults throughout.
    load = LONG_RUNS / 6
    await _run(Config(runs=LONG_RUNS, seed=seed, load_seconds=load, fault_seconds=load + 15,
                      settle_seconds=120, coordinator_kills=max(2, int(load // 60)),
                      postgres_restarts=max(1, int(load // 120)),
                      worker_stops=max(1, int(load // 60))), tmp_path)
