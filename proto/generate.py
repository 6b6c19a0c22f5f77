"""Regenerate (or check) the Python code generated from threepc.proto.

    python -m threepc.proto.generate          # rewrite threepc_pb2.py and threepc_pb2.pyi
    python -m threepc.proto.generate --check  # exit 1 if the checked-in copies are stale

The .proto is the one source of the wire contract; the generated files are checked in so that
installing threepc needs no compiler, and a test runs `--check`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GENERATED = ("threepc_pb2.py", "threepc_pb2.pyi")


def generate(out_dir: Path) -> None:
    """Run protoc (from grpcio-tools) on threepc.proto into `out_dir`."""
    from grpc_tools import protoc  # build/test-time dependency only

    args = [
        "protoc",
        f"-I{HERE}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        str(HERE / "threepc.proto"),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on threepc.proto")


def stale_files() -> list[str]:
    """Names of the generated files whose checked-in copy differs from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [
            name
            for name in GENERATED
            if not (HERE / name).exists()
            or (Path(tmp) / name).read_bytes() != (HERE / name).read_bytes()
        ]


def main(argv: list[str]) -> int:
    if "--check" in argv:
        stale = stale_files()
        if stale:
            print(f"stale generated code: {', '.join(stale)}; run python -m threepc.proto.generate")
            return 1
        return 0
    generate(HERE)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
