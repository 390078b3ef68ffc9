"""Ledger schema 2 (run state ``skipped``, fingerprints; migrated from 1) and the by-series
queries the jobs API reads."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from edge.ingest import ReceivedInstance
from edge.ingest.uids import InstanceIdentity
from edge.jobs import queries
from edge.jobs.ledger import SCHEMA_VERSION, DeliveryState, Ledger, RunState

CT = "1.2.840.10008.5.1.4.1.1.2"
ELE = "1.2.840.10008.1.2.1"


def instance(uid: str, series: str = "1.2.3.2", at: float | None = None) -> ReceivedInstance:
    identity = InstanceIdentity("1.2.3.1", series, uid, CT, ELE, "CT")
    return ReceivedInstance(identity, Path(f"/spool/{uid}.dcm"), 10, "SCU",
                            time.time() if at is None else at)


def test_series_runs_results_deliveries_and_listing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.record_instance(instance("1.2.3.3", at=100.0))
    ledger.record_instance(instance("1.2.3.4", series="1.2.3.9", at=200.0))
    skipped = ledger.create_run("1.2.3.2", "skipped", "", "1.2.3.3")
    ledger.set_run_state(skipped, RunState.SKIPPED, "skipped: no model applies")
    run = ledger.create_run("1.2.3.2", "auto", "lung_seg:1", fingerprint="abc")
    result = ledger.add_result(run, "seg", tmp_path / "seg.dcm", "1.2.3.7")
    delivery = ledger.add_delivery(result, "PACS@127.0.0.1:104")
    ledger.set_run_state(run, RunState.DONE)

    record = queries.series(ledger, "1.2.3.2")
    assert (record.instance_count, record.modality, record.study_instance_uid) == (
        1, "CT", "1.2.3.1")
    runs = queries.series_runs(ledger, "1.2.3.2")
    assert [(r.state, r.sop_instance_uid) for r in runs] == [
        (RunState.SKIPPED, "1.2.3.3"), (RunState.DONE, None)]
    assert runs[0].finished_at is not None and runs[0].error.startswith("skipped")
    assert [(r.kind, r.sop_instance_uid) for r in queries.series_results(ledger, "1.2.3.2")] \
        == [("seg", "1.2.3.7")]
    (d,) = queries.series_deliveries(ledger, "1.2.3.2")
    assert (d.delivery_id, d.kind, d.state, d.attempts) == (delivery, "seg",
                                                             DeliveryState.PENDING, 0)
    assert queries.open_deliveries(ledger, "1.2.3.2") == 1
    assert queries.pipeline_done(ledger, "1.2.3.2", "auto", "abc")
    assert not queries.pipeline_done(ledger, "1.2.3.2", "auto", "other")
    assert [s.series_instance_uid for s in queries.list_series(ledger)] == ["1.2.3.9",
                                                                          "1.2.3.2"]
    assert [s.series_instance_uid for s in queries.list_series(ledger, since=150.0)] == [
        "1.2.3.9"]
    assert queries.list_series(ledger, state="done") == []
    with pytest.raises(queries.SeriesNotFoundError, match="1.2.3.5"):
        queries.series(ledger, "1.2.3.5")
    with pytest.raises(ValueError):
        queries.list_series(ledger, state="nonsense")


def test_a_version_1_ledger_is_migrated_keeping_its_runs(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    Ledger(path).close()
    with sqlite3.connect(path) as db:  # make it look like a version 1 ledger with a run
        db.executescript("""
            ALTER TABLE runs DROP COLUMN fingerprint;
            INSERT INTO series VALUES ('1.2', '1.1', 'CT', 1, 'done', 1.0, 1.0);
            INSERT INTO runs (series_instance_uid, pipeline, model, state, created_at, error)
                VALUES ('1.2', 'skipped', '', 'done', 1.0, 'skipped: x');
            PRAGMA user_version = 1;""")
    ledger = Ledger(path)
    assert ledger.query("PRAGMA user_version")[0][0] == SCHEMA_VERSION
    (old,) = queries.series_runs(ledger, "1.2")
    assert (old.state, old.error) == (RunState.DONE, "skipped: x")
    run = ledger.create_run("1.2", "skipped", "", "1.2.9", fingerprint="f")
    ledger.set_run_state(run, RunState.SKIPPED, "skipped: y")
    assert [r.state for r in queries.series_runs(ledger, "1.2")] == [RunState.DONE,
                                                                    RunState.SKIPPED]
