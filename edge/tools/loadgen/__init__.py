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
             stream: bool, shared_output: bool, blocks: int = 1) -> list[str]:
    command = [str(binary), "--url", url, "--request", str(request), "--output", output,
               "--seconds", f"{seconds:g}"]
    if blocks > 1:
        command += ["--blocks", str(blocks)]
    if stream:
        command.append("--stream")
    if shared_output:
        command.append("--shared-output")
    return command


def _latencies(text: str) -> list[float]:
    return [int(line) / 1e9 for line in text.split() if line != "."]


def paired(binary: Path, url: str, requests: Sequence[bytes], output: str, seconds: float,
           stream: bool, shared_output: bool, reference: Callable[[float], list[float]],
           blocks: int = 10) -> tuple[list[list[float]], list[float]]:
    """Clients (one process per request, one in flight each) against ``reference`` (e.g. raw
    ONNX Runtime, run in this process for a given number of seconds, returning its latencies),
    alternating in ``blocks`` blocks that share ``seconds``: reference, clients, reference,
    clients ... So both see the same machine, and a drift of its speed over the minute (this
    box's batch-1 p50 moves by up to a millisecond between runs, its throughput by 10 %) lands
    in both. Each client block starts with two untimed requests per client, so ``reference``
    should warm up the same way (``bench_serve._back_to_back`` does); the first reference
    block waits until every client has started and connected; with several clients, all of
    them start timing together once every one has warmed up. (each client's latencies
    over all its blocks, the reference's latencies).

    Raises:
        RuntimeError: a client failed; the message is its error.
    """
    blocks = max(2, blocks)
    block = seconds / blocks
    sync = len(requests) > 1
    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        procs = []
        for i, request in enumerate(requests):
            file = Path(tmp) / f"request-{i}.bin"
            file.write_bytes(request)
            command = _command(binary, url, file, output, block, stream, shared_output,
                               blocks=blocks) + (["--sync"] if sync else [])
            procs.append(_Paired(command))
        ref: list[float] = []
        try:
            for proc in procs:  # every client started and connected before the first block
                proc.expect_ready()
            for _ in range(blocks):
                ref += reference(block)
                for proc in procs:
                    proc.send("")
                if sync:
                    for proc in procs:
                        proc.expect_ready()
                    start = f"{time.time() + 0.02:.6f}"
                    for proc in procs:
                        proc.send(start)
                for proc in procs:
                    proc.read_block()
            for proc in procs:
                proc.finish()
        except (RuntimeError, BrokenPipeError, OSError) as exc:
            for proc in procs:
                proc.kill()
            messages = [m for m in (proc.error() for proc in procs) if m]
            raise RuntimeError(messages[0] if messages else str(exc)) from None
    return [proc.latencies for proc in procs], ref


class _Paired:
    """One client process of :func:`paired`, driven block by block over its stdin/stdout."""

    def __init__(self, command: list[str]) -> None:
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.latencies: list[float] = []
        self._errors: list[str] = []
        self._reader = threading.Thread(
            target=lambda: self._errors.append(self.proc.stderr.read()),  # type: ignore[union-attr]
            daemon=True)
        self._reader.start()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect_ready(self) -> None:
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("client ended early")

    def read_block(self) -> None:
        assert self.proc.stdout is not None
        lines = []
        for line in self.proc.stdout:
            if line.strip() == ".":
                break
            lines.append(line)
        else:
            raise RuntimeError("client ended early")
        self.latencies += _latencies("".join(lines))

    def finish(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        if self.proc.returncode != 0:
            raise RuntimeError(f"exit code {self.proc.returncode}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def error(self) -> str:
        """What the client wrote on stderr (after it ended)."""
        self._reader.join(5)
        return self._errors[0].strip() if self._errors else ""
