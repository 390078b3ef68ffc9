"""``mededge bench ttr``: time to result, from the last C-STORE response to the SEG at the PACS.

K synthetic chest CT series (``mededge synth``, N slices of S x S) are pushed one after another
with dcmtk's ``storescu`` (``TCP_NODELAY=1``) to a fresh ``mededge serve`` running the tiny
chest models of :mod:`edge.tools.chest_models`, with Orthanc as the destination. For each
series the clock starts when storescu prints the last ``Received Store Response`` and stops
when Orthanc's ``/tools/lookup`` first finds the SEG (and the SR), polled every 10 ms.

The reference measured in the same run is the **last slice's compute**: reading, decoding and
preprocessing the series' last file and running both models on it with ONNX Runtime (one
thread), in this process. The design's bar is "about a second plus the last slice's compute".
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom

from edge.core.types import ModelId
from edge.tools.chest_models import SPEC, build_repository
from edge.tools.demo_dicom import start_orthanc
from edge.writers.uids import result_uid

STORESCU = "/usr/bin/storescu"
SEG_MODEL = ModelId("lung_seg", 1)
_POLL_S = 0.01


@dataclass(frozen=True)
class SeriesTiming:
    """One series: seconds from the last C-STORE response to the SEG / SR found at the PACS."""

    series_instance_uid: str
    slices: int
    push_s: float
    seg_s: float
    sr_s: float
    last_slice_compute_s: float


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0-100), linear interpolation (numpy's default)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def make_series(out: Path, count: int, slices: int, size: int) -> list[list[Path]]:
    """K synthetic chest CT series (reused when already made). Raises: CalledProcessError."""
    if not out.exists():
        subprocess.run([sys.executable, "-m", "edge.cli", "synth", "--out", str(out),
                        "--studies", str(count), "--seed", "7", "--size", str(size),
                        "--slices-min", str(slices), "--slices-max", str(slices),
                        "--max-nodules", "1", "--compressed-fraction", "0", "--quiet"],
                       check=True, capture_output=True)
    return [sorted((out / f"study-{i:04d}" / "ct").glob("*.dcm")) for i in range(count)]


def last_slice_compute(path: Path, repo: Path) -> float:
    """Seconds to read, decode, preprocess one file and run both chest models on it."""
    import onnxruntime as ort

    from edge.preprocess.dicom_pixels import decode
    from edge.preprocess.imaging import preprocess_image

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(str(repo / name / "1" / "model.onnx"), options,
                                     providers=["CPUExecutionProvider"])
                for name in ("lung_seg", "nodule_cls")]
    best = float("inf")
    for _ in range(3):  # the best of 3: the server has its sessions warm too
        start = time.perf_counter()
        ds = pydicom.dcmread(path)
        decoded = decode(ds, str(ds.SOPInstanceUID))
        x = preprocess_image(decoded.frames[0], decoded.meta, SPEC)[np.newaxis]
        for session in sessions:
            session.run(None, {"image": x.astype(np.float32)})
        best = min(best, time.perf_counter() - start)
    return best


def push(files: list[Path], port: int) -> tuple[float, float]:
    """Send with storescu; (monotonic start, monotonic time of the last store response).

    Raises: RuntimeError (not every file was stored)."""
    start = time.monotonic()
    proc = subprocess.Popen([STORESCU, "-v", "-aec", "MEDEDGE", "127.0.0.1", str(port),
                             *map(str, files)], env={**os.environ, "TCP_NODELAY": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    stored, last = 0, start
    for line in proc.stderr:
        if "Received Store Response (Success)" in line:
            stored, last = stored + 1, time.monotonic()
    proc.wait()
    if stored != len(files):
        raise RuntimeError(f"storescu stored {stored} of {len(files)} files")
    return start, last


def _found(http_port: int, uid: str) -> bool:
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/tools/lookup",
                                     data=uid.encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as reply:
        return any(f.get("Type") == "Instance" for f in json.loads(reply.read()))


def wait_results(http_port: int, series_uid: str, since: float, timeout_s: float
                 ) -> tuple[float, float]:
    """Seconds after ``since`` at which the SEG and the SR were first found at Orthanc.

    Raises: TimeoutError."""
    wanted = {"seg": result_uid(series_uid, SEG_MODEL, "seg"),
              "sr": result_uid(series_uid, SEG_MODEL, "sr")}
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < 2:
        if time.monotonic() > deadline:
            raise TimeoutError(f"series {series_uid}: only {sorted(seen)} at the PACS")
        for kind, uid in wanted.items():
            if kind not in seen and _found(http_port, uid):
                seen[kind] = time.monotonic() - since
        time.sleep(_POLL_S)
    return seen["seg"], seen["sr"]


def start_serve(repo: Path, data: Path, destination: str, quiet_period_s: float | None,
                timeout_s: float = 120.0) -> tuple[subprocess.Popen[bytes], int]:
    """``mededge serve`` on ephemeral ports; (process, DICOM port). Raises: RuntimeError."""
    data.mkdir(parents=True, exist_ok=True)
    ports = data / "ports.json"
    ports.unlink(missing_ok=True)
    env = {**os.environ, "MEDEDGE_SPOOL__MIN_FREE_BYTES": "0"}
    if quiet_period_s is not None:
        env["MEDEDGE_PIPELINE__QUIET_PERIOD_S"] = str(quiet_period_s)
    process = subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "serve", "--model-repository", str(repo),
         "--data-dir", str(data), "--bind", "127.0.0.1", "--grpc-port", "0", "--http-port", "0",
         "--dicom-port", "0", "--destination", destination, "--ports-file", str(ports)],
        stdout=(data / "serve.log").open("wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout_s
    while not ports.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"mededge serve did not start; see {data / 'serve.log'}")
        time.sleep(0.05)
    return process, int(json.loads(ports.read_text())["dicom"])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def table(timings: list[SeriesTiming], size: int, quiet_period_s: float | None) -> str:
    seg = [t.seg_s for t in timings]
    sr = [t.sr_s for t in timings]
    compute = statistics.median(t.last_slice_compute_s for t in timings)
    slices = timings[0].slices
    quiet = "service default" if quiet_period_s is None else f"{quiet_period_s:g} s"
    lines = [f"{len(timings)} series of {slices} CT slices {size}x{size}, pushed one after "
             f"another with dcmtk storescu (TCP_NODELAY=1); Orthanc as the PACS; quiet period "
             f"{quiet}", "",
             "| Time from the last C-STORE response to | p50 s | p99 s | max s |",
             "|---|---|---|---|",
             f"| SEG at the PACS | {percentile(seg, 50):.3f} | {percentile(seg, 99):.3f} | "
             f"{max(seg):.3f} |",
             f"| SR at the PACS | {percentile(sr, 50):.3f} | {percentile(sr, 99):.3f} | "
             f"{max(sr):.3f} |", "",
             f"Last slice's compute (read + decode + preprocess + both models, ONNX Runtime, "
             f"1 thread, median over the series): {compute * 1000:.1f} ms",
             f"SEG p50 minus that compute: {percentile(seg, 50) - compute:.3f} s",
             f"Push (storescu, whole series) p50: "
             f"{statistics.median(t.push_s for t in timings):.2f} s"]
    return "\n".join(lines) + "\n"


def main(work: Path, series: int, slices: int, size: int,
         quiet_period_s: float | None = None, timeout_s: float = 120.0) -> int:
    """Run the bench; print the table, write ``bench_ttr.md`` and ``bench_ttr.json`` to
    ``work``. Raises: RuntimeError, TimeoutError, CalledProcessError."""
    work.mkdir(parents=True, exist_ok=True)
    repo = work / "repo"
    if not (repo / "lung_seg").exists():
        build_repository(repo, work)
    studies = make_series(work / f"series-{series}x{slices}-{size}", series, slices, size)
    run = work / f"run-{time.time_ns()}"
    orthanc, pacs_dicom, pacs_http = start_orthanc(run / "orthanc")
    timings: list[SeriesTiming] = []
    try:
        serve, port = start_serve(repo, run / "data", f"ORTHANC@127.0.0.1:{pacs_dicom}",
                                  quiet_period_s)
        try:
            for files in studies:
                uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
                start, last = push(files, port)
                seg_s, sr_s = wait_results(pacs_http, uid, last, timeout_s)
                timing = SeriesTiming(uid, len(files), last - start, seg_s, sr_s,
                                      last_slice_compute(files[-1], repo))
                print(f"series {len(timings) + 1}/{len(studies)}: SEG {seg_s:.3f} s, "
                      f"SR {sr_s:.3f} s after the last C-STORE response", flush=True)
                timings.append(timing)
        finally:
            _stop(serve)
    finally:
        _stop(orthanc)
    text = table(timings, size, quiet_period_s)
    (work / "bench_ttr.md").write_text(text)
    (work / "bench_ttr.json").write_text(json.dumps([asdict(t) for t in timings], indent=2))
    print(text)
    return 0
