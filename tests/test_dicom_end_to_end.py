"""The DICOM path end to end: `mededge serve` as a subprocess, real dcmtk / pynetdicom SCUs,
a real Orthanc PACS, ONNX models built in the test.

- a synthetic chest CT series pushed with dcmtk's storescu comes back from Orthanc as one SEG
  and one SR (deterministic UIDs), and /metrics reports the time to result;
- kill -9 in the middle of a series: every acknowledged instance is processed after a restart
  and the SEG/SR reach the PACS once;
- the files shipped in pydicom's test data (compressed, big endian, truncated, bad VR, no meta
  header, non-image objects) never stop the server, every sent file gets a DIMSE status and
  every accepted instance a result or a recorded reason.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from dicom_models import build_repository
from orthanc import Orthanc

from edge.core.types import ModelId
from edge.writers.uids import result_uid

STORESCU = Path("/usr/bin/storescu")
MEDEDGE = Path(sys.executable).with_name("mededge")
SEG_MODEL, CLS_MODEL = ModelId("lung_seg", 1), ModelId("nodule_cls", 1)
pytestmark = pytest.mark.skipif(not STORESCU.exists(), reason="dcmtk's storescu is not installed")


@dataclass
class Serve:
    """A `mededge serve` subprocess on ephemeral ports."""

    process: subprocess.Popen[bytes]
    ports: dict[str, int]
    log: Path

    @classmethod
    def start(cls, repo: Path, data: Path, destination: str, timeout_s: float = 60,
              **env: str) -> Serve:
        data.mkdir(parents=True, exist_ok=True)
        ports_file = data / "ports.json"
        ports_file.unlink(missing_ok=True)
        log = data / f"serve-{time.monotonic_ns()}.log"
        process = subprocess.Popen(
            [str(MEDEDGE), "serve", "--model-repository", str(repo), "--data-dir", str(data),
             "--bind", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--dicom-port", "0",
             "--destination", destination, "--ports-file", str(ports_file)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT,
            env={**os.environ, "MEDEDGE_SPOOL__MIN_FREE_BYTES": "0",
                 "MEDEDGE_PIPELINE__QUIET_PERIOD_S": "0.3",
                 "MEDEDGE_DISPATCH__RETRY_INITIAL_S": "0.5", **env})
        deadline = time.monotonic() + timeout_s
        while not ports_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"mededge serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        return cls(process, json.loads(ports_file.read_text()), log)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.ports['http']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository and two synthetic chest CT studies (64x64, 10-12 slices)."""
    root = tmp_path_factory.mktemp("dicom-e2e")
    build_repository(root / "repo", root)
    subprocess.run([str(MEDEDGE), "synth", "--out", str(root / "synth"), "--studies", "3",
                    "--seed", "11", "--size", "64", "--slices-min", "10", "--slices-max", "12",
                    "--compressed-fraction", "0", "--quiet"], check=True, capture_output=True)
    return root


@pytest.fixture
def pacs(orthanc: Orthanc) -> Iterator[Orthanc]:
    orthanc.clear()
    yield orthanc


def ct_files(work: Path, study: int) -> list[Path]:
    return sorted((work / "synth" / f"study-{study:04d}" / "ct").glob("*.dcm"))


def wait_for_results(pacs: Orthanc, series_uid: str, timeout_s: float = 30
                     ) -> tuple[str, str, float]:
    """Orthanc ids of the series' SEG and SR, and when the second of them was seen."""
    seg_uid = result_uid(series_uid, SEG_MODEL, "seg")
    sr_uid = result_uid(series_uid, SEG_MODEL, "sr")
    deadline = time.monotonic() + timeout_s
    seg = sr = None
    while time.monotonic() < deadline:
        seg = seg or pacs.find_instance(seg_uid)
        sr = sr or pacs.find_instance(sr_uid)
        if seg and sr:
            return seg, sr, time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"SEG {seg} / SR {sr} not at the PACS after {timeout_s} s")


