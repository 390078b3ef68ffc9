"""The C++ load generator of ``mededge bench serve`` (``kserve_loadgen.cc``): build and run it.

A Python gRPC client costs about 0.3 ms of its own per request on this kind of machine, a C++
one a few tens of microseconds, so, as Triton's perf_analyzer does, the bench drives the
servers with a C++ client and what it measures is the servers. The client sends pre-encoded
KServe v2 requests (bytes prepared by the caller, tensors in the message or in shared-memory
regions the caller registered) and prints latencies; it knows nothing of the models.

It is compiled on first use from the source beside this file and the project's ``proto/``
(needs ``g++``, ``protoc``, ``grpc_cpp_plugin`` and grpc++ via ``pkg-config``: Debian's
``g++ libgrpc++-dev protobuf-compiler-grpc pkg-config``) into ``build/loadgen`` and rebuilt
when the sources change. Where that fails, :class:`LoadgenUnavailable` says why, and the
bench falls back to its Python clients.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from edge.core import native_build

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kserve_loadgen.cc")
ROOT = native_build.ROOT
PROTOS = ("inference.proto", "model_config.proto")
BINARY_NAME = "kserve_loadgen"


class LoadgenUnavailable(RuntimeError):
    """The C++ client cannot be built here; the message says what is missing."""


def build(out_dir: Path | None = None) -> Path:
    """The path of the built client, compiling it when missing or stale (about 15 s on 2 cores,
    with a message on stderr).

    Raises:
        LoadgenUnavailable: a tool, a library or the sources are missing, or compiling failed.
    """
    proto_dir = ROOT / "proto"
    out = out_dir or ROOT / "build" / "loadgen"
    if not all((proto_dir / name).is_file() for name in PROTOS):
        raise LoadgenUnavailable(f"no {' / '.join(PROTOS)} in {proto_dir} (not a source tree)")
    binary = out / BINARY_NAME
    digest = native_build.stamp([SOURCE, *(proto_dir / name for name in PROTOS)])
    if native_build.is_current(binary, digest):
        return binary
    try:
        cflags, libs = native_build.grpc_flags("protobuf")
        generated = out / "generated"
        generated.mkdir(parents=True, exist_ok=True)
        plugin = native_build.tool("grpc_cpp_plugin")
        native_build.run([native_build.tool("protoc"), f"-I{proto_dir}",
                          f"--cpp_out={generated}", f"--grpc_out={generated}",
                          f"--plugin=protoc-gen-grpc={plugin}",
                          *(str(proto_dir / name) for name in PROTOS)])
        sources = [SOURCE, generated / "inference.pb.cc", generated / "inference.grpc.pb.cc",
                   generated / "model_config.pb.cc"]
        return native_build.compile_and_link(
            sources, binary, [f"-I{generated}", *cflags], libs, digest,
            "the C++ load generator", 15)
    except native_build.NativeBuildError as exc:
        raise LoadgenUnavailable(str(exc)) from exc


def _command(binary: Path, url: str, request: Path, output: str, seconds: float,
             stream: bool, shared_output: bool, start_at: float = 0.0,
             blocks: int = 1) -> list[str]:
    command = [str(binary), "--url", url, "--request", str(request), "--output", output,
               "--seconds", f"{seconds:g}"]
    if start_at:
        command += ["--start-at", f"{start_at:.3f}"]
    if blocks > 1:
        command += ["--blocks", str(blocks)]
    if stream:
        command.append("--stream")
    if shared_output:
        command.append("--shared-output")
    return command


def _latencies(text: str) -> list[float]:
    return [int(line) / 1e9 for line in text.split() if line != "."]


def drive(binary: Path, url: str, requests: Sequence[bytes], output: str, seconds: float,
          stream: bool, shared_output: bool) -> list[list[float]]:
    """One client process per request (each sends its own, one in flight), started together
    once all have connected and warmed up; each client's latencies in seconds.

    Raises:
        RuntimeError: a client failed; the message is its error.
    """
    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        files = []
        for i, request in enumerate(requests):
            files.append(Path(tmp) / f"request-{i}.bin")
            files[-1].write_bytes(request)
        start_at = time.time() + 1.0 + 0.1 * len(files)
        procs = [subprocess.Popen(_command(binary, url, f, output, seconds, stream,
                                           shared_output, start_at),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for f in files]
        results = []
        try:
            for proc in procs:
                stdout, stderr = proc.communicate(timeout=seconds + 120)
                if proc.returncode != 0:
                    raise RuntimeError(stderr.strip() or f"exit code {proc.returncode}")
                results.append(_latencies(stdout))
        finally:  # one client failed: the others are not left running
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return results


def paired(binary: Path, url: str, request: bytes, output: str, seconds: float, stream: bool,
           shared_output: bool, reference: Callable[[float], list[float]],
           blocks: int = 10) -> tuple[list[float], list[float]]:
    """Batch-1 latency of one client against ``reference`` (e.g. raw ONNX Runtime, run in this
    process for a given number of seconds, returning its latencies), alternating in ``blocks``
    blocks that share ``seconds``: reference, client, reference, client ... So both see the
    same machine, and a drift of its speed over the minute (this box's batch-1 p50 moves by
    up to a millisecond between runs) lands in both. Each client block starts with two untimed
    requests, so ``reference`` should warm up the same way (``bench_serve._back_to_back``
    does). (client latencies, reference latencies).

    Raises:
        RuntimeError: the client failed; the message is its error.
    """
    blocks = max(2, blocks)
    block = seconds / blocks
    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        file = Path(tmp) / "request.bin"
        file.write_bytes(request)
        proc = subprocess.Popen(_command(binary, url, file, output, block, stream,
                                         shared_output, blocks=blocks),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdin is not None and proc.stdout is not None
        errors: list[str] = []
        reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()),  # type: ignore[union-attr]
                                  daemon=True)
        reader.start()
        client: list[float] = []
        ref: list[float] = []
        try:
            for _ in range(blocks):
                ref += reference(block)
                proc.stdin.write("\n")
                proc.stdin.flush()
                lines = []
                for line in proc.stdout:
                    if line.strip() == ".":
                        break
                    lines.append(line)
                else:
                    raise RuntimeError("client ended early")
                client += _latencies("".join(lines))
            proc.stdin.close()
            proc.wait(timeout=30)
        except (RuntimeError, BrokenPipeError, OSError) as exc:
            proc.kill()
            proc.wait()
            reader.join(5)
            raise RuntimeError((errors[0].strip() if errors and errors[0].strip() else "")
                               or str(exc)) from None
        if proc.returncode != 0:
            reader.join(5)
            raise RuntimeError((errors[0].strip() if errors else "")
                               or f"exit code {proc.returncode}")
    return client, ref

