"""The native gRPC front end (``frontend.cc``): build it on first use and import it.

A C++ gRPC server takes the public port and hands ModelInfer / ModelStreamInfer requests to
Python as bytes, without grpcio's Python layers on the way (its polling loop, thread-pool
hand-off and condition waits cost 0.2-0.4 ms a request on this kind of machine); every other
method is proxied to the grpcio server on a private Unix socket. docs/serving-interfaces.md
has the design and docs/benchmarks.md what it changed.

The extension is compiled against this interpreter's headers and Debian's grpc++ into
``build/native`` (about 5 s here, once; rebuilt when the source changes).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sysconfig
import threading
from pathlib import Path
from types import ModuleType

from edge.core import native_build

SOURCE = Path(__file__).with_name("frontend.cc")
_lock = threading.Lock()
_module: ModuleType | None = None


def build(out_dir: Path | None = None) -> Path:
    """The built extension, compiling it when missing or stale.

    Raises:
        NativeBuildError: g++, grpc++ or Python's headers are missing, or compiling failed.
    """
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").is_file():
        raise native_build.NativeBuildError(f"no Python.h in {include} (Python's headers)")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    output = (out_dir or native_build.ROOT / "build" / "native") / f"_frontend{suffix}"
    digest = native_build.stamp([SOURCE], include)
    if native_build.is_current(output, digest):
        return output
    cflags, libs = native_build.grpc_flags()
    return native_build.compile_and_link([SOURCE], output, [f"-I{include}", *cflags], libs,
                                         digest, "the native gRPC front end", 20, shared=True)


def load() -> ModuleType:
    """The ``_frontend`` extension module (built first if needed).

    Raises:
        NativeBuildError: it cannot be built here.
    """
    global _module
    with _lock:
        if _module is None:
            path = build()
            spec = importlib.util.spec_from_file_location("_frontend", path)
            if spec is None or spec.loader is None:
                raise native_build.NativeBuildError(f"cannot import {path}")
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except ImportError as exc:  # e.g. a grpc++ library gone since the build
                raise native_build.NativeBuildError(f"cannot import {path}: {exc}") from exc
            _module = module
        return _module