def modalities(pacs: Orthanc) -> list[str]:
    return sorted(str(pacs.tags(i).get("Modality")) for i in pacs.instances())


def test_series_pushed_with_storescu_comes_back_as_seg_and_sr(work: Path, pacs: Orthanc) -> None:
    files = ct_files(work, 0)
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    server = Serve.start(work / "repo", work / "data-e2e",
                         f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}")
    try:
        sent = subprocess.run(
            [str(STORESCU), "-v", "-aec", "MEDEDGE", "127.0.0.1", str(server.ports["dicom"]),
             *map(str, files)], env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True,
            text=True, timeout=60)
        last_response = time.monotonic()  # storescu returns after the last response + release
        assert sent.stderr.count("Received Store Response (Success)") == len(files), sent.stderr
        seg_id, sr_id, arrived = wait_for_results(pacs, series_uid)
        print(f"\ntime from the last C-STORE response to SEG+SR at Orthanc: "
              f"{arrived - last_response:.3f} s ({len(files)} slices)")
        assert modalities(pacs) == ["SEG", "SR"]

        url = f"{pacs.url}/instances/{seg_id}/file"
        with urllib.request.urlopen(url, timeout=10) as response:
            seg = pydicom.dcmread(BytesIO(response.read()))
        assert [s.SegmentLabel for s in seg.SegmentSequence][:1] == ["lung"]
        assert int(seg.NumberOfFrames) > 0  # lung pixels were found on some slices
        referenced = {i.ReferencedSOPInstanceUID for i in
                      seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert referenced == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                              for f in files}

        deadline = time.monotonic() + 10  # the delivery outcome is recorded after the PACS answer
        while "mededge_time_to_result_seconds_count" not in server.metrics():
            assert time.monotonic() < deadline, "no time-to-result observation"
            time.sleep(0.05)
        metrics = server.metrics()
        for family in ("mededge_associations", "mededge_instances_received",
                       "mededge_received_bytes", "mededge_instances_rejected",
                       "mededge_series_completed", "mededge_time_to_result_seconds",
                       "mededge_deliveries", "mededge_spool_bytes", "mededge_spool_free_bytes",
                       "mededge_instances_processed"):
            assert re.search(rf"^# TYPE {family}(_total)? ", metrics, re.MULTILINE), family
        assert f'mededge_instances_received_total{{kind="new"}} {len(files)}.0' in metrics
        assert 'mededge_series_completed_total{reason="released"} 1.0' in metrics
        assert 'mededge_deliveries_total{outcome="done"} 2.0' in metrics
        assert 'mededge_time_to_result_seconds_count{kind="seg"} 1.0' in metrics

        job = _grpc_job(server.ports["grpc"], series_uid)  # mededge.v1.DicomJobs
        assert job.state == "done" and job.instances_received == len(files)
        assert sorted((d.kind, d.state, d.attempts) for d in job.deliveries) == [
            ("seg", "done", 1), ("sr", "done", 1)]
        slices = work / "data-e2e" / "results" / series_uid / "slices"
        deadline = time.monotonic() + 10  # pruned once every delivery is done
        while slices.exists():
            assert time.monotonic() < deadline, "per-slice outputs were not pruned"
            time.sleep(0.05)
    finally:
        server.stop()
    assert server.process.returncode == 0, server.log.read_text()[-3000:]


