"""Generate the Python code of the gRPC contract (`proto/lodestar/v1/*.proto`).

    python -m lodestar.services.protos            # rewrite proto/lodestar/v1/*_pb2*.py(i)
    python -m lodestar.services.protos --check    # exit 1 when the checked-in code is stale

The generated modules are checked in (the server needs no grpcio-tools at run time) and install
as `lodestar.v1`; tests/test_grpc_contract.py fails when they differ from a fresh generation.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[1] / "proto"
PACKAGE_DIR = PROTO_ROOT / "lodestar" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Run protoc over every .proto of the package into `out_root`; returns the files written."""
    from grpc_tools import protoc  # dev dependency

    sources = sorted(PACKAGE_DIR.glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(s.relative_to(PROTO_ROOT)) for s in sources),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {[s.name for s in sources]}")
    return sorted(p for p in (out_root / "lodestar" / "v1").iterdir() if p.is_file())


def stale_files() -> list[str]:
    """Names of generated files that are missing, extra or different from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_bytes() for p in generate(Path(tmp))}
    current = {
        p.name: p.read_bytes() for p in PACKAGE_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES)
    }
    return sorted(n for n in fresh.keys() | current.keys() if fresh.get(n) != current.get(n))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        print("stale: " + ", ".join(stale) if stale else "generated code is current")
        return 1 if stale else 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            (PACKAGE_DIR / path.name).write_bytes(path.read_bytes())
            print(f"wrote {PACKAGE_DIR / path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
