"""The DICOM listener over real associations: dcmtk's echoscu/storescu and pynetdicom's SCU."""

from __future__ import annotations

import io
import os
import queue
import re
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from edge.core.config import Settings, load_settings
from edge.ingest import AssociationClosed
from edge.ingest.listener import DicomListener
from edge.ingest.statuses import Status
from edge.jobs.ledger import Ledger

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class Running:
    listener: DicomListener
    port: int
    ledger: Ledger
    spool: Path
    releases: list[AssociationClosed]


def make_settings(tmp_path: Path, **dicom: object) -> Settings:
    return load_settings(environ={}, overrides={
        "server": {"data_dir": str(tmp_path)},
        "dicom": {"bind": "127.0.0.1", "port": 0, **dicom},
        "spool": {"dir": str(tmp_path / "spool"), "min_free_bytes": 0},
    })


def start(base: Path, **dicom: object) -> Iterator[Running]:
    releases: list[AssociationClosed] = []
    with Ledger(base / "ledger.sqlite3") as ledger:
        listener = DicomListener(make_settings(base, **dicom), ledger, releases.append)
        port = listener.start()
        try:
            yield Running(listener, port, ledger, base / "spool", releases)
        finally:
            listener.stop()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One listener for the module (stopping one takes pynetdicom's 0.5 s poll); each test
    uses its own study UID and looks only under it. The spool sits two folders below the
    fixture's own temporary folder, so an escape by ``../..`` would still land inside it."""
    nested = tmp_path_factory.mktemp("open") / "a" / "b"
    nested.mkdir(parents=True)
    yield from start(nested)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    yield from start(tmp_path_factory.mktemp("guarded"), peers=[
        {"ae_title": "CT1", "host": "127.0.0.1"}, {"ae_title": "FARAWAY", "host": "10.255.255.1"}])


def ct_dataset(study: str, series: str, size: int = 32, **extra: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.PatientName, ds.PatientID = "CT", "Doe^Jane", "PID-1"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    rng = np.random.default_rng(len(ds.SOPInstanceUID))
    ds.PixelData = rng.integers(0, 4095, (size, size), dtype=np.int16).tobytes()
    for key, value in extra.items():
        setattr(ds, key, value)
    return ds


def scu(calling: str = "MODALITY", contexts: tuple[str, ...] = (CTImageStorage,)) -> AE:
    ae = AE(ae_title=calling)
    for uid in contexts:
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    return ae


def stored_files(spool: Path, study: str) -> list[Path]:
    return sorted((spool / study).rglob("*.dcm"))


def releases_of(running: Running, series: str) -> list[AssociationClosed]:
    return [r for r in running.releases if series in r.series_instance_uids]


def storescu(port: int, *args: str) -> list[str]:
    """Run dcmtk's storescu; return the status of each store response it reports."""
    out = subprocess.run(["/usr/bin/storescu", "-v", "-aec", "MEDEDGE", "-aet", "STORESCU",
                          "127.0.0.1", str(port), *args], env=DCMTK_ENV, capture_output=True,
                         text=True, timeout=60)
    return re.findall(r"Received Store Response \(([^)]*)\)", out.stdout + out.stderr)


def same_dataset(sent: Path, stored: Path) -> None:
    """Decoded datasets are equal. storescu itself drops trailing padding and group lengths
    and sends encapsulated pixel data as OB, so those are compared by value only."""
    a, b = dcmread(sent), dcmread(stored)
    assert a.get("PixelData") == b.get("PixelData"), "pixel data bytes differ"
    for ds in (a, b):
        tags = [e.tag for e in ds if e.tag in (0xFFFCFFFC, 0x7FE00010) or e.tag.element == 0]
        for tag in tags:
            del ds[tag]
    assert b.file_meta.TransferSyntaxUID == a.file_meta.TransferSyntaxUID, "transcoded"
    assert a == b, "stored dataset differs from the one sent"


def test_echoscu_is_answered(running: Running) -> None:
    rc = subprocess.run(["/usr/bin/echoscu", "-aec", "MEDEDGE", "127.0.0.1", str(running.port)],
                        env=DCMTK_ENV, capture_output=True, timeout=30).returncode
    assert rc == 0


def test_storescu_series_is_spooled_recorded_and_released(running: Running,
                                                          tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    sent = []
    for i in range(4):
        path = tmp_path / f"ct{i}.dcm"
        ct_dataset(study, series, InstanceNumber=i + 1).save_as(path, enforce_file_format=True)
        sent.append(path)
    assert storescu(running.port, *map(str, sent)) == ["Success"] * 4
    for path in sent:
        uid = dcmread(path).SOPInstanceUID
        stored = running.spool / study / series / f"{uid}.dcm"
        same_dataset(path, stored)
        record = running.ledger.instance(uid)
        assert record is not None and record.path == stored and record.calling_ae == "STORESCU"
    assert running.ledger.series_count(series) == 4
    [closed] = releases_of(running, series)
    assert closed.series_instance_uids == (series,) and closed.study_instance_uids == (study,)
    assert closed.released and closed.instances == 4 and closed.calling_ae == "STORESCU"


COMPRESSED = [  # pydicom test file, storescu option proposing its own transfer syntax
    ("CT_small.dcm", "-xe"),
    ("MR_small_bigendian.dcm", "-xb"),
    ("image_dfl.dcm", "-xd"),
    ("JPEG2000.dcm", "-xw"),
    ("MR_small_jp2klossless.dcm", "-xv"),
    ("MR_small_RLE.dcm", "-xr"),
    ("SC_rgb_jpeg_dcmtk.dcm", "-xy"),
    ("JPEG-lossy.dcm", "-xx"),
    ("MR_small_jpeg_ls_lossless.dcm", "-xt"),
]


@pytest.mark.parametrize(("name", "option"), COMPRESSED)
def test_storescu_file_is_stored_as_sent(running: Running, tmp_path: Path, name: str,
                                         option: str) -> None:
    # New UIDs (several test files share theirs); saving keeps the pixel data bytes as they are.
    source = dcmread(get_testdata_file(name, download=False))
    source.StudyInstanceUID, source.SOPInstanceUID = generate_uid(), generate_uid()
    source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
    path = tmp_path / name
    source.save_as(path)
    assert storescu(running.port, option, str(path)) == ["Success"]
    [stored] = stored_files(running.spool, source.StudyInstanceUID)
    same_dataset(path, stored)


def test_pynetdicom_scu_sends_jpeg_ls_near_lossless_as_is(running: Running,
                                                          tmp_path: Path) -> None:
    source = dcmread(get_testdata_file("JPEGLSNearLossless_16.dcm", download=False))
    source.StudyInstanceUID, source.SeriesInstanceUID = generate_uid(), generate_uid()
    path = tmp_path / "jls.dcm"
    source.save_as(path)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(SecondaryCaptureImageStorage, source.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", running.port, ae_title="MEDEDGE")
    assert assoc.is_established
    status = assoc.send_c_store(path)
    assoc.release()
    assert status.Status == Status.SUCCESS
    same_dataset(path, stored_files(running.spool, source.StudyInstanceUID)[0])


def test_duplicate_sop_instance_is_success_once(running: Running) -> None:
    ds = ct_dataset(generate_uid(), generate_uid())
    before = running.listener.stats.snapshot()
    assoc = scu().associate("127.0.0.1", running.port, ae_title="MEDEDGE")
    first = assoc.send_c_store(ds).Status
    [stored] = stored_files(running.spool, ds.StudyInstanceUID)
    inode, mtime = stored.stat().st_ino, stored.stat().st_mtime_ns
    second = assoc.send_c_store(ds).Status
    assoc.release()
    assert (first, second) == (Status.SUCCESS, Status.SUCCESS)
    assert (stored.stat().st_ino, stored.stat().st_mtime_ns) == (inode, mtime), "rewritten"
    assert running.ledger.series_count(ds.SeriesInstanceUID) == 1
    after = running.listener.stats.snapshot()
    assert after.instances_received - before.instances_received == 1
    assert after.instances_duplicate - before.instances_duplicate == 1


def raw_store(port: int, affected_class: str, affected_instance: str, body: bytes) -> int:
    """Send a C-STORE whose request and dataset bytes we choose; return the response status.

    pynetdicom's send_c_store builds both from one dataset, so the request goes through the
    DIMSE provider and the response is caught by an EVT_DIMSE_RECV handler.
    """
    responses: queue.Queue[int] = queue.Queue()

    def on_recv(event: evt.Event) -> None:
        command = event.message.command_set
        if command.CommandField == 0x8001:  # C-STORE-RSP
            responses.put(int(command.Status))

    assoc = scu().associate("127.0.0.1", port, ae_title="MEDEDGE",
                            evt_handlers=[(evt.EVT_DIMSE_RECV, on_recv)])
    assert assoc.is_established
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = affected_class
    req.AffectedSOPInstanceUID = affected_instance
    req.Priority = 2
    req.DataSet = io.BytesIO(body)
    assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)
    try:
        return responses.get(timeout=10)
    finally:
        assoc.release()


def body_of(ds: Dataset) -> bytes:
    return encode(ds, False, True) or b""


@pytest.mark.parametrize("attribute", ["StudyInstanceUID", "SeriesInstanceUID"])
@pytest.mark.parametrize("hostile", ["../../etc", "1." + "2" * 198, "1.02.3", "/tmp/x"])
def test_hostile_uid_fails_without_a_path(running: Running, tmp_path: Path, attribute: str,
                                          hostile: str) -> None:
    ds = ct_dataset(generate_uid(), generate_uid())
    setattr(ds, attribute, hostile)
    status = raw_store(running.port, CTImageStorage, ds.SOPInstanceUID, body_of(ds))
    assert status == Status.DATASET_MISMATCH
    assert running.ledger.instance(ds.SOPInstanceUID) is None
    own_root = running.spool.parents[2]  # the fixture's temporary folder, no one else's
    assert not [p for p in own_root.rglob("*") if p.name in ("etc", "x")], "escaped"
    assert not list(running.spool.rglob(f"{ds.SOPInstanceUID}*")), "stored"


def test_wrong_sop_class_is_a900(running: Running) -> None:
    ds = ct_dataset(generate_uid(), generate_uid(), SOPClassUID=MRImageStorage)
    assert raw_store(running.port, CTImageStorage, ds.SOPInstanceUID,
                     body_of(ds)) == Status.DATASET_MISMATCH
    assert stored_files(running.spool, ds.StudyInstanceUID) == []


def test_instance_uid_mismatch_is_a900(running: Running) -> None:
    ds = ct_dataset(generate_uid(), generate_uid())
    assert raw_store(running.port, CTImageStorage, generate_uid(),
                     body_of(ds)) == Status.DATASET_MISMATCH


def test_missing_series_uid_is_a900(running: Running) -> None:
    ds = ct_dataset(generate_uid(), generate_uid())
    del ds.SeriesInstanceUID
    assert raw_store(running.port, CTImageStorage, ds.SOPInstanceUID,
                     body_of(ds)) == Status.DATASET_MISMATCH


def test_unparseable_dataset_is_c000(running: Running) -> None:
    # A sequence of undefined length whose item holds an element running past the stream.
    garbage = (b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff"
               b"\xfe\xff\x00\xe0\x10\x00\x00\x00\x08\x00\x18\x00UI\xff\x00")
    before = running.listener.stats.snapshot().stores_failed.get(0xC000, 0)
    status = raw_store(running.port, CTImageStorage, generate_uid(), garbage)
    assert status == Status.CANNOT_UNDERSTAND
    assert running.listener.stats.snapshot().stores_failed[0xC000] == before + 1


def test_store_under_watermark_is_a700_and_association_refused(running: Running) -> None:
    ds = ct_dataset(generate_uid(), generate_uid())
    spool = running.listener.spool
    assoc = scu().associate("127.0.0.1", running.port, ae_title="MEDEDGE")
    assert assoc.is_established
    spool.min_free_bytes = 2**62  # more than any disk has
    try:
        status = assoc.send_c_store(ds).Status
        assoc.release()
        refused = scu().associate("127.0.0.1", running.port, ae_title="MEDEDGE")
    finally:
        spool.min_free_bytes = 0
    assert status == Status.OUT_OF_RESOURCES
    assert stored_files(running.spool, ds.StudyInstanceUID) == []
    assert refused.is_rejected
    rj = refused.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x01)
    assert running.listener.stats.snapshot().associations_rejected["out_of_space"] >= 1


@pytest.mark.parametrize(("calling", "called", "expected"), [
    ("CT1", "MEDEDGE", None),
    ("INTRUDER", "MEDEDGE", (0x01, 0x01, 0x03)),
    ("FARAWAY", "MEDEDGE", (0x01, 0x01, 0x03)),  # allowed AE title, wrong host
    ("CT1", "SOMEONE", (0x01, 0x01, 0x07)),
])
def test_allow_list(guarded: Running, calling: str, called: str,
                    expected: tuple[int, int, int] | None) -> None:
    assoc = scu(calling).associate("127.0.0.1", guarded.port, ae_title=called)
    if expected is None:
        assert assoc.is_established
        assoc.release()
        return
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == expected


def test_no_allow_list_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Ledger(tmp_path / "l.sqlite3") as ledger:
        listener = DicomListener(make_settings(tmp_path), ledger, lambda closed: None)
        listener.start()
        listener.stop()
    assert "any calling AE title is accepted" in caplog.text


def test_tcp_nodelay_on_accepted_socket(running: Running) -> None:
    assoc = scu().associate("127.0.0.1", running.port, ae_title="MEDEDGE")
    assert assoc.is_established
    try:
        [acceptor] = [a for a in running.listener.ae.active_associations if a.is_acceptor]
        sock = acceptor.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()


def test_max_pdu_from_settings(running: Running) -> None:
    assoc = scu().associate("127.0.0.1", running.port, ae_title="MEDEDGE")
    assert assoc.acceptor.maximum_length == 131072
    assoc.release()
