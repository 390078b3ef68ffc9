"""Generate the Python protobuf and gRPC modules in ``edge/protos`` from ``proto/*.proto``.

Run as ``python proto/generate.py [OUT_DIR]`` (``make proto``). Imports between generated modules
are rewritten to package-absolute form so ``edge.protos`` is importable from anywhere, and the
descriptors are registered in ``edge.protos.POOL`` instead of protobuf's default pool, so the
process can also import ``tritonclient.grpc`` (which registers files of the same names).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
PACKAGE = "edge.protos"


def generate(out_dir: Path) -> list[Path]:
    """Compile every .proto under proto/ into ``out_dir``; return the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}", *sources]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = sorted(out_dir.rglob("*_pb2*.py"))
    for path in written:
        text = path.read_text()
        text = re.sub(r"^import (\w+_pb2) as", rf"from {PACKAGE} import \1 as", text, flags=re.M)
        text = re.sub(r"^from (mededge\.v1) import", rf"from {PACKAGE}.\1 import", text, flags=re.M)
        # our descriptors live in a private pool: tritonclient registers files of the same
        # names (model_config.proto, package inference) in the default pool
        text = text.replace("_descriptor_pool.Default()", "_edge_pool")
        text = text.replace("from google.protobuf.internal import builder as _builder\n",
                            "from google.protobuf.internal import builder as _builder\n"
                            f"from {PACKAGE} import POOL as _edge_pool\n")
        path.write_text(text)
    for folder in {p.parent for p in written}:
        init = folder / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated from proto/; do not edit."""\n')
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "edge" / "protos"
    for written_path in generate(target):
        print(written_path)
