"""`make demo`: run the process-document example end to end on the embedded store.

Starts `ratchet dev` with the example's worker in-process (SQLite in a
temporary folder), triggers one run, waits for it, prints its step tree, and
stops the coordinator. Exits 0 only if the run COMPLETED.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ratchet(*args: str) -> list[str]:
    return [sys.executable, "-m", "ratchet", *args]


def main() -> int:
    port, http_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RATCHET_COORDINATOR": address}
    with tempfile.TemporaryDirectory(prefix="ratchet-demo-") as tmp:
        log = Path(tmp) / "dev.log"
        with log.open("w") as out:
            dev = subprocess.Popen(
                ratchet("dev", "--port", str(port), "--http-port", str(http_port),
                        "--db", str(Path(tmp) / "dev.db"),
                        "--worker", str(ROOT / "examples" / "process_document.py")),
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + 30
            while "connected to" not in log.read_text():
                if dev.poll() is not None or time.monotonic() > deadline:
                    print(log.read_text(), file=sys.stderr)
                    print("demo: the dev coordinator did not start", file=sys.stderr)
                    return 1
                time.sleep(0.1)
            print("$ ratchet trigger process-document --payload '{\"url\": \"local://lorem\"}'"
                  " --wait")
            result = subprocess.run(
                ratchet("trigger", "process-document", "--payload",
                        '{"url": "local://lorem"}', "--wait", "--timeout", "60s"),
                env=env, cwd=ROOT)
            return result.returncode
        finally:
            dev.send_signal(signal.SIGTERM)
            try:
                dev.wait(15)
            except subprocess.TimeoutExpired:
                dev.kill()


if __name__ == "__main__":
    sys.exit(main())