def test_a_positive_series_with_a_heatmap_finishes_and_delivers_it(work: Path,
                                                                   pacs: Orthanc) -> None:
    """A classifier with a ``cam`` output and a threshold every series passes: the heatmap
    (pipeline.cam_output sc, the default) is recorded, delivered beside the SEG and SR, and the
    job finishes (a ledger that refused the heatmap's kind once left such series unfinished)."""
    repo = build_repository(work / "repo-cam", work / "models-cam", cam=True,
                            nodule_threshold=0.0)
    files = ct_files(work, 1)
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    server = Serve.start(repo, work / "data-cam", f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}")
    try:
        sent = subprocess.run(
            [str(STORESCU), "-aec", "MEDEDGE", "-v", "127.0.0.1", str(server.ports["dicom"]),
             *map(str, files)], env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True,
            text=True, timeout=60)
        assert sent.stderr.count("Received Store Response (Success)") == len(files), sent.stderr
        deadline = time.monotonic() + 30
        while (job := _grpc_job(server.ports["grpc"], series_uid)).state != "done" or any(
                d.state != "done" for d in job.deliveries):
            assert job.state != "failed", job
            assert time.monotonic() < deadline, f"job not finished: {job}"
            time.sleep(0.1)
        kinds = sorted(d.kind for d in job.deliveries)
        assert kinds == ["sc", "seg", "sr"], kinds
        cam_uid = ledger_rows(work / "data-cam",
                              "SELECT sop_instance_uid FROM results WHERE kind = 'sc'")[0][0]
        assert pacs.find_instance(str(cam_uid)), "the heatmap is not at the PACS"
    finally:
        server.stop()
    assert server.process.returncode == 0, server.log.read_text()[-3000:]


def _grpc_job(port: int, series_uid: str):  # type: ignore[no-untyped-def]
    import grpc

    from edge.protos.mededge.v1 import jobs_pb2, jobs_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return jobs_pb2_grpc.DicomJobsStub(channel).GetJob(
            jobs_pb2.GetJobRequest(series_instance_uid=series_uid), timeout=10)


