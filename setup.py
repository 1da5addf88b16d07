"""Build step: generate the gRPC Python stubs from protos/ (never committed, never hand-edited).

Everything else about the package is in pyproject.toml; this file only adds the stub generation to
``build_py``, which runs for wheels and for editable installs alike.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
PACKAGE = "service/api/grpc_gen"


def generate_stubs() -> None:
    from grpc_tools import protoc  # a build requirement (pyproject.toml [build-system])

    out = ROOT / PACKAGE
    out.mkdir(parents=True, exist_ok=True)
    (out / "__init__.py").write_text('"""Generated from protos/ at build time."""\n')
    include = Path(protoc.__file__).parent / "_proto"
    for proto in sorted((ROOT / "protos").glob("*.proto")):
        # Map protos/ onto the package path so the generated imports are package-absolute.
        args = ["protoc", f"-I{PACKAGE}={ROOT / 'protos'}", f"-I{include}", f"--python_out={ROOT}",
                f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}", f"{PACKAGE}/{proto.name}"]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
