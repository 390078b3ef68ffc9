"""The SQLite ledger: idempotent records, resume list, thread safety, retention clean-up."""

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from edge.ingest import ReceivedInstance
from edge.ingest.spool import Spool
from edge.ingest.uids import InstanceIdentity
from edge.jobs.ledger import SCHEMA_VERSION, InstanceState, Ledger, LedgerError, RunState, cleanup


def received(spool: Spool, n: int, series: str = "1.2.3.1", at: float | None = None,
             ae: str = "CT1") -> ReceivedInstance:
    ident = InstanceIdentity("1.2.3", series, f"{series}.{n}", CTImageStorage,
                             ExplicitVRLittleEndian, "CT")
    stored = spool.store(ident, b"x" * 100)
    return ReceivedInstance(ident, stored.path, stored.size, ae,
                            time.time() if at is None else at)


def test_wal_and_idempotent_record(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0).open()
    with Ledger(tmp_path / "l.db") as ledger:
        assert ledger._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        inst = received(spool, 1)
        assert ledger.record_instance(inst) is True
        assert ledger.record_instance(inst) is False
        assert ledger.series_count("1.2.3.1") == 1
        record = ledger.instance(inst.identity.sop_instance_uid)
        assert record is not None and record.identity == inst.identity
        assert record.state is InstanceState.RECEIVED


def test_unfinished_survives_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0).open()
    with Ledger(tmp_path / "l.db") as ledger:
        for n in range(3):
            ledger.record_instance(received(spool, n + 1))
        ledger.set_instance_state("1.2.3.1.2", InstanceState.DONE)
    with Ledger(tmp_path / "l.db") as ledger:
        assert [r.identity.sop_instance_uid for r in ledger.unfinished()] == [
            "1.2.3.1.1", "1.2.3.1.3"]


def test_concurrent_records(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0).open()
    items = [received(spool, n + 1) for n in range(40)]
    with Ledger(tmp_path / "l.db") as ledger:
        results: list[bool] = []

        def worker() -> None:
            for inst in items:
                results.append(ledger.record_instance(inst))

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count(True) == 40 and ledger.series_count("1.2.3.1") == 40


def test_runs_results_deliveries(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0).open()
    with Ledger(tmp_path / "l.db") as ledger:
        ledger.record_instance(received(spool, 1))
        run = ledger.create_run("1.2.3.1", "lung", "lung_seg")
        ledger.set_run_state(run, RunState.RUNNING)
        ledger.set_run_state(run, RunState.DONE)
        result = ledger.add_result(run, "seg", tmp_path / "seg.dcm", "1.2.9")
        delivery = ledger.add_delivery(result, "PACS@127.0.0.1:104")
        ledger.set_delivery_state(delivery, "sending")
        ledger.set_delivery_state(delivery, "done")
        row = ledger._db.execute("SELECT state, attempts FROM deliveries").fetchone()
        assert row == ("done", 1)


def test_cleanup_never_removes_unfinished(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0).open()
    old = time.time() - 3600
    with Ledger(tmp_path / "l.db") as ledger:
        done_old = received(spool, 1, at=old)
        pending_old = received(spool, 2, at=old)
        done_new = received(spool, 3)
        for inst in (done_old, pending_old, done_new):
            ledger.record_instance(inst)
        for inst in (done_old, done_new):
            ledger.set_instance_state(inst.identity.sop_instance_uid, "done")
        report = cleanup(spool, ledger, max_age_s=60, min_free_bytes=0)
        assert report.removed == 1 and not done_old.path.exists()
        assert pending_old.path.exists() and done_new.path.exists()
        # Space pressure removes done instances of any age, still never unfinished ones.
        report = cleanup(spool, ledger, max_age_s=1e9, min_free_bytes=2**62)
        assert report.removed == 1 and not done_new.path.exists()
        assert pending_old.path.exists()
        assert [r.identity.sop_instance_uid for r in ledger.unfinished()] == ["1.2.3.1.2"]


@pytest.mark.parametrize("kind", ["sc", "pm"])
def test_heatmap_results_are_recorded_and_delivered(tmp_path: Path, kind: str) -> None:
    """A positive classification's CAM object (pipeline.cam_output sc / pm) is a result like
    the SEG and SR (schema 2 refused it, which left the series unfinished)."""
    spool = Spool(tmp_path / "spool", 0).open()
    with Ledger(tmp_path / "l.db") as ledger:
        ledger.record_instance(received(spool, 1))
        run = ledger.create_run("1.2.3.1", "chest", "nodule_cls")
        result = ledger.add_result(run, kind, tmp_path / f"cam-{kind}.dcm", "1.2.9.1")
        assert ledger.add_delivery(result, "PACS@127.0.0.1:104") > 0


def test_an_unknown_result_kind_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0).open()
    with Ledger(tmp_path / "l.db") as ledger:
        ledger.record_instance(received(spool, 1))
        run = ledger.create_run("1.2.3.1", "chest", "nodule_cls")
        with pytest.raises(LedgerError):
            ledger.add_result(run, "png", tmp_path / "x.png")


def test_a_schema_2_ledger_is_migrated_keeping_results_and_deliveries(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0).open()
    path = tmp_path / "l.db"
    with Ledger(path) as ledger:
        ledger.record_instance(received(spool, 1))
        run = ledger.create_run("1.2.3.1", "lung", "lung_seg")
        result = ledger.add_result(run, "seg", tmp_path / "seg.dcm", "1.2.9")
        ledger.add_delivery(result, "PACS@127.0.0.1:104")
    # Make it what schema 2 wrote: the results table with the old CHECK constraint.
    db = sqlite3.connect(path)
    db.executescript("""
        PRAGMA foreign_keys=OFF; BEGIN;
        CREATE TABLE results_old (result_id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id INTEGER NOT NULL REFERENCES runs (run_id),
            kind TEXT NOT NULL CHECK (kind IN ('seg', 'sr', 'json')),
            sop_instance_uid TEXT, path TEXT NOT NULL, created_at REAL NOT NULL);
        INSERT INTO results_old SELECT * FROM results; DROP TABLE results;
        ALTER TABLE results_old RENAME TO results; PRAGMA user_version=2; COMMIT;""")
    db.close()
    with Ledger(path) as ledger:
        assert ledger._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        rows = ledger._db.execute(
            "SELECT r.result_id, r.kind, d.destination FROM results r "
            "JOIN deliveries d USING (result_id)").fetchall()
        assert rows == [(result, "seg", "PACS@127.0.0.1:104")]
        assert ledger.add_result(run, "sc", tmp_path / "cam.dcm") > result
        assert ledger._db.execute("PRAGMA foreign_key_check").fetchall() == []
