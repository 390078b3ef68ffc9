"""``mededge bench serve``: mededge vs raw ONNX Runtime vs Triton, measured side by side.

For each model: raw ONNX Runtime in this process (the reference), then ``mededge serve`` and
Triton (the server bundled in ``nvidia-pytriton``, serving the same ONNX Runtime session from
Python) as subprocesses, driven by client *processes* (so the clients do not share the GIL
with each other). Reported: batch-1 latency from one client (p50, p99, added p50 over raw),
and throughput with N concurrent clients as a ratio of raw ONNX Runtime's. Triton that cannot
start is reported as unavailable.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import re
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.tools.bench_models import resnet18, unet2d, write_model

log = logging.getLogger(__name__)
PORT_LINE = re.compile(r"^mededge: grpc listening on [\d.]+:(\d+)$")


@dataclass(frozen=True)
class BenchModel:
    name: str
    input: str
    output: str
    shape: tuple[int, ...]  # without the batch axis


@dataclass(frozen=True)
class Result:
    """One system on one model; None where it was not measured."""

    model: str
    system: str
    p50_ms: float | None = None
    p99_ms: float | None = None
    throughput: float | None = None  # items per second with N clients
    note: str = ""


MODELS = {"resnet18": (resnet18, BenchModel("resnet18", "input", "logits", (3, 224, 224))),
          "unet2d": (unet2d, BenchModel("unet2d", "image", "logits", (1, 256, 256)))}


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    arr = np.asarray(latencies) * 1000
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


# --- raw ONNX Runtime ---------------------------------------------------------------------

def _session(path: Path, threads: int):  # -> ort.InferenceSession
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench_raw(path: Path, spec: BenchModel, batch: int, seconds: float,
              threads: int) -> Result:
    session = _session(path, threads)
    x = np.random.default_rng(0).random((batch, *spec.shape), dtype=np.float32)
    feed = {spec.input: x}
    for _ in range(3):
        session.run(None, feed)
    latencies: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        session.run(None, feed)
        latencies.append(time.perf_counter() - t)
    p50, p99 = _percentiles(latencies)
    # Throughput reference: back-to-back runs at the same batch size (what the scheduler's one
    # execution at a time can at best achieve); ONNX Runtime uses every core inside a run.
    batch_feed = {spec.input: np.random.default_rng(1).random((batch, *spec.shape),
                                                                dtype=np.float32)}
    items = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, batch_feed)
        items += batch
    return Result(spec.name, "onnxruntime (raw)", p50, p99,
                  items / (time.perf_counter() - start))


# --- gRPC clients in processes --------------------------------------------------------------

def _client(url: str, spec: BenchModel, batch: int, start_at: float, seconds: float,
            out: mp.Queue) -> None:
    from edge.tools.triton_client import grpcclient

    client_mod = grpcclient()
    x = np.random.default_rng(os.getpid()).random((batch, *spec.shape), dtype=np.float32)
    client = client_mod.InferenceServerClient(url)
    inp = client_mod.InferInput(spec.input, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    for _ in range(2):
        client.infer(spec.name, [inp])
    time.sleep(max(0.0, start_at - time.time()))
    latencies = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        client.infer(spec.name, [inp])
        latencies.append(time.perf_counter() - t)
    out.put(latencies)


def drive(url: str, spec: BenchModel, batch: int, clients: int, seconds: float
          ) -> tuple[list[float], float]:
    """Run ``clients`` client processes for ``seconds``; (all latencies, items per second)."""
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    start_at = time.time() + 3.0 + 0.3 * clients  # time for the processes to import and warm
    procs = [ctx.Process(target=_client, args=(url, spec, batch, start_at, seconds, out))
             for _ in range(clients)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(10)
    latencies = [v for r in results for v in r]
    return latencies, len(latencies) * batch / seconds


def bench_server(system: str, url: str, spec: BenchModel, batch: int, clients: int,
                 seconds: float) -> Result:
    one, _ = drive(url, spec, 1, 1, seconds)
    p50, p99 = _percentiles(one)
    _, throughput = drive(url, spec, batch, clients, seconds)
    return Result(spec.name, system, p50, p99, throughput)


# --- servers ----------------------------------------------------------------------------------

def start_mededge(repo: Path, work: Path, threads: int) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, MEDEDGE_BACKEND__PROVIDERS="[CPUExecutionProvider]",
               MEDEDGE_BACKEND__INTRA_OP_THREADS=str(threads))
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "serve", "--model-repository", str(repo),
         "--data-dir", str(work / "data"), "--bind", "127.0.0.1", "--grpc-port", "0",
         "--http-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        match = PORT_LINE.match(line.strip())
        if match:
            return proc, f"127.0.0.1:{match.group(1)}"
    raise RuntimeError(f"mededge serve exited with {proc.wait()}")


TRITON_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig
path, name, inp, out, threads, port = sys.argv[1:7]
so = ort.SessionOptions(); so.intra_op_num_threads = int(threads)
session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
dims = __import__("onnx").load(path).graph.input[0].type.tensor_type.shape.dim[1:]
shape = tuple(d.dim_value for d in dims)
@batch
def infer(**inputs):
    return {out: session.run([out], {inp: inputs[inp]})[0]}
config = TritonConfig(grpc_port=int(port), http_port=int(port) + 1, metrics_port=int(port) + 2)
with Triton(config=config) as triton:
    triton.bind(model_name=name, infer_func=infer,
                inputs=[Tensor(name=inp, dtype=np.float32, shape=shape)],
                outputs=[Tensor(name=out, dtype=np.float32, shape=(-1,))],
                config=ModelConfig(max_batch_size=8))
    print("triton ready", flush=True)
    triton.serve()
"""


