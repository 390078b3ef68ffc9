"""``mededge bench serve``: mededge vs raw ONNX Runtime vs Triton, measured side by side.

Per model, in rounds whose order rotates (raw, mededge, Triton; mededge, Triton, raw; ...):

- raw ONNX Runtime in this process, the reference: one ``InferenceSession`` with the same
  options as the servers (intra-op ``threads``, inter-op 1, ORT_ENABLE_ALL, CPU), back-to-back
  ``session.run`` from one thread, at batch 1 (latency and throughput) and at the servers'
  ``max_batch_size`` (throughput: the most a dynamic batcher could gain by stacking);
- ``mededge serve`` and Triton (pytriton's, from ``.venv-triton``, see ``bench_triton``), both
  with ``max_batch_size`` 8 and a dynamic batcher without queue delay (mededge with two
  adaptive instances, ``ADAPTIVE_INSTANCES``; Triton with one of ``threads`` threads, as raw
  ONNX Runtime runs), driven by gRPC clients
  in separate *processes* that send one encoded KServe v2 request back to back, as Triton's
  perf_analyzer does: one client for batch-1 latency, ``clients`` clients for throughput. The
  clients are C++ (``edge/tools/loadgen``, built on first use; a Python client's own gRPC work
  is about 0.3 ms a request, which is not the server's) or, with ``--client python`` or where
  the C++ one cannot be built, Python processes (their GIL is not the server's). With the C++
  client the batch-1 run alternates with raw ``session.run`` in blocks, and the added latency
  is taken against those raw blocks: this box's speed drifts by up to a millisecond of ResNet
  p50 over minutes, which a raw figure measured a minute earlier does not share. The
  N-client throughput run alternates the same way with raw ``session.run`` (half of each
  block at batch 1, half at ``max_batch_size``; raw's items/s moved by 10 % between minutes),
  and that row's ratios are against the better raw figure of those blocks and of raw's own
  run in the round (``with_ratios``). Four
  transports (``TRANSPORTS``): ModelInfer calls with
  the tensor in the message; one ModelStreamInfer stream per client; and each of those with
  input and output in system shared memory (perf_analyzer's ``--shared-memory system``: each
  client registers its two regions and writes its input into them once).

Both servers' answers are checked against raw ONNX Runtime's (with tritonclient) before any
timing. Figures are
medians over the rounds; the load average of the machine is recorded with them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edge.backends.onnxruntime_backend import SESSION_CONFIG
from edge.tools import loadgen
from edge.tools.bench_triton import (
    TRITON_SCRIPT,
    OutputMismatch,
    TritonServer,
    TritonUnavailable,
    check_outputs,
    start_triton,
    stop_group,
)

__all__ = ["MODELS", "TRITON_SCRIPT", "main", "markdown", "run_bench"]

log = logging.getLogger(__name__)
PORT_LINE = re.compile(r"^mededge: grpc listening on [\d.]+:(\d+)$")
MAX_BATCH = 8
#: Appended to the bench models' config.pbtxt: the same batching as Triton's bench config.
DYNAMIC_BATCHING = "dynamic_batching { max_queue_delay_microseconds: 0 }\n"
#: And how mededge runs them: two instances that split the intra-op threads between them under
#: load and take them all for a batch that runs alone (edge/backends/adaptive_threads.py).
ADAPTIVE_INSTANCES = ('instance_group { count: 2 kind: KIND_CPU }\n'
                      'parameters { key: "adaptive_threads" value: { string_value: "true" } }\n')
RAW, MEDEDGE, TRITON = "onnxruntime (raw)", "mededge", "triton (pytriton)"
#: mededge's gRPC front ends (``grpc.native_frontend`` on / off) and their rows' names.
FRONTENDS = {"native": MEDEDGE, "grpcio": "mededge (grpcio)"}
#: How the clients send: tensors in ModelInfer messages, on one ModelStreamInfer stream per
#: client, or in system shared memory (ModelInfer naming registered regions).
UNARY, STREAM, SHM, STREAM_SHM = "unary", "stream", "shm", "stream+shm"
TRANSPORTS = (UNARY, STREAM, SHM, STREAM_SHM)
_ROW_SUFFIX = {UNARY: "", STREAM: ", streaming", SHM: ", shared memory",
               STREAM_SHM: ", streaming + shared memory"}
_SHARED = (SHM, STREAM_SHM)
_METHOD = "/inference.GRPCInferenceService/"


@dataclass(frozen=True)
class BenchModel:
    name: str
    input: str
    output: str
    shape: tuple[int, ...]  # without the batch axis
    output_shape: tuple[int, ...] = ()  # without the batch axis; needed for shared memory

    def output_bytes(self, batch: int) -> int:
        """FP32 bytes of the output for ``batch`` items."""
        if not self.output_shape:
            raise ValueError(f"{self.name}: output_shape unknown (needed for shared memory)")
        return batch * int(np.prod(self.output_shape)) * 4


@dataclass(frozen=True)
class Result:
    """One system on one model (one round, or the median of rounds); None: not measured.

    For raw ONNX Runtime, ``throughput`` is back-to-back batch-1 runs and ``throughput_max``
    back-to-back runs at ``max_batch``; for a server, ``throughput`` is with N clients and
    ``mean_batch`` the batch size its scheduler formed meanwhile.
    """

    model: str
    system: str
    p50_ms: float | None = None
    p99_ms: float | None = None
    throughput: float | None = None
    throughput_max: float | None = None
    mean_batch: float | None = None
    note: str = ""
    raw_p50_ms: float | None = None  # raw b1 p50 in blocks alternating with this row's b1
    # raw b1 and max-batch items/s in blocks alternating with this row's N clients
    raw_throughput: float | None = None
    raw_throughput_max: float | None = None
    # throughput / the best raw b1 or max-batch figure of the paired blocks and of raw's own
    # run in the same round (per round, then the median); vs_raw_b1 the same for batch 1
    vs_raw: float | None = None
    vs_raw_b1: float | None = None


#: name -> (its builder in edge.tools.bench_models, its tensors)
MODELS: dict[str, tuple[str, BenchModel]] = {
    "resnet18": ("resnet18", BenchModel("resnet18", "input", "logits", (3, 224, 224), (1000,))),
    "unet2d": ("unet2d", BenchModel("unet2d", "image", "logits", (1, 256, 256),
                                    (2, 256, 256))),
    # ResNet-18's tensors without its compute: the transport floor (not in the default list)
    "floor": ("floor", BenchModel("floor", "input", "logits", (3, 224, 224), (1000,)))}


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    arr = np.asarray(latencies) * 1000
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


# --- raw ONNX Runtime ---------------------------------------------------------------------

def session(path: Path, threads: int) -> Any:
    """An ``InferenceSession`` with the session options every system in the bench uses
    (those of mededge's ONNX Runtime backend, spinning off included)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _back_to_back(run: Callable[[], object], seconds: float) -> list[float]:
    for _ in range(2):
        run()
    latencies: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        run()
        latencies.append(time.perf_counter() - t)
    return latencies


def bench_raw(sess: Any, spec: BenchModel, seconds: float, max_batch: int) -> Result:
    """Batch-1 latency and throughput, and throughput at ``max_batch``, from one thread."""
    rng = np.random.default_rng(0)
    one = {spec.input: rng.random((1, *spec.shape), dtype=np.float32)}
    many = {spec.input: rng.random((max_batch, *spec.shape), dtype=np.float32)}
    latencies = _back_to_back(lambda: sess.run(None, one), seconds)
    p50, p99 = _percentiles(latencies)
    full = _back_to_back(lambda: sess.run(None, many), seconds)
    return Result(spec.name, RAW, p50, p99, len(latencies) / sum(latencies),
                  len(full) * max_batch / sum(full), float(max_batch))


# --- gRPC clients in processes --------------------------------------------------------------

def encoded_request(spec: BenchModel, x: np.ndarray,
                    regions: tuple[str, str] | None = None) -> bytes:
    """A KServe v2 ModelInferRequest for ``x``, encoded once: what a load generator sends.
    With ``regions`` (input region, output region) the tensors are placed in those registered
    shared-memory regions instead of the message."""
    from edge.protos import inference_pb2

    request = inference_pb2.ModelInferRequest(model_name=spec.name)
    tensor = request.inputs.add(name=spec.input, datatype="FP32")
    tensor.shape.extend(x.shape)
    output = request.outputs.add(name=spec.output)
    if regions is None:
        request.raw_input_contents.append(x.tobytes())
    else:
        for params, region, size in ((tensor.parameters, regions[0], x.nbytes),
                                     (output.parameters, regions[1],
                                      spec.output_bytes(len(x)))):
            params["shared_memory_region"].string_param = region
            params["shared_memory_byte_size"].int64_param = size
    return request.SerializeToString()


class _SharedMemoryRegions:
    """A client's input and output regions: POSIX shared memory made with tritonclient's
    utilities, registered with the server over gRPC; the input written once."""

    def __init__(self, channel: Any, spec: BenchModel, x: np.ndarray, tag: str = "") -> None:
        from tritonclient.utils import shared_memory

        from edge.protos import inference_pb2

        self._shm = shared_memory
        self._channel = channel
        self.names = (f"bench-{os.getpid()}{tag}-in", f"bench-{os.getpid()}{tag}-out")
        self._handles = []
        register = channel.unary_unary(
            _METHOD + "SystemSharedMemoryRegister",
            request_serializer=inference_pb2.SystemSharedMemoryRegisterRequest.SerializeToString,
            response_deserializer=inference_pb2.SystemSharedMemoryRegisterResponse.FromString)
        for name, size in zip(self.names, (x.nbytes, spec.output_bytes(len(x))), strict=True):
            self._handles.append(shared_memory.create_shared_memory_region(name, "/" + name,
                                                                           size))
            register(inference_pb2.SystemSharedMemoryRegisterRequest(
                name=name, key="/" + name, byte_size=size))
        shared_memory.set_shared_memory_region(self._handles[0], [x])

    def close(self) -> None:
        from edge.protos import inference_pb2

        unregister = self._channel.unary_unary(
            _METHOD + "SystemSharedMemoryUnregister",
            request_serializer=inference_pb2.SystemSharedMemoryUnregisterRequest.SerializeToString,
            response_deserializer=inference_pb2.SystemSharedMemoryUnregisterResponse.FromString)
        import grpc

        for name, handle in zip(self.names, self._handles, strict=False):
            try:
                unregister(inference_pb2.SystemSharedMemoryUnregisterRequest(name=name))
            except grpc.RpcError as exc:  # Triton at times still holds it ("in use")
                log.warning("unregistering %s: %s", name, exc.details())  # type: ignore[attr-defined]
            finally:
                self._shm.destroy_shared_memory_region(handle)


def _client(url: str, spec: BenchModel, batch: int, start_at: float, seconds: float,
            out: Any, transport: str = UNARY) -> None:
    """One load-generating client: sends the same encoded request back to back, one in
    flight, and decodes each answer (as Triton's perf_analyzer prepares its requests once):
    over ModelInfer calls (UNARY), as messages on one ModelStreamInfer stream (STREAM,
    perf_analyzer's ``--streaming``), or either with input and output in this client's
    shared-memory regions (SHM, STREAM_SHM). The servers' answers were checked against raw ONNX
    Runtime before (verify_server). Puts the latencies on ``out``, or the error as a string.
    """
    import grpc

    from edge.protos import inference_pb2

    x = np.random.default_rng(os.getpid()).random((batch, *spec.shape), dtype=np.float32)
    limit = 1 << 30
    channel = grpc.insecure_channel(url, options=[("grpc.max_send_message_length", limit),
                                                  ("grpc.max_receive_message_length", limit)])
    regions = None
    try:
        if transport in _SHARED:
            regions = _SharedMemoryRegions(channel, spec, x)
        request = encoded_request(spec, x, regions.names if regions else None)
        streaming = transport in (STREAM, STREAM_SHM)
        infer = _streaming_infer(channel, request) if streaming else partial(
            channel.unary_unary(_METHOD + "ModelInfer",
                                response_deserializer=inference_pb2.ModelInferResponse.FromString),
            request)
        for _ in range(2):
            _check_answer(infer(), spec, transport)
        time.sleep(max(0.0, start_at - time.time()))
        latencies = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            response = infer()
            latencies.append(time.perf_counter() - t)
            _check_answer(response, spec, transport)
        out.put(latencies)
    except Exception as exc:  # the bench reports it instead of waiting for a silent client
        out.put(f"{transport} client: {exc}")
    finally:
        if regions is not None:
            regions.close()
        channel.close()


def _check_answer(response: Any, spec: BenchModel, transport: str) -> None:
    """Raises RuntimeError when the answer lacks its output (in the message, or described
    with its bytes left in shared memory)."""
    if [o.name for o in response.outputs] != [spec.output]:
        raise RuntimeError(f"answer without its output {spec.output!r}")
    carried = [len(raw) for raw in response.raw_output_contents]
    shared = transport in _SHARED
    if (shared and any(carried)) or (not shared and carried == [0] * len(carried)):
        raise RuntimeError(f"answer of {spec.output!r}: {carried} bytes in the message over "
                           f"{transport}")


def _streaming_infer(channel: Any, request: bytes) -> Callable[[], Any]:
    """A call that sends ``request`` on one open ModelStreamInfer stream and returns the
    answer (a ModelInferResponse). Raises RuntimeError with the server's error message."""
    import queue

    from edge.protos import inference_pb2

    outgoing: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    answers = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        response_deserializer=inference_pb2.ModelStreamInferResponse.FromString)(
            iter(outgoing.get, b""))

    def infer() -> Any:
        outgoing.put(request)
        answer = next(answers)
        if answer.error_message:
            raise RuntimeError(answer.error_message)
        return answer.infer_response

    return infer