def _associate(port: int, contexts: list[tuple[str, list[str]]]):  # type: ignore[no-untyped-def]
    from pynetdicom import AE

    ae = AE(ae_title="SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    return ae.associate("127.0.0.1", port, ae_title="MEDEDGE")


def ledger_rows(data: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(f"file:{data / 'ledger.sqlite3'}?mode=ro", uri=True, timeout=10) as db:
        return list(db.execute(sql).fetchall())


def test_kill9_mid_series_loses_nothing_and_delivers_once(work: Path, pacs: Orthanc) -> None:
    files = ct_files(work, 1)
    datasets = [pydicom.dcmread(f) for f in files]
    series_uid = str(datasets[0].SeriesInstanceUID)
    data = work / "data-kill"
    destination = f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}"
    syntax = str(datasets[0].file_meta.TransferSyntaxUID)
    contexts = [(str(datasets[0].SOPClassUID), [syntax])]
    server = Serve.start(work / "repo", data, destination)
    acknowledged: set[str] = set()
    assoc = _associate(server.ports["dicom"], contexts)
    assert assoc.is_established
    try:
        for i, ds in enumerate(datasets):
            if i == len(datasets) // 2:
                server.kill9()  # mid-series: the association is still open
            try:
                status = assoc.send_c_store(ds)
            except (RuntimeError, OSError, ValueError):
                break
            if status and int(status.Status) == 0:
                acknowledged.add(str(ds.SOPInstanceUID))
            else:
                break
    finally:
        assoc.abort()
        if server.process.poll() is None:
            server.kill9()
    assert 0 < len(acknowledged) < len(datasets)
    assert not pacs.instances()  # nothing was complete before the kill

    server = Serve.start(work / "repo", data, destination)
    try:
        rest = [ds for ds in datasets if str(ds.SOPInstanceUID) not in acknowledged]
        assoc = _associate(server.ports["dicom"], contexts)
        statuses = [int(assoc.send_c_store(ds).Status) for ds in rest]
        assoc.release()
        assert statuses == [0] * len(rest)
        wait_for_results(pacs, series_uid)
        time.sleep(1.0)  # a second, duplicate delivery would arrive within this
        assert modalities(pacs) == ["SEG", "SR"]
        states = ledger_rows(data, "SELECT state, COUNT(*) FROM instances GROUP BY state")
        assert states == [("done", len(datasets))]
        done = ledger_rows(data, "SELECT r.kind, COUNT(*) FROM deliveries d JOIN results r "
                                 "USING (result_id) WHERE d.state = 'done' GROUP BY r.kind")
        assert sorted(done) == [("seg", 1), ("sr", 1)]
    finally:
        server.stop()
    seg = pydicom.dcmread(next((data / "results" / series_uid / "auto").glob("seg-*.dcm")))
    referenced = {i.ReferencedSOPInstanceUID
                  for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {str(ds.SOPInstanceUID) for ds in datasets}


def pydicom_test_files() -> list[Path]:
    """Every file at the top of pydicom's test data (DICOM or not: .gz, .json, .txt too)."""
    root = Path(pydicom.__file__).parent / "data" / "test_files"
    return sorted(p for p in root.iterdir() if p.is_file())


def test_pydicom_test_files_never_stop_the_server(work: Path, pacs: Orthanc) -> None:
    from pynetdicom import AE

    files = pydicom_test_files()
    data = work / "data-corpus"
    # one rule sends every series to both models, so decoding is exercised on every file
    server = Serve.start(work / "repo", data, f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}",
                         MEDEDGE_ROUTING__RULES="[{name: all, models: [lung_seg, nodule_cls]}]")
    unsendable: dict[str, str] = {}
    refused: list[str] = []  # no presentation context accepted (SOP class or syntax)
    statuses: dict[str, int] = {}
    try:
        for path in files:
            try:
                ds = pydicom.dcmread(path, force=True)
                sop_class, syntax = str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)
            except Exception as exc:  # the corpus is hostile on purpose: count, go on
                unsendable[path.name] = f"{type(exc).__name__}"
                continue
            assoc = _associate(server.ports["dicom"], [(sop_class, [syntax])])
            if not assoc.is_established or not assoc.accepted_contexts:
                refused.append(path.name)
                continue
            try:
                try:
                    status = assoc.send_c_store(ds)
                except Exception as exc:  # pynetdicom cannot encode it: never left this side
                    unsendable[path.name] = f"{type(exc).__name__}"
                    continue
                assert status, f"{path.name}: no DIMSE status"
                statuses[path.name] = int(status.Status)
            finally:
                if assoc.is_established:
                    assoc.release()
        print(f"\npydicom corpus: {len(files)} files, {len(statuses)} sent, {len(refused)} "
              f"refused at association, {len(unsendable)} not sendable; statuses "
              f"{sorted({f'{s:04X}' for s in statuses.values()})}")
        assert len(statuses) + len(refused) + len(unsendable) == len(files)
        assert statuses, "nothing was sent"

        ae = AE(ae_title="SCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        echo = ae.associate("127.0.0.1", server.ports["dicom"], ae_title="MEDEDGE")
        assert echo.is_established and int(echo.send_c_echo().Status) == 0
        echo.release()
        _grpc_health(server.ports["grpc"])

        deadline = time.monotonic() + 30  # every accepted instance: a result or a reason
        query = ("SELECT i.sop_instance_uid, i.state, "
                 "(SELECT COUNT(*) FROM runs r WHERE r.error IS NOT NULL AND ("
                 "  r.sop_instance_uid = i.sop_instance_uid OR (r.sop_instance_uid IS NULL "
                 "  AND r.series_instance_uid = i.series_instance_uid))), "
                 "(SELECT COUNT(*) FROM runs r JOIN results s USING (run_id) "
                 " WHERE r.series_instance_uid = i.series_instance_uid) FROM instances i")
        while True:
            rows = ledger_rows(data, query)
            pending = [r for r in rows if r[1] != "done" or not (r[2] or r[3])]
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        accepted = sum(1 for s in statuses.values() if s == 0)
        assert len(rows) <= accepted and rows, (len(rows), accepted)
        assert not pending, pending
        reasons = ledger_rows(data, "SELECT error FROM runs WHERE error IS NOT NULL")
        results = ledger_rows(data, "SELECT kind, COUNT(*) FROM results GROUP BY kind")
        print(f"accepted {accepted} ({len(rows)} new), results {results}, reasons: "
              f"{sorted({str(r[0])[:60] for r in reasons})}")
    finally:
        server.stop()
    assert server.process.returncode == 0, server.log.read_text()[-3000:]


def _grpc_health(port: int) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