def start_triton(path: Path, spec: BenchModel, threads: int, port: int
                 ) -> tuple[subprocess.Popen, str]:
    """Triton via pytriton in a subprocess. Raises RuntimeError when it cannot start."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH"))
                                             if p)
    proc = subprocess.Popen(
        [sys.executable, "-c", TRITON_SCRIPT, str(path), spec.name, spec.input, spec.output,
         str(threads), str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env)
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line])[-20:]
        if line.startswith("triton ready"):
            threading.Thread(target=lambda: [None for _ in proc.stdout or ()],  # drain
                             daemon=True).start()
            return proc, f"127.0.0.1:{port}"
    proc.wait()
    raise RuntimeError("Triton did not start: " + "".join(tail)[-600:])


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


# --- the run ----------------------------------------------------------------------------------

def _median(rows: list[Result]) -> Result:
    first = rows[0]
    return Result(first.model, first.system,
                  float(np.median([r.p50_ms for r in rows])),
                  float(np.median([r.p99_ms for r in rows])),
                  float(np.median([r.throughput for r in rows])),
                  f"median of {len(rows)} rounds")


def run_bench(work: Path, models: list[str], batch: int, clients: int, seconds: float,
              threads: int, triton: bool, rounds: int = 3) -> list[Result]:
    """Build the models under ``work/repo`` and measure every system in interleaved rounds
    (raw, mededge, Triton, raw, ...) so that load from elsewhere on the machine hits all three
    alike; each figure is the median over the rounds."""
    repo = work / "repo"
    results: list[Result] = []
    specs = []
    for name in models:
        build, spec = MODELS[name]
        specs.append((write_model(repo, name, build()), spec))
    proc, url = start_mededge(repo, work, threads)
    try:
        for index, (path, spec) in enumerate(specs):
            tproc, turl, note = None, "", "skipped"
            if triton:
                try:
                    tproc, turl = start_triton(path, spec, threads, 18001 + 10 * index)
                except (RuntimeError, OSError) as exc:
                    note = f"unavailable: {str(exc).splitlines()[0][:120]}"
            rows: dict[str, list[Result]] = {"raw": [], "mededge": [], "triton": []}
            try:
                for round_ in range(rounds):
                    log.info("bench %s: round %d/%d", spec.name, round_ + 1, rounds)
                    rows["raw"].append(bench_raw(path, spec, batch, seconds, threads))
                    rows["mededge"].append(
                        bench_server("mededge", url, spec, batch, clients, seconds))
                    if tproc is not None:
                        rows["triton"].append(bench_server(
                            "triton (pytriton)", turl, spec, batch, clients, seconds))
            finally:
                if tproc is not None:
                    _stop(tproc)
            results += [_median(rows["raw"]), _median(rows["mededge"])]
            results.append(_median(rows["triton"]) if rows["triton"]
                           else Result(spec.name, "triton (pytriton)", note=note))
    finally:
        _stop(proc)
    return results


def markdown(results: list[Result], batch: int, clients: int) -> str:
    """The results as a markdown table with ratios against raw ONNX Runtime."""
    raw = {r.model: r for r in results if r.system.startswith("onnxruntime")}
    lines = [f"| model | system | b1 p50 ms | b1 p99 ms | p50 added ms | "
             f"{clients} clients x b{batch} items/s | vs raw |", "|---" * 7 + "|"]
    for r in results:
        ref = raw.get(r.model)
        if r.p50_ms is None:
            lines.append(f"| {r.model} | {r.system} | - | - | - | - | {r.note} |")
            continue
        added = r.p50_ms - ref.p50_ms if ref and ref.p50_ms is not None else 0.0
        ratio = r.throughput / ref.throughput if ref and ref.throughput else 0.0
        lines.append(f"| {r.model} | {r.system} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
                     f"{added:+.2f} | {r.throughput:.1f} | {ratio:.1%} |")
    return "\n".join(lines) + "\n"


def main(work: Path, models: list[str], batch: int, clients: int, seconds: float,
         threads: int, triton: bool, rounds: int = 3) -> int:
    work.mkdir(parents=True, exist_ok=True)
    results = run_bench(work, models, batch, clients, seconds, threads, triton, rounds)
    table = markdown(results, batch, clients)
    header = (f"mededge bench serve: {os.cpu_count()} CPUs, ONNX Runtime CPU, "
              f"intra-op threads {threads or 'default'}, {seconds:.0f} s per measurement, "
              f"median of {rounds} interleaved rounds; raw throughput = back-to-back runs\n\n")
    (work / "bench_serve.md").write_text(header + table)
    (work / "bench_serve.json").write_text(json.dumps([r.__dict__ for r in results], indent=1))
    print(header + table)
    print(f"written to {work / 'bench_serve.md'}")
    return 0