def drive(url: str, spec: BenchModel, batch: int, clients: int, seconds: float,
          transport: str = UNARY) -> tuple[list[float], float]:
    """Run ``clients`` client processes for ``seconds``; (all latencies, items per second).

    Raises:
        RuntimeError: a client failed; the message is its error.
    """
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    start_at = time.time() + 4.0 + 0.5 * clients  # time for the processes to import and warm
    procs = [ctx.Process(target=_client, args=(url, spec, batch, start_at, seconds, out,
                                                    transport))
             for _ in range(clients)]
    for p in procs:
        p.start()
    try:
        results = _collect(out, procs, deadline=time.monotonic() + seconds + 180)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    errors = [r for r in results if isinstance(r, str)]
    if errors:
        raise RuntimeError(errors[0])
    latencies = [v for r in results for v in r]
    return latencies, len(latencies) * batch / seconds


def _collect(out: Any, procs: list[Any], deadline: float) -> list[list[float] | str]:
    """One result per client process. Raises RuntimeError when the processes are gone
    without leaving all their results (a crash before reporting), or at ``deadline``."""
    import queue

    results: list[list[float] | str] = []
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=1.0))
            continue
        except queue.Empty:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(procs) - len(results)} client(s) never reported")
        if not any(p.is_alive() for p in procs):
            try:  # a last result may still be in the pipe
                results.append(out.get(timeout=1.0))
            except queue.Empty:
                codes = [p.exitcode for p in procs]
                raise RuntimeError(f"client processes exited without reporting (exit codes "
                                   f"{codes})") from None
    return results


