"""No patient identifiers in logs or metrics: a study with distinctive Patient's Name, Patient
ID and Accession Number goes through the real service (`mededge -v serve` with DEBUG logging,
dcmtk's storescu in, results out to dcmtk's storescp, the mededge.v1 jobs API, a rejected
association and a refused instance on the way), then every log line and the whole /metrics page
are searched for those values: none may appear."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from dicom_models import build_repository

STORESCU, STORESCP = Path("/usr/bin/storescu"), Path("/usr/bin/storescp")
MEDEDGE = Path(sys.executable).with_name("mededge")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
PATIENT_NAME, PATIENT_ID = "ZZTOPSECRET^PATIENT", "PID-987654321"
ACCESSION, BIRTH_DATE = "ACC55501234", "19230704"
#: What must never appear (the name's components too: a log could print them apart).
SECRETS = (PATIENT_NAME, "ZZTOPSECRET", PATIENT_ID, "987654321", ACCESSION)
pytestmark = pytest.mark.skipif(not (STORESCU.exists() and STORESCP.exists()),
                                reason="dcmtk (storescu, storescp) is not installed")


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait(predicate, what: str, timeout_s: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The e2e models and one synthetic chest CT series carrying the identifiers above."""
    root = tmp_path_factory.mktemp("phi")
    build_repository(root / "repo", root)
    subprocess.run([str(MEDEDGE), "synth", "--out", str(root / "synth"), "--studies", "1",
                    "--seed", "5", "--size", "64", "--slices-min", "8", "--slices-max", "8",
                    "--compressed-fraction", "0", "--quiet"], check=True, capture_output=True)
    files = sorted((root / "synth").glob("study-*/ct/*.dcm"))
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
        ds.AccessionNumber, ds.PatientBirthDate = ACCESSION, BIRTH_DATE
        ds.save_as(path)
    return root, files


@pytest.fixture(scope="module")
def storescp(study: tuple[Path, list[Path]]) -> Iterator[int]:
    out, port = study[0] / "pacs", free_port()
    out.mkdir()
    process = subprocess.Popen([str(STORESCP), "-od", str(out), str(port)], env=DCMTK_ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               preexec_fn=_die_with_parent)

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait(listening, "storescp", 10)
    yield port
    process.terminate()
    process.wait(10)


def metrics(http_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as page:
        return str(page.read().decode())


def get_job(grpc_port: int, series_uid: str) -> str:
    import grpc

    from edge.protos.mededge.v1 import jobs_pb2, jobs_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = jobs_pb2_grpc.DicomJobsStub(channel)
        job = stub.GetJob(jobs_pb2.GetJobRequest(series_instance_uid=series_uid), timeout=10)
        listed = stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=10)
    return str(job) + str(listed)


def test_no_patient_identifiers_in_logs_or_metrics(study: tuple[Path, list[Path]],
                                                   storescp: int) -> None:
    root, files = study
    data, log = root / "data", root / "serve.log"
    data.mkdir()
    process = subprocess.Popen(
        [str(MEDEDGE), "-v", "serve", "--model-repository", str(root / "repo"),
         "--data-dir", str(data), "--bind", "127.0.0.1", "--grpc-port", "0", "--http-port", "0",
         "--dicom-port", "0", "--destination", f"PACS@127.0.0.1:{storescp}",
         "--ports-file", str(data / "ports.json")],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
        env={**os.environ, "MEDEDGE_SPOOL__MIN_FREE_BYTES": "0",
             "MEDEDGE_PIPELINE__QUIET_PERIOD_S": "0.3", "PYTHONUNBUFFERED": "1"})
    try:
        wait(lambda: (data / "ports.json").exists() or process.poll() is not None, "serve")
        assert process.poll() is None, log.read_text()[-3000:]
        ports = json.loads((data / "ports.json").read_text())
        sent = subprocess.run([str(STORESCU), "-v", "-aec", "MEDEDGE", "127.0.0.1",
                               str(ports["dicom"]), *map(str, files)], env=DCMTK_ENV,
                              capture_output=True, text=True, timeout=60)
        assert sent.stderr.count("Store Response (Success)") == len(files), sent.stderr
        # a refused association and a refused instance (a CT without its SOP Instance UID)
        subprocess.run([str(STORESCU), "-aec", "NOTMEDEDGE", "127.0.0.1", str(ports["dicom"]),
                        str(files[0])], env=DCMTK_ENV, capture_output=True, timeout=30)
        broken = pydicom.dcmread(files[0])
        broken.SeriesInstanceUID = "not a uid " + PATIENT_NAME
        broken.save_as(root / "broken.dcm")
        subprocess.run([str(STORESCU), "-aec", "MEDEDGE", "127.0.0.1", str(ports["dicom"]),
                        str(root / "broken.dcm")], env=DCMTK_ENV, capture_output=True,
                       timeout=30)
        wait(lambda: 'mededge_deliveries_total{outcome="done"} 2.0' in metrics(ports["http"]),
             "SEG and SR delivered")
        series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        job = get_job(ports["grpc"], series_uid)
        page = metrics(ports["http"])
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    text = log.read_text()
    assert "DEBUG" in text, "the service did not log at DEBUG: the test proves nothing"
    assert series_uid in job  # the jobs API answers for the series (by UID, not by patient)
    for secret in SECRETS:
        lines = [line for line in text.splitlines() if secret in line]
        assert not lines, f"{secret!r} in the log:\n" + "\n".join(lines[:5])
        assert secret not in page, f"{secret!r} on /metrics"
        assert secret not in job, f"{secret!r} in the jobs API answer"
