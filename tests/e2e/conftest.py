"""Fixtures for the cross-language tests: a coordinator, and Node workers.

The Node worker's packages are installed with `npm ci` once per session when
`examples/node_worker/node_modules` is missing or older than the lock file.
Without `node` and `npm` the tests are skipped, or fail under `CI=true`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from typing import NoReturn

import pytest

from tests.harness import ROOT, Cluster, Process

NODE_WORKER = ROOT / "examples" / "node_worker"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MIN_NODE_MAJOR = 20

StartNode = Callable[..., Process]


def _missing(message: str) -> NoReturn:
    if IN_CI:
        pytest.fail(message + " (CI=true: the cross-language tests are required)")
    pytest.skip(message)


def _installed() -> bool:
    # npm writes node_modules/.package-lock.json on every install.
    marker = NODE_WORKER / "node_modules" / ".package-lock.json"
    lock = NODE_WORKER / "package-lock.json"
    return marker.exists() and marker.stat().st_mtime >= lock.stat().st_mtime


@pytest.fixture(scope="session")
def node() -> str:
    """Path of a `node` that can run examples/node_worker, its packages installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        _missing("node and npm are needed for the Node worker tests")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    major = int(version.stdout.strip().lstrip("v").split(".")[0])
    if major < MIN_NODE_MAJOR:
        _missing(f"Node.js {MIN_NODE_MAJOR} or newer is needed, found {version.stdout.strip()}")
    if not _installed():
        result = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_WORKER,
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            pytest.fail(f"npm ci in {NODE_WORKER} failed:\n{result.stdout}\n{result.stderr}")
    return node


@pytest.fixture
def start_node(cluster: Cluster, node: str) -> StartNode:
    """Start a Node worker process on the cluster; the cluster stops it at the end."""

    def start(*, slots: int = 2, key: str | None = None) -> Process:
        n = sum(1 for w in cluster.workers if w.log.name.startswith("node-")) + 1
        worker = Process(
            [node, str(NODE_WORKER / "worker.js")], cluster.tmp / f"node-worker-{n}.log",
            env={"RATCHET_COORDINATOR": cluster.address,
                 "RATCHET_API_KEY": key if key is not None else cluster.key("worker"),
                 "WORKER_SLOTS": str(slots)})
        cluster.workers.append(worker)
        return worker

    return start
