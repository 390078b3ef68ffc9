"""The Triton reference of ``mededge bench serve``: pytriton's Triton in its own venv.

``nvidia-pytriton`` pins numpy<2, and under numpy 2 its Python backend answers every inference
with *empty* output bytes; so Triton runs from ``.venv-triton`` (``make venv-triton``: numpy<2,
nvidia-pytriton, the same onnxruntime version as mededge's venv, onnx, tritonclient), never from
the mededge venv. The server is a subprocess in its own session (process group), stopped with
``killpg`` so its tritonserver and Python-backend children go with it. Before any timing,
:func:`check_outputs` compares a server's answers with raw ONNX Runtime's; a server that answers
empty or different tensors fails loudly instead of being timed.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The Triton server, run by the Triton venv's python. argv: model path, model name, input name,
#: output name, intra-op threads, gRPC port (HTTP and metrics on the next two), and optionally
#: max_batch_size (default 8), session config entries as JSON and a file descriptor to write
#: "triton ready" to once the model is bound (a pipe of the starter's own: tritonserver writes
#: its log to the same stdout, and a line of it can land in the middle of a printed marker).
#: Same session options as
#: mededge's backend and the raw reference: intra-op ``threads``, inter-op 1, ORT_ENABLE_ALL,
#: the config entries (no spinning), CPU provider. Triton's dynamic batcher with
#: no queue delay, as mededge's bench config. No endpoint restricted by token (shared memory
#: and statistics open, as on mededge). ``tests/edge/backends/test_remote_kserve.py`` runs
#: it too (with the mededge venv's python).
TRITON_SCRIPT = """
import os, sys, sysconfig
libdir = sysconfig.get_config_var("LIBDIR") or ""
# Triton's Python backend must load this interpreter's libpython, not the system's older one.
os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(
    p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)
import json
import numpy as np, onnx, onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig
path, name, inp, out, threads, port = sys.argv[1:7]
max_batch = int(sys.argv[7]) if len(sys.argv) > 7 else 8
entries = json.loads(sys.argv[8]) if len(sys.argv) > 8 else {}
ready_fd = int(sys.argv[9]) if len(sys.argv) > 9 else None
so = ort.SessionOptions()
so.intra_op_num_threads = int(threads)
so.inter_op_num_threads = 1
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
for key, value in entries.items():
    so.add_session_config_entry(key, value)
session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
graph = onnx.load(path, load_external_data=False).graph
def dims(values, wanted):
    value = next(v for v in values if v.name == wanted)
    return tuple(d.dim_value or -1 for d in value.type.tensor_type.shape.dim[1:])
@batch
def infer(**inputs):
    return {out: session.run([out], {inp: inputs[inp]})[0]}
config = TritonConfig(grpc_port=int(port), http_port=int(port) + 1, metrics_port=int(port) + 2)
# pytriton >= 0.7 puts shared memory and statistics behind a generated token by default; the
# bench's clients use both, as they do with mededge, so nothing is restricted (loopback only)
try:
    from pytriton.triton import TritonSecurityConfig
    security = {"security_config": TritonSecurityConfig(restricted_endpoints=[])}
except ImportError:
    security = {}
with Triton(config=config, **security) as triton:
    triton.bind(model_name=name, infer_func=infer,
                inputs=[Tensor(name=inp, dtype=np.float32, shape=dims(graph.input, inp))],
                outputs=[Tensor(name=out, dtype=np.float32, shape=dims(graph.output, out))],
                config=ModelConfig(max_batch_size=max_batch,
                                   batcher=DynamicBatcher(max_queue_delay_microseconds=0)))
    print("triton ready numpy", np.__version__, "onnxruntime", ort.__version__, flush=True)
    if ready_fd is not None:
        os.write(ready_fd, b"triton ready\\n")
        os.close(ready_fd)
    triton.serve()
