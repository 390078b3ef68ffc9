"""Nothing acknowledged is lost: kill -9 a receiver mid-series, lose what power loss could
lose (the ledger's last commits, renames not yet flushed), reconcile, find every instance
whose C-STORE response was success."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from edge.dispatch.responses import install
from edge.ingest.spool import Spool
from edge.jobs.ledger import Ledger
from edge.jobs.reconcile import reconcile

RECEIVER = """
import sys, time
from pathlib import Path
from edge.core.config import load_settings
from edge.ingest.listener import DicomListener
from edge.jobs.ledger import Ledger
base = Path(sys.argv[1])
settings = load_settings(environ={}, overrides={
    "server": {"data_dir": str(base)}, "dicom": {"bind": "127.0.0.1", "port": 0},
    "spool": {"dir": str(base / "spool"), "min_free_bytes": 0}})
listener = DicomListener(settings, Ledger(base / "ledger.sqlite3"), lambda closed: None)
print(listener.start(), flush=True)
time.sleep(3600)
"""


def _dataset(study: str, series: str, number: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
    ds.InstanceNumber, ds.Rows, ds.Columns = number, 64, 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 1
    ds.PixelData = np.full((64, 64), number, np.int16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _send_until_killed(port: int, receiver: subprocess.Popen[str]) -> dict[str, bytes]:
    """Store instances until the receiver dies; return the acknowledged ones' pixel data."""
    ae = AE(ae_title="CT1")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    killer = threading.Timer(1.5, os.kill, (receiver.pid, signal.SIGKILL))
    killer.start()
    study, series = generate_uid(), generate_uid()
    acknowledged: dict[str, bytes] = {}
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDEDGE")
    assert assoc.is_established
    install(assoc)  # a kill during a request ends its wait at once, not after the DIMSE timeout
    for number in range(1, 100_000):
        if not assoc.is_established:
            break
        ds = _dataset(study, series, number)
        try:
            status = assoc.send_c_store(ds)
        except RuntimeError:  # the kill landed between the check above and this request
            break
        if status and status.Status == 0x0000:
            acknowledged[str(ds.SOPInstanceUID)] = ds.PixelData
    killer.join()
    assoc.abort()
    return acknowledged


def _lose_what_power_loss_could(base: Path, acknowledged: dict[str, bytes]) -> None:
    """Drop the ledger's last commits (a WAL suffix) and undo the last renames (.part)."""
    db = sqlite3.connect(base / "ledger.sqlite3")
    lost = db.execute("SELECT sop_instance_uid, path, size FROM instances "
                      "ORDER BY received_at DESC LIMIT 5").fetchall()
    db.executemany("DELETE FROM instances WHERE sop_instance_uid = ?", [(r[0],) for r in lost])
    db.commit()
    db.close()
    for uid, path, size in lost[:2]:
        Path(path).rename(Path(path).with_name(f"{uid}.{size}.deadbeef.part"))


def test_kill_9_then_reconcile_keeps_every_acknowledged_instance(tmp_path: Path) -> None:
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(tmp_path)],
                                stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[3])
    try:
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline())
        acknowledged = _send_until_killed(port, receiver)
    finally:
        receiver.kill()
        receiver.wait()
    assert len(acknowledged) >= 10, "the receiver died before storing enough to test"
    _lose_what_power_loss_could(tmp_path, acknowledged)
    time.sleep(0.01)
    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        report = reconcile(Spool(tmp_path / "spool", 0), ledger)
        # 5 rows lost, 2 of them with their rename undone. The instance in flight when the
        # receiver was killed may also be whole on disk (a full-size .part, or renamed but not
        # recorded): it was never acknowledged, and keeping it is harmless (a resend is a repeat)
        in_flight = report.recorded - 5
        assert in_flight in (0, 1), report
        assert report.promoted - 2 in (0, in_flight), report
        assert report.missing_files == 0, report
        for uid, pixels in acknowledged.items():
            record = ledger.instance(uid)
            assert record is not None, f"acknowledged {uid} is not in the ledger"
            stored = dcmread(record.path)
            assert stored.PixelData == pixels
            assert stored.file_meta.SourceApplicationEntityTitle == "CT1"
        assert not list((tmp_path / "spool").glob("*/*/*.part"))
        assert reconcile(Spool(tmp_path / "spool", 0), ledger).recorded == 0  # idempotent
