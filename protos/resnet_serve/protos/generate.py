"""Regenerate the committed gRPC stubs from classifier.proto.

The proto is compiled as `resnet_serve/protos/classifier.proto` inside a scratch tree so that the generated
`_pb2_grpc.py` imports its messages by their installed package path, with no post-editing.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ["classifier.proto"]


def generate(out_dir: Path) -> list[Path]:
    """Compile every proto into out_dir; return the files written."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "resnet_serve" / "protos"
        pkg.mkdir(parents=True)
        include = Path(protoc.__file__).parent / "_proto"
        for name in PROTOS:
            shutil.copy(HERE / name, pkg / name)
            args = [
                "protoc",
                f"-I{tmp}",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                f"resnet_serve/protos/{name}",
            ]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {name}")
        for path in sorted(pkg.iterdir()):
            if path.suffix in (".py", ".pyi"):
                target = out_dir / path.name
                shutil.copy(path, target)
                written.append(target)
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    for p in generate(out):
        print(p)