def _batch_counts(client: Any, name: str) -> tuple[int, int] | None:
    """(inference_count, execution_count) from ModelStatistics; None where the server does
    not answer it (pytriton's Triton restricts that protocol to an access token)."""
    try:
        stats = client.get_inference_statistics(name, as_json=True)["model_stats"]
    except Exception as exc:  # tritonclient's InferenceServerException, unimportable here
        log.debug("%s: no statistics: %s", name, exc)
        return None
    return (sum(int(s.get("inference_count", 0)) for s in stats),
            sum(int(s.get("execution_count", 0)) for s in stats))


@contextlib.contextmanager
def _encoded_requests(url: str, spec: BenchModel, batch: int, clients: int,
                      transport: str) -> Any:
    """One encoded request per C++ client; for the shared-memory transports each client's
    regions are made, registered and filled here (and removed afterwards)."""
    import grpc

    limit = 1 << 30
    channel = grpc.insecure_channel(url, options=[("grpc.max_send_message_length", limit),
                                                  ("grpc.max_receive_message_length", limit)])
    regions: list[_SharedMemoryRegions] = []
    try:
        requests = []
        for i in range(clients):
            x = np.random.default_rng(i).random((batch, *spec.shape), dtype=np.float32)
            if transport in _SHARED:
                regions.append(_SharedMemoryRegions(channel, spec, x, tag=f"-c{i}"))
            requests.append(encoded_request(spec, x, regions[-1].names if regions else None))
        yield requests
    finally:
        for r in regions:
            r.close()
        channel.close()


