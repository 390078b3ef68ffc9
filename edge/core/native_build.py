"""Compiling the project's C++ pieces (the native gRPC front end, the load generator) on first
use: g++ with grpc++ from ``pkg-config``, sources compiled in parallel, the result replaced
atomically and rebuilt only when a source changes (a sha256 stamp beside it).

Debian's ``g++ libgrpc++-dev protobuf-compiler-grpc pkg-config`` provide the tools;
``.ci/run`` installs them. Where something is missing, :class:`NativeBuildError` says what.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

#: The repository root (build outputs go under ``build/``).
ROOT = Path(__file__).resolve().parents[2]


class NativeBuildError(RuntimeError):
    """A C++ piece cannot be built here; the message says what is missing or what failed."""


def stamp(files: Sequence[Path], *extra: str) -> str:
    """A digest of the sources (and any extra strings, e.g. flags) a build depends on."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    for text in extra:
        digest.update(text.encode())
    return digest.hexdigest()


def is_current(output: Path, digest: str) -> bool:
    """Whether ``output`` exists and was built from sources with ``digest``."""
    stamp_file = output.with_name(output.name + ".sha256")
    return output.is_file() and stamp_file.is_file() and stamp_file.read_text() == digest


def tool(name: str) -> str:
    """The path of a build tool.

    Raises:
        NativeBuildError: not installed.
    """
    path = shutil.which(name)
    if path is None:
        raise NativeBuildError(f"missing {name} (Debian: g++ libgrpc++-dev "
                               f"protobuf-compiler-grpc pkg-config)")
    return path


def grpc_flags(*packages: str) -> tuple[list[str], list[str]]:
    """(compile flags, link flags) of grpc++ and any other ``pkg-config`` packages.

    Raises:
        NativeBuildError: pkg-config or a package is missing.
    """
    found = subprocess.run([tool("pkg-config"), "--cflags", "--libs", "grpc++", *packages],
                           capture_output=True, text=True)
    if found.returncode != 0:
        raise NativeBuildError(f"pkg-config grpc++ {' '.join(packages)}: "
                               f"{found.stderr.strip()}")
    flags = found.stdout.split()
    cflags = [f for f in flags if not f.startswith(("-l", "-L", "-Wl"))]
    return cflags, [f for f in flags if f not in cflags]


def run(command: Sequence[str]) -> None:
    """Run a build step.

    Raises:
        NativeBuildError: it failed; the message ends with its stderr.
    """
    done = subprocess.run(list(command), capture_output=True, text=True)
    if done.returncode != 0:
        raise NativeBuildError(f"{Path(command[0]).name} failed: "
                               f"{done.stderr.strip()[-2000:]}")


def compile_and_link(sources: Sequence[Path], output: Path, cflags: Sequence[str],
                     libs: Sequence[str], digest: str, what: str, seconds: int,
                     shared: bool = False) -> Path:
    """Compile ``sources`` in parallel into ``output`` (an executable, or with ``shared`` a
    shared library), announcing it on stderr, and record ``digest`` beside it.

    Raises:
        NativeBuildError: g++ is missing or failed.
    """
    gxx = tool("g++")
    output.parent.mkdir(parents=True, exist_ok=True)
    print(f"building {what} into {output.parent} (about {seconds} s on 2 cores) ...",
          file=sys.stderr, flush=True)
    pic = ["-fPIC"] if shared else []
    # objects and the linked file in a folder of this build's own, so that two processes
    # building at once (a test server and a `mededge serve` it starts) never mix their files
    with tempfile.TemporaryDirectory(prefix="build-", dir=output.parent) as tmp:
        objects = [Path(tmp) / (src.name + ".o") for src in sources]
        compiles = [subprocess.Popen([gxx, "-O2", "-std=c++17", *pic, *cflags, "-c", str(src),
                                      "-o", str(obj)], stderr=subprocess.PIPE, text=True)
                    for src, obj in zip(sources, objects, strict=True)]
        failures = [p.communicate()[1] for p in compiles if p.wait() != 0]
        if failures:
            raise NativeBuildError(f"g++ failed: {failures[0].strip()[-2000:]}")
        linked = Path(tmp) / output.name
        run([gxx, *(["-shared"] if shared else []), *map(str, objects), *libs, "-o",
             str(linked)])
        linked.replace(output)  # atomic: a process loading it sees the old or the new file
    output.with_name(output.name + ".sha256").write_text(digest)
    return output
