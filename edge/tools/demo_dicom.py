"""``mededge demo-dicom``: push a study to `mededge serve`, get SEG + SR back at a PACS.

Starts Orthanc (``/usr/sbin/Orthanc``, loopback, ephemeral ports) as the destination when it
is installed and ``mededge serve`` with the given model repository, pushes one study's CT
series with dcmtk's ``storescu`` (TCP_NODELAY), waits for the SEG and SR to arrive at Orthanc,
fetches the SEG and writes a PNG overlay of the slice with the most segmented pixels. Prints
the time from the end of the push to each result's arrival. Without Orthanc the results are
read from the service's ``<data-dir>/results`` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

ORTHANC = Path("/usr/sbin/Orthanc")
STORESCU = "/usr/bin/storescu"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, required=True, help="model repository folder")
    parser.add_argument("--study", type=Path, required=True,
                        help="folder of the DICOM files to push (e.g. work/data/study-0000/ct)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--png", type=Path, default=Path("seg_overlay.png"),
                        help="where to write the overlay (default seg_overlay.png)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")
    parser.add_argument("--prometheus", action="store_true",
                        help="also start Debian's Prometheus against the service and show a "
                             "figure it scraped")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http(url: str, data: bytes | None = None) -> Any:
    """GET (or POST ``data``); JSON decoded, DICOM and other bodies as bytes.

    Raises: urllib.error.URLError."""
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as reply:
        body = reply.read()
        return json.loads(body) if "json" in reply.headers.get("Content-Type", "") else body


def start_orthanc(folder: Path, timeout_s: float = 30.0) -> tuple[subprocess.Popen[bytes], int,
                                                                   int]:
    """Start Orthanc; return the process, its DICOM and HTTP ports.

    Raises: RuntimeError (it exited or did not answer)."""
    folder.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = _free_port(), _free_port()
    config = {"Name": "mededge-demo", "DicomAet": "ORTHANC", "DicomPort": dicom_port,
              "HttpPort": http_port, "StorageDirectory": str(folder / "storage"),
              "IndexDirectory": str(folder / "index"), "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True,
              "OverwriteInstances": True, "Plugins": []}
    (folder / "orthanc.json").write_text(json.dumps(config))
    process = subprocess.Popen([str(ORTHANC), str(folder / "orthanc.json")],
                               stdout=(folder / "orthanc.log").open("wb"),
                               stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"},
                               start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited; see {folder / 'orthanc.log'}")
        try:
            _http(f"http://127.0.0.1:{http_port}/system")
            return process, dicom_port, http_port
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("Orthanc did not answer")


def start_serve(repo: Path, data: Path, destination: str | None,
                timeout_s: float) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """Start ``mededge serve`` on ephemeral ports. Raises: RuntimeError (it did not start)."""
    data.mkdir(parents=True, exist_ok=True)
    ports_file = data / "ports.json"
    ports_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "edge.cli", "serve", "--model-repository", str(repo),
               "--data-dir", str(data), "--bind", "127.0.0.1", "--grpc-port", "0",
               "--http-port", "0", "--dicom-port", "0", "--ports-file", str(ports_file)]
    if destination:
        command += ["--destination", destination]
    process = subprocess.Popen(command, stdout=(data / "serve.log").open("wb"),
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while not ports_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"mededge serve did not start; see {data / 'serve.log'}")
        time.sleep(0.1)
    return process, json.loads(ports_file.read_text())


#: storescu's option proposing a compressed transfer syntax as it is (by default storescu
#: proposes only uncompressed ones and converts, which it cannot do for these).
STORESCU_SYNTAX_OPTIONS = {
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless, first-order prediction
}


def storescu_syntax_options(files: list[Path]) -> list[str]:
    """storescu options that send ``files`` in their own transfer syntaxes (a synthetic
    series is written in one; several are combined with ``+C``)."""
    syntaxes = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
                for f in files}
    options = sorted({STORESCU_SYNTAX_OPTIONS[s] for s in syntaxes
                      if s in STORESCU_SYNTAX_OPTIONS})
    return options + ["+C"] if len(options) > 1 else options


def push(files: list[Path], port: int) -> float:
    """Send ``files`` with storescu, each in its own transfer syntax; return the monotonic
    time it finished.

    Raises: RuntimeError (not every file was stored)."""
    if shutil.which(STORESCU) is None:
        raise RuntimeError(f"{STORESCU} is not installed (Debian package dcmtk)")
    sent = subprocess.run([STORESCU, "-v", *storescu_syntax_options(files), "-aec", "MEDEDGE",
                           "127.0.0.1", str(port), *map(str, files)],
                          env={**os.environ, "TCP_NODELAY": "1"},
                          capture_output=True, text=True, check=False)
    done = time.monotonic()
    stored = sent.stderr.count("Received Store Response (Success)")
    if stored != len(files):
        raise RuntimeError(f"storescu stored {stored} of {len(files)} files:\n"
                           f"{sent.stderr[-2000:]}")
    return done


def wait_at_orthanc(http_port: int, study_uid: str, timeout_s: float,
                    pushed_at: float) -> dict[str, tuple[Dataset, float]]:
    """Poll Orthanc until the study has a SEG and an SR; return each with its delay.

    Raises: TimeoutError."""
    base = f"http://127.0.0.1:{http_port}"
    found: dict[str, tuple[Dataset, float]] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(found) < 2:
        for modality in ("SEG", "SR"):
            if modality in found:
                continue
            query = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid,
                                                    "Modality": modality}}
            ids = _http(f"{base}/tools/find", json.dumps(query).encode())
            if ids:
                arrived = time.monotonic() - pushed_at
                body = _http(f"{base}/instances/{ids[0]}/file")
                found[modality] = (pydicom.dcmread(BytesIO(body)), arrived)
        time.sleep(0.05)
    if len(found) < 2:
        raise TimeoutError(f"only {sorted(found)} arrived within {timeout_s:.0f} s")
    return found


def overlay_png(seg: Dataset, sources: dict[str, Path], png: Path) -> str:
    """Draw the source slice with the most segmented pixels and the SEG's mask over it; return
    that slice's SOP Instance UID.

    Raises: ValueError (the SEG has no frames that reference a pushed instance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    by_source: dict[str, np.ndarray] = {}
    for index, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = str(group.DerivationImageSequence[0].SourceImageSequence[0]
                  .ReferencedSOPInstanceUID)
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        if uid in sources:
            label = by_source.setdefault(uid, np.zeros(frames.shape[1:], np.uint8))
            label[frames[index] > 0] = segment
    if not by_source:
        raise ValueError("the SEG references none of the pushed instances")
    uid = max(by_source, key=lambda k: int(np.count_nonzero(by_source[k])))
    source = pydicom.dcmread(sources[uid])
    hu = source.pixel_array * float(getattr(source, "RescaleSlope", 1)) + \
        float(getattr(source, "RescaleIntercept", 0))
    labels = np.ma.masked_equal(by_source[uid], 0)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    ax.imshow(hu, cmap="gray", vmin=-1350, vmax=150)
    ax.imshow(labels, cmap="autumn", alpha=0.45, interpolation="nearest")
    names = ", ".join(str(s.SegmentLabel) for s in seg.SegmentSequence)
    ax.set_title(f"SEG {names} on instance {source.get('InstanceNumber', '?')}")
    ax.axis("off")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, bbox_inches="tight")
    plt.close(fig)
    return uid