#: The fewest batch-1 requests each side of a paired run gets: a slow model's run is
#: stretched past ``--seconds`` to reach it (U-Net at ~100 ms a request: 6 s are 60 requests,
#: 6 a block, and its p50 moved by several ms between such runs).
MIN_B1_REQUESTS = 120


def paired_b1(loadgen_binary: Path, url: str, spec: BenchModel, seconds: float,
              transport: str, sess: Any) -> tuple[list[float], list[float]]:
    """Batch-1 latencies of one C++ client and of raw ``sess.run``, in alternating blocks
    (:func:`edge.tools.loadgen.paired`): (server, raw). Each side runs ``seconds``, or as long
    as :data:`MIN_B1_REQUESTS` raw runs take if that is longer.

    Raises:
        RuntimeError: the client failed; the message is its error.
    """
    one = {spec.input: np.random.default_rng(0).random((1, *spec.shape), dtype=np.float32)}
    estimate = _estimate(lambda: sess.run(None, one))
    seconds = max(seconds, MIN_B1_REQUESTS * estimate)
    with _encoded_requests(url, spec, 1, 1, transport) as requests:
        clients, ref = loadgen.paired(loadgen_binary, url, requests, spec.output, seconds,
                                      transport in (STREAM, STREAM_SHM), transport in _SHARED,
                                      lambda s: _back_to_back(lambda: sess.run(None, one), s))
    return clients[0], ref


#: The fewest raw max-batch runs a paired throughput run gets (U-Net at batch 8 takes ~1 s).
MIN_MAX_BATCH_RUNS = 8
#: Blocks of a paired throughput run (each a raw block, then all clients together).
THROUGHPUT_BLOCKS = 4


def paired_throughput(loadgen_binary: Path, url: str, spec: BenchModel, batch: int,
                      clients: int, seconds: float, transport: str, sess: Any
                      ) -> tuple[float, float, float]:
    """Items/s of ``clients`` C++ clients together against raw back-to-back ``sess.run``, in
    :data:`THROUGHPUT_BLOCKS` alternating blocks (:func:`edge.tools.loadgen.paired`); each raw
    block runs batch 1 for half its time and :data:`MAX_BATCH` for the other half: (server,
    raw b1, raw max batch). Each side runs ``seconds``, or as long as
    :data:`MIN_MAX_BATCH_RUNS` raw max-batch runs take in its halves if that is longer.

    Raises:
        RuntimeError: a client failed; the message is its error.
    """
    rng = np.random.default_rng(0)
    one = {spec.input: rng.random((1, *spec.shape), dtype=np.float32)}
    many = {spec.input: rng.random((MAX_BATCH, *spec.shape), dtype=np.float32)}
    seconds = max(seconds, 2 * MIN_MAX_BATCH_RUNS * _estimate(lambda: sess.run(None, many)))
    raw_one: list[float] = []
    raw_many: list[float] = []

    def reference(block: float) -> list[float]:
        raw_one.extend(_back_to_back(lambda: sess.run(None, one), block / 2))
        raw_many.extend(_back_to_back(lambda: sess.run(None, many), block / 2))
        return []

    with _encoded_requests(url, spec, batch, clients, transport) as requests:
        results, _ = loadgen.paired(loadgen_binary, url, requests, spec.output, seconds,
                                    transport in (STREAM, STREAM_SHM), transport in _SHARED,
                                    reference, blocks=THROUGHPUT_BLOCKS)
    served = sum(len(r) for r in results) * batch / seconds
    return served, len(raw_one) / sum(raw_one), len(raw_many) * MAX_BATCH / sum(raw_many)


