"""A buf plugin that generates Python messages, gRPC stubs and type stubs with grpcio-tools.

buf hands the plugin a CodeGeneratorRequest on stdin; this passes the request's descriptors to the protoc
bundled in grpcio-tools (so the generated code matches the grpcio and protobuf runtimes we pin) and answers
with the generated files, plus the `__init__.py` files that make the output importable.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc


def main() -> int:
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    with tempfile.TemporaryDirectory() as tmp:
        descriptors = Path(tmp) / "descriptors.pb"
        descriptors.write_bytes(descriptor_pb2.FileDescriptorSet(file=request.proto_file).SerializeToString())
        out = Path(tmp) / "out"
        out.mkdir()
        args = [
            "protoc",
            f"--descriptor_set_in={descriptors}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *request.file_to_generate,
        ]
        if protoc.main(args) != 0:
            response.error = "grpc_tools.protoc failed"
        else:
            packages = set()
            for path in sorted(out.rglob("*")):
                if path.is_file():
                    name = path.relative_to(out).as_posix()
                    response.file.add(name=name, content=path.read_text())
                    packages.update(p.as_posix() for p in Path(name).parents if p.as_posix() != ".")
            for package in sorted(packages):
                response.file.add(name=f"{package}/__init__.py", content="")
    sys.stdout.buffer.write(response.SerializeToString())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