def infer_over_grpc(repo: Path, grpc_port: int, dicom_file: Path) -> None:
    """Run ``mededge infer`` (tritonclient over KServe v2 gRPC) with every model in ``repo``."""
    for model_dir in sorted(p for p in repo.iterdir() if (p / "config.pbtxt").is_file()):
        command = [sys.executable, "-m", "edge.cli", "infer", "--url",
                   f"127.0.0.1:{grpc_port}", "--model", model_dir.name, str(dicom_file)]
        reply = subprocess.run(command, capture_output=True, text=True, timeout=120)
        print(f"$ mededge infer --model {model_dir.name} {dicom_file.name}")
        print((reply.stdout or reply.stderr).rstrip())


def show_scraped_figure(work: Path, http_port: int, timeout_s: float) -> None:
    """Start Prometheus against the service and print what it scraped.

    Raises: RuntimeError, TimeoutError (Prometheus missing, not ready, or no samples)."""
    from edge.tools.demo_prometheus import start_prometheus

    prometheus = start_prometheus(work, http_port)
    try:
        expression = '{__name__=~"mededge_instances_received(_total)?"}'
        for labels, value in prometheus.wait_for(expression, timeout_s):
            name = labels.pop("__name__", "?")
            shown = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            print(f"Prometheus scraped {name}{{{shown}}} = {value:g}")
    finally:
        prometheus.stop()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def run(args: argparse.Namespace) -> int:
    files = sorted(p for p in args.study.iterdir() if p.is_file())
    if not files:
        print(f"mededge demo-dicom: no files in {args.study}", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="mededge-demo-"))
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    orthanc = None
    try:
        t0 = time.monotonic()
        if ORTHANC.exists():
            orthanc, pacs_dicom, pacs_http = start_orthanc(work / "orthanc")
            destination = f"ORTHANC@127.0.0.1:{pacs_dicom}"
        else:
            print("Orthanc is not installed: results stay in the service's data folder")
            destination = None
        serve, ports = start_serve(args.repo, work / "data", destination, args.timeout)
        try:
            print(f"started Orthanc + mededge serve in {time.monotonic() - t0:.1f} s "
                  f"(DICOM port {ports['dicom']})")
            infer_over_grpc(args.repo, ports["grpc"], files[len(files) // 2])
            start = time.monotonic()
            pushed = push(files, ports["dicom"])
            print(f"pushed {len(files)} instances in {pushed - start:.2f} s")
            if orthanc is not None:
                results = wait_at_orthanc(pacs_http, study_uid, args.timeout, pushed)
                for modality, (_, delay) in sorted(results.items()):
                    print(f"{modality} at Orthanc {delay:.2f} s after the last C-STORE response")
                seg = results["SEG"][0]
            else:
                deadline = time.monotonic() + args.timeout
                while not list((work / "data" / "results").rglob("seg-*.dcm")):
                    if time.monotonic() > deadline:
                        raise TimeoutError("no SEG was written")
                    time.sleep(0.05)
                seg = pydicom.dcmread(next((work / "data" / "results").rglob("seg-*.dcm")))
                print(f"SEG written {time.monotonic() - pushed:.2f} s after the push")
            uid = overlay_png(seg, sources, args.png)
            print(f"overlay of instance {uid} written to {args.png}")
            if args.prometheus:
                show_scraped_figure(work / "prometheus", ports["http"], args.timeout)
        finally:
            _stop(serve)
    except (RuntimeError, TimeoutError, ValueError, OSError) as exc:
        print(f"mededge demo-dicom: {exc}", file=sys.stderr)
        return 1
    finally:
        if orthanc is not None:
            _stop(orthanc)
    return 0
