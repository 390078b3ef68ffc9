"""``mededge bench dicom``: durable DICOM receive vs dcmtk storescp, Orthanc, bare pynetdicom.

The same generated CT files are sent by dcmtk's ``storescu`` (``TCP_NODELAY=1``) over 1 and
over N parallel associations to each receiver, started fresh as a subprocess for every
measurement (so nothing is a repeat). Rounds alternate the receivers; medians are reported.
CPU per image is the receiver process's utime+stime (+ reaped children) from /proc.

- ``storescp``: dcmtk, writes files, no fsync (the ceiling); ``--fork`` for parallel streams.
- ``orthanc``: Orthanc with its defaults (SyncStorageArea: fsync'd storage, SQLite index).
- ``pynetdicom``: a bare SCP writing ``encoded_dataset()`` with one fsync (the field notes).
- ``mededge``: :class:`DicomListener` with the durable spool and the ledger.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

SYSTEMS = ("storescp", "orthanc", "pynetdicom", "mededge")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
SUCCESS = re.compile(r"Received Store Response \(Success\)")
REPO = Path(__file__).resolve().parents[2]

BARE_SCP = """
import os, socket, sys, time
from pynetdicom import AE, evt, AllStoragePresentationContexts
out = sys.argv[1]
def nodelay(event):
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def store(event):
    fd = os.open(os.path.join(out, event.request.AffectedSOPInstanceUID),
                 os.O_WRONLY | os.O_CREAT, 0o640)
    os.write(fd, event.encoded_dataset())
    os.fsync(fd)
    os.close(fd)
    return 0
ae = AE(ae_title="BARE")
ae.maximum_pdu_size = 131072
ae.supported_contexts = AllStoragePresentationContexts
ae.start_server(("127.0.0.1", int(sys.argv[2])), block=False,
                evt_handlers=[(evt.EVT_C_STORE, store), (evt.EVT_CONN_OPEN, nodelay)])
time.sleep(86400)
"""

MEDEDGE_SCP = """
import sys, time
from pathlib import Path
from edge.core.config import load_settings
from edge.ingest.listener import DicomListener
from edge.jobs.ledger import Ledger
from edge.jobs.reconcile import reconcile
base = Path(sys.argv[1])
settings = load_settings(environ={}, overrides={
    "server": {"data_dir": str(base)},
    "dicom": {"bind": "127.0.0.1", "port": int(sys.argv[2]), "ae_title": "MEDEDGE"},
    "spool": {"dir": str(base / "spool"), "min_free_bytes": 0}})
ledger = Ledger(base / "ledger.sqlite3")
listener = DicomListener(settings, ledger, lambda closed: None)
reconcile(listener.spool, ledger)
listener.start()
time.sleep(86400)
"""


@dataclass(frozen=True)
class Measurement:
    system: str
    streams: int
    images_per_s: float
    cpu_ms_per_image: float


@dataclass(frozen=True)
class Row:
    """Medians over the rounds for one receiver and stream count."""

    system: str
    streams: int
    images_per_s: float
    cpu_ms_per_image: float
    vs_storescp: float | None


def generate(out: Path, count: int, size: int = 512) -> list[Path]:
    """Write ``count`` uncompressed CT images of ``size``² (one series) to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.normal(0, 200, (size, size)).astype(np.int16)
    study, series = generate_uid(), generate_uid()
    paths = []
    for number in range(count):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.PatientName, ds.PatientID, ds.InstanceNumber = "BENCH^CT", "BENCH", number + 1
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.roll(base, number, axis=0).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out / f"ct{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout_s} s")


