"""Build hook of reflex-client: generates the gRPC stubs from the Reflex proto.

The stubs are never committed. While the package is built (``pip install``, ``python -m
build``), grpcio-tools (a build requirement in pyproject.toml) compiles
``proto/reflex/v1/reflex.proto`` into ``reflex_client/_proto/`` of the build, with type
stubs (``.pyi``). The proto is looked up next to this file first (an sdist carries a
copy) and then at the repository root (``../../proto``). The runtime dependencies are the
grpcio and protobuf versions the generated code asks for, read from it, so an install
never pairs the stubs with a runtime too old to load them.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTO_REL = Path("reflex") / "v1" / "reflex.proto"
PROTO_ROOTS = [HERE / "proto", HERE.parent.parent / "proto"]
GENERATED = ("reflex_pb2.py", "reflex_pb2.pyi", "reflex_pb2_grpc.py")


def proto_root() -> Path:
    """The directory holding reflex/v1/reflex.proto."""
    for root in PROTO_ROOTS:
        if (root / PROTO_REL).is_file():
            return root
    raise SystemExit(
        f"reflex-client: {PROTO_REL} not found under any of {[str(r) for r in PROTO_ROOTS]}"
    )


def generate(out: Path) -> None:
    """Compiles the proto into `out` (reflex_pb2.py, .pyi, reflex_pb2_grpc.py, __init__.py)."""
    try:
        from grpc_tools import protoc
    except ImportError as err:  # pragma: no cover - build requirement
        raise SystemExit(f"reflex-client: building needs grpcio-tools ({err})") from err
    import importlib.resources

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    root = proto_root()
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(root / PROTO_REL),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"reflex-client: protoc failed on {root / PROTO_REL}")
        out.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            text = (Path(tmp) / "reflex" / "v1" / name).read_text()
            # The stubs live in reflex_client._proto, not in a top-level `reflex` package.
            text = text.replace("from reflex.v1 import reflex_pb2", "from . import reflex_pb2")
            (out / name).write_text(text)
    (out / "__init__.py").write_text(
        '"""gRPC stubs generated from reflex/v1/reflex.proto at build time."""\n'
    )


def runtime_requirements() -> list[str]:
    """grpcio and protobuf at least as new as the generated code demands."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        pb2 = (Path(tmp) / "reflex_pb2.py").read_text()
        grpc_file = (Path(tmp) / "reflex_pb2_grpc.py").read_text()
    requirements = []
    grpc_version = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", grpc_file)
    requirements.append(f"grpcio>={grpc_version.group(1)}" if grpc_version else "grpcio>=1.62")
    pb_version = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),",
        pb2,
    )
    if pb_version:
        requirements.append("protobuf>=" + ".".join(pb_version.groups()))
    else:
        requirements.append("protobuf>=4.21")
    return requirements


class BuildPyWithStubs(build_py):
    """build_py that also writes the generated stubs into the build."""

    def run(self) -> None:
        super().run()
        generate(Path(self.build_lib) / "reflex_client" / "_proto")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        out = Path(self.build_lib) / "reflex_client" / "_proto"
        extra = [str(out / n) for n in (*GENERATED, "__init__.py")]
        return list(super().get_outputs(include_bytecode)) + extra


class SdistWithProto(sdist):
    """sdist that carries a copy of the proto, so it builds away from the repository."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        target = Path(base_dir) / "proto" / PROTO_REL
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(proto_root() / PROTO_REL, target)


setup(
    install_requires=runtime_requirements(),
    cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProto},
)