"""

#: What the Triton venv must hold; checked before starting the server.
_PROBE = ("import numpy, onnxruntime, onnx, pytriton; "
          "assert int(numpy.__version__.split('.')[0]) < 2, "
          "'numpy ' + numpy.__version__ + ' (pytriton needs numpy<2)'; "
          "print(numpy.__version__, onnxruntime.__version__)")


class TritonUnavailable(RuntimeError):
    """The Triton reference cannot run here; the message says why (one line)."""


class OutputMismatch(RuntimeError):
    """A server answered empty or different tensors than raw ONNX Runtime."""


def venv_python(venv: Path) -> tuple[Path, str]:
    """The Triton venv's interpreter and a 'numpy X, onnxruntime Y' note.

    Raises:
        TritonUnavailable: no venv there, or it lacks numpy<2, onnxruntime, onnx or pytriton.
    """
    python = venv.absolute() / "bin" / "python"
    if not python.exists():
        raise TritonUnavailable(f"no Triton venv at {venv} (make venv-triton builds it)")
    probe = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True,
                           timeout=120)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise TritonUnavailable(f"{venv} is not usable: {last[:160]}")
    numpy_version, ort_version = probe.stdout.split()
    return python, f"numpy {numpy_version}, onnxruntime {ort_version}"


def free_port_block(count: int) -> int:
    """A port p with p .. p+count-1 free now (Triton takes fixed, consecutive ports)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise TritonUnavailable("no block of free ports for Triton")


@dataclass
class TritonServer:
    """A running pytriton Triton (its own process group). A context manager."""

    proc: subprocess.Popen
    url: str
    note: str

    def stop(self) -> None:
        """SIGTERM the whole process group (pytriton, tritonserver, stubs); SIGKILL after 30 s."""
        stop_group(self.proc)

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything in its group."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; children that ignored SIGTERM may still be in the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        break


def start_triton(venv: Path, path: Path, name: str, inp: str, out: str, threads: int,
                 max_batch: int, work: Path, session_config: dict[str, str] | None = None,
                 timeout_s: float = 300.0) -> TritonServer:
    """Start Triton serving ``path`` from the Triton venv; returns once it is ready.

    Raises:
        TritonUnavailable: the venv is missing or broken, or the server did not start (the
            message carries the end of its log).
    """
    python, note = venv_python(venv)
    work.mkdir(parents=True, exist_ok=True)
    script = work / "triton_server.py"
    script.write_text(TRITON_SCRIPT)
    port = free_port_block(3)
    ready_read, ready_write = os.pipe()
    try:
        proc = subprocess.Popen(
            [str(python), str(script), str(path), name, inp, out, str(threads), str(port),
             str(max_batch), json.dumps(session_config or {}), str(ready_write)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, cwd=work, pass_fds=(ready_write,))
    finally:
        os.close(ready_write)  # the child's copy is the only writer: its exit reads as EOF
    tail: deque[str] = deque(maxlen=20)
    _drain(proc, tail)
    with os.fdopen(ready_read, "rb") as ready:
        if select.select([ready], [], [], timeout_s)[0] and \
                ready.readline().startswith(b"triton ready"):
            return TritonServer(proc, f"127.0.0.1:{port}", note)
    stop_group(proc, 5.0)
    lines = [t.strip() for t in list(tail) if t.strip()]
    raise TritonUnavailable("Triton did not start: " + " | ".join(lines[-3:])[-300:])


def _drain(proc: subprocess.Popen, tail: deque[str]) -> None:
    """Keep reading the server's output (its last lines into ``tail``) so that a full pipe
    never blocks it."""
    stream = proc.stdout
    if stream is not None:
        threading.Thread(target=lambda: tail.extend(stream), daemon=True,
                         name="triton-log").start()


def check_outputs(system: str, infer: Callable[[np.ndarray], np.ndarray | None],
                  x: np.ndarray, expected: np.ndarray) -> None:
    """``infer(x)`` (one server round trip) must equal raw ONNX Runtime's ``expected``.

    Raises:
        OutputMismatch: the answer is missing, empty, of another shape, or not close.
    """
    got = infer(x)
    if got is None or got.size == 0:
        raise OutputMismatch(f"{system}: empty output (raw ONNX Runtime gives "
                             f"{expected.shape} {expected.dtype})")
    if got.shape != expected.shape:
        raise OutputMismatch(f"{system}: output shape {got.shape}, raw ONNX Runtime "
                             f"{expected.shape}")
    if not np.allclose(got, expected, rtol=1e-4, atol=1e-4):
        worst = float(np.max(np.abs(got.astype(np.float64) - expected)))
        raise OutputMismatch(f"{system}: outputs differ from raw ONNX Runtime "
                             f"(max abs difference {worst:.3g})")
