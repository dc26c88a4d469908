"""Generate the Python API in omnistage/v1/ from protos/. The one way stubs are made.

python scripts/gen_protos.py            # write omnistage/v1/
python scripts/gen_protos.py --out DIR  # write elsewhere (the staleness test uses this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("omnistage") / "v1"
INIT_TEXT = '"""Generated from protos/omnistage/v1 by scripts/gen_protos.py. Do not edit."""\n'


def generate(out_root: Path) -> list[Path]:
    """Run protoc for every .proto file; return the files written under out_root."""
    from grpc_tools import protoc

    protos = sorted(
        str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto")
    )
    well_known = Path(protoc.__file__).parent / "_proto"
    target = out_root / PACKAGE_DIR
    target.mkdir(parents=True, exist_ok=True)
    for stale in target.glob("*_pb2*.py*"):
        stale.unlink()
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    (target / "__init__.py").write_text(INIT_TEXT)
    return sorted(p for p in target.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write omnistage/v1 under")
    args = parser.parse_args()
    files = generate(args.out)
    print(f"wrote {len(files)} files to {args.out / PACKAGE_DIR}", file=sys.stderr)


if __name__ == "__main__":
    main()
