"""``mededge.v1.DicomJobs`` on a real in-process server (gRPC, DICOM path) and a real client.

A synthetic chest CT series submitted over the stream comes back as WRITTEN then DELIVERED
events for its SEG and SR at the Orthanc fixture, GetJob shows the deliveries and ListJobs
lists the job; a hostile UID gets A900 and writes nothing outside the spool; a destination
that is down leaves the deliveries failed (retried) with their attempts and last error; a spool
file whose ledger row was lost is recorded and processed again after a restart.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import grpc
import pydicom
import pytest
from dicom_models import build_repository
from orthanc import Orthanc, free_port

from edge.api.server import EdgeServer
from edge.core.config import load_settings
from edge.protos.mededge.v1 import jobs_pb2, jobs_pb2_grpc

MEDEDGE = Path(sys.executable).with_name("mededge")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("jobs")
    build_repository(root / "repo", root)
    subprocess.run([str(MEDEDGE), "synth", "--out", str(root / "synth"), "--studies", "2",
                    "--seed", "5", "--size", "64", "--slices-min", "6", "--slices-max", "6",
                    "--compressed-fraction", "0", "--quiet"], check=True, capture_output=True)
    return root


def series_files(work: Path, study: int) -> list[Path]:
    return sorted((work / "synth" / f"study-{study:04d}" / "ct").glob("*.dcm"))


def start_server(work: Path, data: Path, destination: str) -> EdgeServer:
    settings = load_settings(None, {
        "server": {"model_repository": str(work / "repo"), "data_dir": str(data),
                   "bind": "127.0.0.1", "grpc_port": 0, "http_port": 0},
        "dicom": {"port": 0},
        "spool": {"min_free_bytes": 0},
        "pipeline": {"destinations": [destination], "quiet_period_s": 0.2,
                     "resume_grace_s": 0.2},
        "dispatch": {"retry_initial_s": 30.0, "connection_timeout_s": 1.0},
    }, environ={})
    server = EdgeServer(settings, dicom=True)
    server.start()
    return server


def stub(server: EdgeServer) -> jobs_pb2_grpc.DicomJobsStub:
    assert server.ports is not None
    channel = grpc.insecure_channel(f"127.0.0.1:{server.ports.grpc}")
    return jobs_pb2_grpc.DicomJobsStub(channel)


def submit(client: jobs_pb2_grpc.DicomJobsStub, files: list[bytes]) -> jobs_pb2.SubmitSummary:
    return client.SubmitInstances(
        iter([jobs_pb2.SubmitInstanceRequest(dicom_file=f, calling_ae="TESTSCU") for f in files]),
        timeout=30)


def wait_job(client: jobs_pb2_grpc.DicomJobsStub, series: str, ok, timeout_s: float = 30
             ) -> jobs_pb2.JobStatus:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            job = client.GetJob(jobs_pb2.GetJobRequest(series_instance_uid=series), timeout=10)
            if ok(job):
                return job
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.NOT_FOUND:
                raise
            job = None
        assert time.monotonic() < deadline, f"job not as expected in time: {job}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pacs_server(work: Path, orthanc: Orthanc) -> Iterator[EdgeServer]:
    server = start_server(work, work / "data-pacs", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
    try:
        yield server
    finally:
        server.stop(5)


def test_submitted_series_is_watched_to_the_pacs_and_listed(work: Path,
                                                            pacs_server: EdgeServer) -> None:
    files = series_files(work, 0)
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    client = stub(pacs_server)
    events: list[jobs_pb2.ResultEvent] = []
    watch = client.WatchResults(jobs_pb2.WatchRequest(series_instance_uid=series), timeout=60)

    def collect() -> None:
        try:
            for event in watch:
                events.append(event)
                if sum(e.state == jobs_pb2.ResultEvent.DELIVERED for e in events) == 2:
                    return
        except grpc.RpcError:
            return  # cancelled below on failure

    reader = threading.Thread(target=collect)
    reader.start()
    deadline = time.monotonic() + 5
    while pacs_server.orchestrator.feed.subscribers == 0:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "WatchResults did not subscribe"
        time.sleep(0.01)
    summary = submit(client, [f.read_bytes() for f in files])
    assert [o.status for o in summary.instances] == [0] * len(files), summary
    assert summary.stored == len(files) and summary.failed == 0
    reader.join(30)
    watch.cancel()
    states = sorted((e.kind, jobs_pb2.ResultEvent.State.Name(e.state)) for e in events)
    assert states == [("seg", "DELIVERED"), ("seg", "WRITTEN"), ("sr", "DELIVERED"),
                      ("sr", "WRITTEN")], events
    seg = next(e for e in events if e.kind == "seg")
    sr = next(e for e in events if e.kind == "sr")
    assert seg.model == "lung_seg" and seg.version == 1 and "lung" in seg.volumes_ml
    assert sr.has_classification and 0.0 <= sr.probability <= 1.0
    deadline = time.monotonic() + 5  # the cancelled stream unsubscribes
    while pacs_server.orchestrator.feed.subscribers:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the cancelled stream is still subscribed"
        time.sleep(0.02)

    job = wait_job(client, series, lambda j: j.state == "done"
                   and len(j.deliveries) == 2 and all(d.state == "done" for d in j.deliveries))
    assert job.instances_received == len(files)
    assert sorted(d.kind for d in job.deliveries) == ["seg", "sr"]
    assert all(d.attempts == 1 for d in job.deliveries)
    assert {r.kind for r in job.results} == {"seg", "sr"}
    assert [r.state for r in job.runs if not r.sop_instance_uid] == ["done"]

    listed = client.ListJobs(jobs_pb2.ListJobsRequest(state="done", limit=10), timeout=10)
    assert series in [j.series_instance_uid for j in listed.jobs]
    assert not listed.jobs[0].deliveries  # details only on request
    later = client.ListJobs(jobs_pb2.ListJobsRequest(since_unix_s=time.time() + 60), timeout=10)
    assert not later.jobs


def test_bad_submissions_get_statuses_and_codes(work: Path, pacs_server: EdgeServer) -> None:
    client = stub(pacs_server)
    ds = pydicom.dcmread(series_files(work, 1)[0])
    ds.SOPInstanceUID = "../../../../tmp/escaped"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    hostile = BytesIO()
    ds.save_as(hostile, enforce_file_format=True)
    summary = submit(client, [hostile.getvalue(), b"not dicom at all" * 20])
    assert [o.status for o in summary.instances] == [0xA900, 0xC000], summary
    assert "SOPInstanceUID" in summary.instances[0].message
    assert "DICM" in summary.instances[1].message
    spool = pacs_server.listener.spool.root  # type: ignore[union-attr]
    assert not list(spool.parent.parent.rglob("*escaped*")) and not Path("/tmp/escaped").exists()

    with pytest.raises(grpc.RpcError) as empty:
        submit(client, [b""])
    assert empty.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "dicom_file" in empty.value.details()
    with pytest.raises(grpc.RpcError) as unknown:
        client.GetJob(jobs_pb2.GetJobRequest(series_instance_uid="1.2.3.4"), timeout=10)
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as state:
        client.ListJobs(jobs_pb2.ListJobsRequest(state="nonsense"), timeout=10)
    assert state.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "state" in \
        state.value.details()


def test_pacs_down_then_a_lost_ledger_row_is_recovered_at_restart(work: Path) -> None:
    files = series_files(work, 1)
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    data = work / "data-down"
    destination = f"DOWN@127.0.0.1:{free_port()}"  # nothing listens there
    server = start_server(work, data, destination)
    try:
        client = stub(server)
        assert submit(client, [f.read_bytes() for f in files]).stored == len(files)
        job = wait_job(client, series, lambda j: len(j.deliveries) == 2 and all(
            d.state == "failed" and d.attempts >= 1 for d in j.deliveries))
        assert all(destination in d.destination and d.last_error for d in job.deliveries)
    finally:
        server.stop(5)

    lost = str(pydicom.dcmread(files[-1], stop_before_pixels=True).SOPInstanceUID)
    with sqlite3.connect(data / "ledger.sqlite3") as db:  # what power loss could take
        db.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (lost,))
    server = start_server(work, data, destination)
    try:
        client = stub(server)
        wait_job(client, series, lambda j: j.state == "done")
        ledger = server.ledger
        assert ledger is not None
        deadline = time.monotonic() + 15
        while (record := ledger.instance(lost)) is None or record.state.value != "done":
            assert time.monotonic() < deadline, f"the recovered instance is {record}"
            time.sleep(0.05)
    finally:
        server.stop(5)