def _cpu_s(pid: int) -> float:
    """utime + stime + reaped children's, in seconds (proc(5) fields 14-17)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _receiver(system: str, out: Path, port: int, streams: int) -> tuple[list[str], str]:
    """(argv, called AE title) of a receiver writing under ``out``."""
    if system == "storescp":
        fork = ["--fork"] if streams > 1 else []
        return ["/usr/bin/storescp", *fork, "-pdu", "131072", "-od", str(out), str(port)], "ANY"
    if system == "orthanc":
        config = out / "orthanc.json"
        config.write_text(json.dumps({
            "Name": "bench", "StorageDirectory": str(out), "IndexDirectory": str(out),
            "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": _free_port(),
            "RemoteAccessAllowed": False, "DicomCheckCalledAet": False, "Plugins": [],
            "ConcurrentJobs": 1}))
        return ["/usr/sbin/Orthanc", str(config)], "ORTHANC"
    if system == "pynetdicom":
        return [sys.executable, "-c", BARE_SCP, str(out), str(port)], "BARE"
    return [sys.executable, "-c", MEDEDGE_SCP, str(out), str(port)], "MEDEDGE"


def _send(files: list[Path], port: int, aet: str, streams: int) -> tuple[float, int]:
    """Seconds to store ``files`` over ``streams`` storescu processes; successes counted."""
    chunks = [files[i::streams] for i in range(streams)]
    start = time.perf_counter()
    procs = [subprocess.Popen(["/usr/bin/storescu", "-v", "-aec", aet, "127.0.0.1", str(port),
                               *map(str, chunk)], env=DCMTK_ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for chunk in chunks]
    outputs = [proc.communicate()[0] for proc in procs]
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(SUCCESS.findall(text)) for text in outputs)


def measure(system: str, files: list[Path], work: Path, streams: int) -> Measurement:
    """Start ``system`` fresh, send ``files``, stop it.

    Raises:
        RuntimeError: the receiver did not start, or not every store succeeded.
    """
    out = work / f"{system}-{streams}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = _free_port()
    argv, aet = _receiver(system, out, port, streams)
    proc = subprocess.Popen(argv, env=DCMTK_ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc)
        cpu0 = _cpu_s(proc.pid)
        elapsed, stored = _send(files, port, aet, streams)
        time.sleep(0.05)  # let a forked storescp child be reaped
        cpu = _cpu_s(proc.pid) - cpu0
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(out, ignore_errors=True)
    if stored != len(files):
        raise RuntimeError(f"{system}: {stored} of {len(files)} stores succeeded")
    return Measurement(system, streams, len(files) / elapsed, cpu * 1000 / len(files))


def summarise(results: list[Measurement]) -> list[Row]:
    """Median per (system, streams), with the ratio to storescp's median at that stream count."""
    keys = list(dict.fromkeys((m.system, m.streams) for m in results))

    def med(system: str, streams: int, field: str) -> float:
        return float(statistics.median(getattr(m, field) for m in results
                                       if (m.system, m.streams) == (system, streams)))

    rows = []
    for system, streams in sorted(keys, key=lambda k: (k[1], SYSTEMS.index(k[0]))):
        rate = med(system, streams, "images_per_s")
        ceiling = med("storescp", streams, "images_per_s") if ("storescp", streams) in keys \
            else None
        rows.append(Row(system, streams, rate, med(system, streams, "cpu_ms_per_image"),
                        rate / ceiling if ceiling else None))
    return rows


def table(rows: list[Row], images: int, size: int, rounds: int) -> str:
    lines = [f"{images} CT {size}x{size} per run, dcmtk storescu (TCP_NODELAY=1), loopback, "
             f"medians of {rounds} alternating rounds", "",
             "| Receiver | associations | images/s | CPU ms/image | vs storescp |",
             "|---|---|---|---|---|"]
    for row in rows:
        ratio = f"{row.vs_storescp:.2f}" if row.vs_storescp is not None else "-"
        lines.append(f"| {row.system} | {row.streams} | {row.images_per_s:.0f} | "
                     f"{row.cpu_ms_per_image:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(work: Path, images: int, rounds: int, systems: list[str], streams: list[int],
         size: int = 512) -> int:
    """Run the benchmark; print the table and write it to ``work/bench_dicom.md``."""
    work.mkdir(parents=True, exist_ok=True)
    files = generate(work / f"images-{images}-{size}", images, size)
    results: list[Measurement] = []
    for round_ in range(rounds):
        order = systems[round_ % len(systems):] + systems[:round_ % len(systems)]
        for count in streams:
            for system in order:
                result = measure(system, files, work / "recv", count)
                print(f"round {round_ + 1}: {system} x{count}: {result.images_per_s:.0f} "
                      f"images/s, {result.cpu_ms_per_image:.2f} ms CPU/image", flush=True)
                results.append(result)
    text = table(summarise(results), images, size, rounds)
    (work / "bench_dicom.md").write_text(text)
    print(text)
    return 0
