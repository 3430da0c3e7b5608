"""Regenerate the Python stubs from protos/ into python_worker/ratchet/v1/.

The output package path matches the proto package (ratchet.v1), so the
generated imports (`from ratchet.v1 import common_pb2`) work as they are.

    python scripts/gen_protos.py            # write the stubs
    python scripts/gen_protos.py --check    # exit 1 if the committed stubs differ
"""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "python_worker"
PACKAGE = Path("ratchet") / "v1"


def generate(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> int:
    check = "--check" in sys.argv[1:]
    if not check:
        generate(OUT)
        print(f"stubs written to {OUT / PACKAGE}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / PACKAGE
        committed = OUT / PACKAGE
        names = sorted(p.name for p in fresh.iterdir())
        diff = [n for n in names if not (committed / n).exists()]
        _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
        bad = sorted(set(diff + mismatch + errors))
        if bad:
            print("stale stubs (run `make stubs`): " + ", ".join(bad))
            return 1
    print("stubs match the protos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