def _estimate(run: Callable[[], object], repeats: int = 3) -> float:
    """Seconds one ``run`` takes: the median of ``repeats`` after one untimed."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_server(system: str, url: str, spec: BenchModel, batch: int, clients: int,
                 seconds: float, transport: str = UNARY, loadgen_binary: Path | None = None,
                 sess: Any = None) -> Result:
    """Batch-1 latency with one client, then throughput with ``clients``; a client failure
    becomes the row's note (not timed). With ``loadgen_binary`` the clients are C++ and the
    batch-1 run alternates with raw ``sess.run`` in blocks (``raw_p50_ms``), and so does the
    throughput run (``raw_throughput``, ``raw_throughput_max``; :func:`with_ratios` makes the
    ratios); else Python."""
    from edge.tools.triton_client import grpcclient

    client = grpcclient().InferenceServerClient(url)
    raw_p50 = None
    try:
        if loadgen_binary is not None:
            one, raw_one = paired_b1(loadgen_binary, url, spec, seconds, transport, sess)
            raw_p50 = _percentiles(raw_one)[0]
        else:
            one, _ = drive(url, spec, 1, 1, seconds, transport)
    except RuntimeError as exc:
        client.close()
        return Result(spec.name, system, note=f"failed: {exc}")
    p50, p99 = _percentiles(one)
    before = _batch_counts(client, spec.name)
    raw_b1 = raw_max = None
    try:
        if loadgen_binary is not None:
            throughput, raw_b1, raw_max = paired_throughput(
                loadgen_binary, url, spec, batch, clients, seconds, transport, sess)
        else:
            _, throughput = drive(url, spec, batch, clients, seconds, transport)
    except RuntimeError as exc:
        client.close()
        return Result(spec.name, system, note=f"failed: {exc}")
    after = _batch_counts(client, spec.name)
    mean_batch = None
    if before is not None and after is not None and after[1] > before[1]:
        mean_batch = (after[0] - before[0]) / (after[1] - before[1])
    client.close()
    return Result(spec.name, system, p50, p99, throughput, mean_batch=mean_batch,
                  raw_p50_ms=raw_p50, raw_throughput=raw_b1, raw_throughput_max=raw_max)


def with_ratios(row: Result, raw: Result) -> Result:
    """``row`` (a server's, throughput paired with raw blocks) with its ratios against the
    stricter of those blocks and ``raw`` (raw's own run in the same round). On this box raw
    ran up to 15 % slower in the blocks right after 8 clients than on its own (the cores idle
    in between), which would flatter the server; taking the better raw figure cannot."""
    if row.throughput is None or row.raw_throughput is None:
        return row
    best_b1 = max(row.raw_throughput, raw.throughput or 0.0)
    best = max(best_b1, row.raw_throughput_max or 0.0, raw.throughput_max or 0.0)
    return replace(row, vs_raw=row.throughput / best, vs_raw_b1=row.throughput / best_b1)


def verify_server(system: str, url: str, spec: BenchModel, sess: Any) -> None:
    """Batch 1 and batch 3 through the server must equal raw ONNX Runtime's outputs.

    Raises:
        OutputMismatch: empty, missing or different outputs.
    """
    from edge.tools.triton_client import grpcclient

    client_mod = grpcclient()
    client = client_mod.InferenceServerClient(url)

    def infer(x: np.ndarray) -> np.ndarray | None:
        inp = client_mod.InferInput(spec.input, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        try:
            result = client.infer(spec.name, [inp])
            return result.as_numpy(spec.output)
        except Exception as exc:  # tritonclient fails in several ways on empty bytes
            raise OutputMismatch(f"{system}: unreadable answer: {exc}") from exc

    try:
        for batch in (1, 3):
            x = np.random.default_rng(batch).random((batch, *spec.shape), dtype=np.float32)
            expected = sess.run([spec.output], {spec.input: x})[0]
            check_outputs(system, infer, x, expected)
    finally:
        client.close()


def verify_shared_memory(system: str, url: str, spec: BenchModel, sess: Any) -> None:
    """Batch 3 with input and output in system shared memory (tritonclient's utilities) must
    equal raw ONNX Runtime's output.

    Raises:
        OutputMismatch: the server refused shared memory, or the region holds other values.
    """
    from tritonclient.utils import shared_memory

    from edge.tools.triton_client import grpcclient

    client_mod = grpcclient()
    client = client_mod.InferenceServerClient(url)
    x = np.random.default_rng(3).random((3, *spec.shape), dtype=np.float32)
    expected = sess.run([spec.output], {spec.input: x})[0]
    names = (f"verify-{os.getpid()}-in", f"verify-{os.getpid()}-out")
    sizes = (x.nbytes, spec.output_bytes(len(x)))
    handles = [shared_memory.create_shared_memory_region(n, "/" + n, s)
               for n, s in zip(names, sizes, strict=True)]

    def infer(batch: np.ndarray) -> np.ndarray:
        shared_memory.set_shared_memory_region(handles[0], [batch])
        inp = client_mod.InferInput(spec.input, list(batch.shape), "FP32")
        inp.set_shared_memory(names[0], sizes[0])
        out = client_mod.InferRequestedOutput(spec.output)
        out.set_shared_memory(names[1], sizes[1])
        client.infer(spec.name, [inp], outputs=[out])
        return shared_memory.get_contents_as_numpy(
            handles[1], np.float32, [len(batch), *spec.output_shape]).copy()

    try:
        for name, key, size in zip(names, names, sizes, strict=True):
            client.register_system_shared_memory(name, "/" + key, size)
        check_outputs(f"{system}, shared memory", infer, x, expected)
    except OutputMismatch:
        raise
    except Exception as exc:  # tritonclient's InferenceServerException
        raise OutputMismatch(f"{system}: shared memory refused: {exc}") from exc
    finally:
        for name in names:
            with contextlib.suppress(Exception):
                client.unregister_system_shared_memory(name)
        for handle in handles:
            shared_memory.destroy_shared_memory_region(handle)
        client.close()


# --- servers ----------------------------------------------------------------------------------

def start_mededge(repo: Path, work: Path, threads: int, frontend: str = "native"
                  ) -> tuple[subprocess.Popen, str]:
    """``mededge serve`` (serving only: no DICOM listener) on an ephemeral port, in its own
    process group, its gRPC port served by ``frontend`` ("native" or "grpcio").

    Raises:
        RuntimeError: it exited before printing its port.
    """
    env = dict(os.environ, MEDEDGE_BACKEND__PROVIDERS="[CPUExecutionProvider]",
               MEDEDGE_BACKEND__INTRA_OP_THREADS=str(threads),
               MEDEDGE_BACKEND__INTER_OP_THREADS="1",
               MEDEDGE_GRPC__NATIVE_FRONTEND=str(frontend == "native").lower())
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "serve", "--model-repository", str(repo),
         "--data-dir", str(work / f"data-{frontend}"), "--bind", "127.0.0.1",
         "--grpc-port", "0", "--http-port", "0", "--no-dicom"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        start_new_session=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        match = PORT_LINE.match(line.strip())
        if match:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, f"127.0.0.1:{match.group(1)}"
    raise RuntimeError(f"mededge serve exited with {proc.wait()}")


# --- the run ----------------------------------------------------------------------------------

def _median(rows: list[Result]) -> Result:
    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return float(np.median(present)) if present else None

    first = rows[0]
    return Result(first.model, first.system, med([r.p50_ms for r in rows]),
                  med([r.p99_ms for r in rows]), med([r.throughput for r in rows]),
                  med([r.throughput_max for r in rows]), med([r.mean_batch for r in rows]),
                  first.note, med([r.raw_p50_ms for r in rows]),
                  med([r.raw_throughput for r in rows]),
                  med([r.raw_throughput_max for r in rows]), med([r.vs_raw for r in rows]),
                  med([r.vs_raw_b1 for r in rows]))


def _write_models(repo: Path, names: list[str]) -> list[tuple[Path, BenchModel]]:
    from edge.tools import bench_models

    specs = []
    for name in names:
        builder, spec = MODELS[name]
        path = bench_models.write_model(repo, name, getattr(bench_models, builder)(),
                                        max_batch=MAX_BATCH)
        config = repo / name / "config.pbtxt"
        config.write_text(config.read_text() + DYNAMIC_BATCHING + ADAPTIVE_INSTANCES)
        specs.append((path, spec))
    return specs


def _start_reference(venv: Path, path: Path, spec: BenchModel, threads: int, work: Path,
                     sess: Any, transports: tuple[str, ...]) -> tuple[TritonServer | None, str]:
    """Triton for one model, checked against raw outputs (also through shared memory when
    that transport is measured); (server or None, note)."""
    try:
        server = start_triton(venv, path, spec.name, spec.input, spec.output, threads,
                              MAX_BATCH, work / "triton" / spec.name, dict(SESSION_CONFIG))
    except (TritonUnavailable, OSError) as exc:
        log.warning("Triton unavailable: %s", exc)
        return None, f"unavailable: {exc}"
    try:
        verify_server(TRITON, server.url, spec, sess)
        if set(_SHARED) & set(transports):
            verify_shared_memory(TRITON, server.url, spec, sess)
    except OutputMismatch as exc:
        server.stop()
        log.error("Triton FAILED the output check: %s", exc)
        return None, f"FAILED output check, not timed: {exc}"
    return server, server.note


def _bench_model(path: Path, spec: BenchModel, urls: dict[str, str], batch: int, clients: int,
                 seconds: float, threads: int, triton: Path | None, rounds: int, work: Path,
                 loads: list[float], transports: tuple[str, ...] = TRANSPORTS,
                 loadgen_binary: Path | None = None) -> list[Result]:
    """Raw, mededge (each server in ``urls``: its rows' name to its address) and Triton on
    one model, each server over each of ``transports``, in rounds of rotating order; the
    medians.

    Raises:
        OutputMismatch: mededge's answers differ from raw ONNX Runtime's.
    """
    sess = session(path, threads)
    for system, url in urls.items():
        verify_server(system, url, spec, sess)
        if set(_SHARED) & set(transports):
            verify_shared_memory(system, url, spec, sess)
    server, note = (None, "skipped (--no-triton)") if triton is None else \
        _start_reference(triton, path, spec, threads, work, sess, transports)
    servers = list(urls.items())
    if server is not None:
        servers.append((TRITON, server.url))
    measures: dict[str, Callable[[], Result]] = {
        RAW: partial(bench_raw, sess, spec, seconds, MAX_BATCH)}
    for system, server_url in servers:
        for transport in transports:
            name = system + _ROW_SUFFIX[transport]
            measures[name] = partial(bench_server, name, server_url, spec, batch, clients,
                                     seconds, transport, loadgen_binary, sess)
    rows: dict[str, list[Result]] = {name: [] for name in measures}
    order = list(measures)
    try:
        for round_ in range(rounds):
            log.info("bench %s: round %d/%d", spec.name, round_ + 1, rounds)
            loads.append(os.getloadavg()[0])
            for name in order[round_ % len(order):] + order[:round_ % len(order)]:
                rows[name].append(measures[name]())
        loads.append(os.getloadavg()[0])
    finally:
        if server is not None:
            server.stop()
    for name, measured in rows.items():
        if name != RAW:
            rows[name] = [with_ratios(r, raw) for r, raw in zip(measured, rows[RAW], strict=True)]
    results = [_median(rows[name]) for name in measures]
    if server is None:
        results.append(Result(spec.name, TRITON, note=note))
    else:
        results = [replace(r, note=note or r.note) if r.system == TRITON else r for r in results]
    return results


def run_bench(work: Path, models: list[str], batch: int, clients: int, seconds: float,
              threads: int, triton: Path | None, rounds: int = 3,
              transports: tuple[str, ...] = TRANSPORTS,
              loadgen_binary: Path | None = None,
              frontends: tuple[str, ...] = ("native",)) -> tuple[list[Result], str]:
    """Measure every model; (median results, load note). ``triton``: the Triton venv or None;
    ``loadgen_binary``: the C++ client (None: Python clients); ``frontends``: one
    ``mededge serve`` per gRPC front end (keys of :data:`FRONTENDS`), all running at once.

    Raises:
        OutputMismatch: mededge's answers differ from raw ONNX Runtime's.
    """
    specs = _write_models(work / "repo", models)
    results: list[Result] = []
    loads: list[float] = []
    procs: list[subprocess.Popen] = []
    urls: dict[str, str] = {}
    try:
        for frontend in frontends:
            proc, urls[FRONTENDS[frontend]] = start_mededge(work / "repo", work, threads,
                                                            frontend)
            procs.append(proc)
        for path, spec in specs:
            results += _bench_model(path, spec, urls, batch, clients, seconds, threads, triton,
                                    rounds, work, loads, transports, loadgen_binary)
    finally:
        for proc in procs:
            stop_group(proc)
    load = (f"1-minute load average {min(loads):.1f}-{max(loads):.1f} during the run"
            if loads else "")
    return results, load


def markdown(results: list[Result], batch: int, clients: int) -> str:
    """The results as a markdown table with ratios against raw ONNX Runtime.

    "vs raw" divides a server's throughput by the *better* of raw's batch-1 and
    max-batch back-to-back throughputs (the stricter reference), "vs raw b1" by raw's batch-1
    throughput; "added" is the server's batch-1 p50 minus raw's: the raw p50 measured in blocks
    alternating with that row's (``raw_p50_ms``) where there is one, else the raw row's. Rows
    whose throughput was paired with raw blocks (``vs_raw``, ``vs_raw_b1``: the C++ clients)
    take their ratios from :func:`with_ratios` (per round, against the better of those blocks
    and the raw row), not from these medians.
    """
    raw = {r.model: r for r in results if r.system == RAW}
    lines = [f"| model | system | b1 p50 ms | b1 p99 ms | added p50 ms | {clients} clients "
             f"x b{batch} items/s | mean batch | vs raw | vs raw b1 |", "|---" * 9 + "|"]
    for r in results:
        ref = raw.get(r.model)
        if r.p50_ms is None or r.p99_ms is None or r.throughput is None:
            lines.append(f"| {r.model} | {r.system} | - | - | - | - | - | {r.note} | - |")
            continue
        if r.system == RAW:
            lines.append(f"| {r.model} | {RAW}, b1 | {r.p50_ms:.2f} | {r.p99_ms:.2f} | - | "
                         f"{r.throughput:.1f} | 1 | reference | reference |")
            lines.append(f"| {r.model} | {RAW}, b{MAX_BATCH} | - | - | - | "
                         f"{r.throughput_max or 0:.1f} | {MAX_BATCH} | reference | - |")
            continue
        base = r.raw_p50_ms if r.raw_p50_ms is not None else ref.p50_ms if ref else None
        added = r.p50_ms - base if base is not None else 0.0
        best = max(ref.throughput or 0.0, ref.throughput_max or 0.0) if ref else 0.0
        ratio = f"{r.vs_raw:.1%}" if r.vs_raw is not None else \
            f"{r.throughput / best:.1%}" if best else "-"
        ratio_b1 = f"{r.vs_raw_b1:.1%}" if r.vs_raw_b1 is not None else \
            f"{r.throughput / ref.throughput:.1%}" if ref and ref.throughput else "-"
        mean = f"{r.mean_batch:.1f}" if r.mean_batch is not None else "-"
        lines.append(f"| {r.model} | {r.system} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
                     f"{added:+.2f} | {r.throughput:.1f} | {mean} | {ratio} | {ratio_b1} |")
    notes = [f"- {r.model} {r.system}: {r.note}" for r in results
             if r.note and r.p50_ms is not None]
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def triton_venv() -> Path:
    """``$MEDEDGE_TRITON_VENV``, else ``.venv-triton`` in the working directory."""
    return Path(os.environ.get("MEDEDGE_TRITON_VENV", ".venv-triton"))


def _client_note(binary: Path | None, why_not: str) -> str:
    if binary is not None:
        return ("clients are C++ processes (edge/tools/loadgen, as perf_analyzer), one request "
                "in flight each; the batch-1 run alternates with raw session.run in 10 blocks "
                f"(raw, server, raw, server ...; at least {MIN_B1_REQUESTS} requests a side, "
                "so slow models run longer than --seconds), and 'added' is the server's p50 "
                "minus the raw p50 of those blocks; likewise the N-client run alternates with "
                f"{THROUGHPUT_BLOCKS} blocks of raw session.run, half of each at batch 1 and "
                f"half at batch {MAX_BATCH} (at least {MIN_MAX_BATCH_RUNS} runs at batch "
                f"{MAX_BATCH}), and a row's 'vs raw' and 'vs raw b1' are against the better "
                "raw figure of those blocks and of raw's own run in the same round, per round")
    return (f"clients are Python processes ({why_not}), one request in flight each; 'added' "
            f"is the server's p50 minus the raw row's")


def main(work: Path, models: list[str], batch: int, clients: int, seconds: float,
         threads: int, triton: bool, rounds: int = 3,
         transports: tuple[str, ...] = TRANSPORTS, client: str = "cpp",
         frontends: tuple[str, ...] = ("native",)) -> int:
    """Run the bench, print the table and write it (markdown and JSON) under ``work``.

    ``threads`` 0 means one intra-op thread per CPU, given explicitly to every system.
    ``client`` "cpp" drives the servers with the C++ load generator (Python clients where it
    cannot be built, said in the header), "python" with Python clients.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = threads or os.cpu_count() or 1
    work.mkdir(parents=True, exist_ok=True)
    binary, why_not = None, "--client python"
    if client == "cpp":
        try:
            binary = loadgen.build()
        except loadgen.LoadgenUnavailable as exc:
            why_not = f"the C++ client is unavailable: {exc}"
            log.warning("mededge bench serve: %s; using Python clients", why_not)
    try:
        results, load = run_bench(work, models, batch, clients, seconds, threads,
                                  triton_venv() if triton else None, rounds, transports,
                                  binary, frontends)
    except OutputMismatch as exc:
        print(f"mededge bench serve: {exc}")
        return 1
    table = markdown(results, batch, clients)
    header = (f"mededge bench serve: {os.cpu_count()} CPUs, ONNX Runtime CPU, intra-op threads "
              f"{threads} (inter-op 1) in every system, {seconds:g} s per measurement, median "
              f"of {rounds} rounds in rotating order; {load}.\nraw = back-to-back session.run "
              f"from one thread (b1, and b{MAX_BATCH} = the servers' max_batch_size); servers: "
              f"dynamic batching, max_batch_size {MAX_BATCH}, no queue delay; mededge runs two "
              f"adaptive instances ({max(1, threads // 2)} thread(s) each under load, "
              f"{threads} for a batch that runs alone), Triton one instance of {threads} "
              f"threads; {_client_note(binary, why_not)} (one encoded KServe v2 request sent "
              f"back to back over ModelInfer, or on one ModelStreamInfer stream per client for "
              f"the 'streaming' rows, or over ModelInfer with input and output in the client's "
              f"registered system shared-memory regions, input written once, for the 'shared "
              f"memory' rows; answers checked with tritonclient first, and by every client).\n\n")
    (work / "bench_serve.md").write_text(header + table)
    (work / "bench_serve.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    print(header + table)
    print(f"written to {work / 'bench_serve.md'}")
    return 0
