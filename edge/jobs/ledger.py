"""The jobs ledger: one SQLite database (WAL) of instances, series, runs, results, deliveries.

``synchronous=NORMAL`` (WAL): a commit survives a process crash (kill -9) without a device
flush; power loss may drop the last commits (never a partial one). The fsync'd spool is the
durable record of what was acknowledged: :func:`edge.jobs.reconcile.reconcile` re-records at
start-up any spool file the ledger lost (docs/dicom.md, "Durability order"). One connection
guarded by a lock: writes are short and SQLite serialises writers anyway; this keeps every
method safe to call from any thread.
"""

from __future__ import annotations

import enum
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.core.errors import MededgeError
from edge.ingest import ReceivedInstance
from edge.ingest.spool import OutOfResourcesError, Spool
from edge.ingest.uids import InstanceIdentity

SCHEMA_VERSION = 3  # 2: run state 'skipped', runs.fingerprint; 3: result kinds 'sc', 'pm'


class InstanceState(str, enum.Enum):
    """Where an acknowledged instance is in the pipeline."""

    RECEIVED = "received"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class SeriesState(str, enum.Enum):
    RECEIVING = "receiving"
    COMPLETE = "complete"  # no more instances expected
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class RunState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # nothing applies (the reason is in ``error``)


#: Run states that end a run.
FINISHED_RUN_STATES = (RunState.DONE, RunState.FAILED, RunState.SKIPPED)


class DeliveryState(str, enum.Enum):
    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"  # will be retried at next_attempt_at
    DEAD = "dead"  # gave up: dead letter


class ResultKind(str, enum.Enum):
    """What a result file is."""

    SEG = "seg"  # DICOM Segmentation
    SR = "sr"  # TID 1500 structured report
    JSON = "json"
    SC = "sc"  # class-activation map as a Secondary Capture overlay
    PM = "pm"  # class-activation map as a Parametric Map


def _check(column: str, states: type[enum.Enum]) -> str:
    values = ", ".join(f"'{s.value}'" for s in states)
    return f"CHECK ({column} IN ({values}))"


SCHEMA = f"""
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid    TEXT PRIMARY KEY,
    series_instance_uid TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    sop_class_uid       TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path                TEXT NOT NULL,
    size                INTEGER NOT NULL,
    calling_ae          TEXT NOT NULL,
    received_at         REAL NOT NULL,
    state               TEXT NOT NULL DEFAULT 'received' {_check("state", InstanceState)}
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_instance_uid);
CREATE INDEX IF NOT EXISTS instances_state ON instances (state, received_at);
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid  TEXT NOT NULL,
    modality            TEXT NOT NULL DEFAULT '',
    instance_count      INTEGER NOT NULL DEFAULT 0,
    state               TEXT NOT NULL DEFAULT 'receiving' {_check("state", SeriesState)},
    first_received_at   REAL NOT NULL,
    last_received_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id              INTEGER PRIMARY KEY AUTOINCREMENT,
    series_instance_uid TEXT NOT NULL REFERENCES series (series_instance_uid),
    sop_instance_uid    TEXT,  -- NULL: a series-level run
    pipeline            TEXT NOT NULL,
    model               TEXT NOT NULL,
    state               TEXT NOT NULL DEFAULT 'queued' {_check("state", RunState)},
    created_at          REAL NOT NULL,
    started_at          REAL,
    finished_at         REAL,
    error               TEXT,
    fingerprint         TEXT  -- series-level runs: models + instances the results cover
);
CREATE INDEX IF NOT EXISTS runs_series ON runs (series_instance_uid);
CREATE INDEX IF NOT EXISTS runs_state ON runs (state);
CREATE TABLE IF NOT EXISTS results (
    result_id           INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id              INTEGER NOT NULL REFERENCES runs (run_id),
    kind                TEXT NOT NULL {_check("kind", ResultKind)},
    sop_instance_uid    TEXT,  -- of the result object, when it is DICOM
    path                TEXT NOT NULL,
    created_at          REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id         INTEGER PRIMARY KEY AUTOINCREMENT,
    result_id           INTEGER NOT NULL REFERENCES results (result_id),
    destination         TEXT NOT NULL,  -- AET@HOST:PORT
    state               TEXT NOT NULL DEFAULT 'pending' {_check("state", DeliveryState)},
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     REAL NOT NULL,
    last_error          TEXT,
    updated_at          REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS results_run ON results (run_id);
CREATE INDEX IF NOT EXISTS series_received ON series (last_received_at);
"""

#: Version 1 -> 2 (additive): the runs table gains the state 'skipped' (a CHECK constraint,
#: so the table is rebuilt, SQLite's documented way) and the column ``fingerprint``.
_MIGRATE_1_TO_2 = f"""
CREATE TABLE runs_v2 (
    run_id              INTEGER PRIMARY KEY AUTOINCREMENT,
    series_instance_uid TEXT NOT NULL REFERENCES series (series_instance_uid),
    sop_instance_uid    TEXT,
    pipeline            TEXT NOT NULL,
    model               TEXT NOT NULL,
    state               TEXT NOT NULL DEFAULT 'queued' {_check("state", RunState)},
    created_at          REAL NOT NULL,
    started_at          REAL,
    finished_at         REAL,
    error               TEXT,
    fingerprint         TEXT
);
INSERT INTO runs_v2 (run_id, series_instance_uid, sop_instance_uid, pipeline, model, state,
                     created_at, started_at, finished_at, error)
    SELECT run_id, series_instance_uid, sop_instance_uid, pipeline, model, state, created_at,
           started_at, finished_at, error FROM runs;
DROP TABLE runs;
ALTER TABLE runs_v2 RENAME TO runs;
CREATE INDEX IF NOT EXISTS runs_state ON runs (state);
"""

#: Version 2 -> 3: results may also be class-activation maps ('sc', 'pm'); the CHECK constraint
#: changes, so the table is rebuilt (its ids, which deliveries reference, are kept).
_MIGRATE_2_TO_3 = f"""
CREATE TABLE results_v3 (
    result_id           INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id              INTEGER NOT NULL REFERENCES runs (run_id),
    kind                TEXT NOT NULL {_check("kind", ResultKind)},
    sop_instance_uid    TEXT,
    path                TEXT NOT NULL,
    created_at          REAL NOT NULL
);
INSERT INTO results_v3 (result_id, run_id, kind, sop_instance_uid, path, created_at)
    SELECT result_id, run_id, kind, sop_instance_uid, path, created_at FROM results;
DROP TABLE results;
ALTER TABLE results_v3 RENAME TO results;
CREATE INDEX IF NOT EXISTS results_run ON results (run_id);
"""


class LedgerError(MededgeError):
    """The ledger database is unusable (corrupt, wrong schema version, unreadable)."""


@dataclass(frozen=True)
class InstanceRecord:
    """One instances row."""

    identity: InstanceIdentity
    path: Path
    size: int
    calling_ae: str
    received_at: float
    state: InstanceState


@dataclass(frozen=True)
class DeliveryRecord:
    """One deliveries row, with the path of the result it sends."""

    delivery_id: int
    result_id: int
    destination: str  # AET@HOST:PORT
    path: Path
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_error: str | None
    updated_at: float


@dataclass(frozen=True)
class DeliveryUpdate:
    """The outcome of one attempt, for :meth:`Ledger.record_delivery_outcomes`."""

    delivery_id: int
    state: DeliveryState
    error: str | None = None
    next_attempt_at: float | None = None  # None: unchanged


_DELIVERY_COLUMNS = ("d.delivery_id, d.result_id, d.destination, r.path, d.state, d.attempts, "
                     "d.next_attempt_at, d.last_error, d.updated_at FROM deliveries d "
                     "JOIN results r USING (result_id)")


class Ledger:
    """The SQLite ledger. Satisfies :class:`edge.ingest.InstanceRecorder`."""

    def __init__(self, path: Path, busy_timeout_s: float = 5.0) -> None:
        """Open (creating if needed) the ledger at ``path``.

        Raises:
            LedgerError: the file is not a usable ledger.
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, 2, SCHEMA_VERSION):
                raise LedgerError(f"{self.path}: schema version {version}, "
                                  f"expected {SCHEMA_VERSION} or older")
            if version == 1:
                self._migrate(_MIGRATE_1_TO_2, 2)
                version = 2
            if version == 2:
                self._migrate(_MIGRATE_2_TO_3, 3)
            self._db.executescript(SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path}: {exc}") from exc

    def _migrate(self, script: str, version: int) -> None:
        """Run one schema step that rebuilds a table, in one transaction (foreign keys off
        meanwhile, as SQLite's ALTER TABLE procedure asks). Raises: sqlite3.DatabaseError."""
        self._db.execute("PRAGMA foreign_keys=OFF")
        try:
            self._db.executescript("BEGIN IMMEDIATE;" + script
                                   + f"PRAGMA user_version={version}; COMMIT;")
        except sqlite3.DatabaseError:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        finally:
            self._db.execute("PRAGMA foreign_keys=ON")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. Raises OutOfResourcesError on a full disk or busy database,
        LedgerError on any other database error."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                text = str(exc)
                if "full" in text or "locked" in text or "busy" in text:
                    raise OutOfResourcesError(f"ledger: {text}") from exc
                raise LedgerError(f"ledger: {text}") from exc
            except sqlite3.DatabaseError as exc:
                raise LedgerError(f"ledger: {exc}") from exc

    # -- instances and series ----------------------------------------------------------------

    def record_instance(self, instance: ReceivedInstance) -> bool:
        """Record an instance and count it in its series; False if it was already recorded.

        Raises:
            OutOfResourcesError: disk full or the database stayed busy.
            LedgerError: any other database failure.
        """
        ident = instance.identity
        with self._transaction() as db:
            cur = db.execute(
                "INSERT INTO instances (sop_instance_uid, series_instance_uid, "
                "study_instance_uid, sop_class_uid, transfer_syntax_uid, path, size, calling_ae, "
                "received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (sop_instance_uid) DO NOTHING",
                (ident.sop_instance_uid, ident.series_instance_uid, ident.study_instance_uid,
                 ident.sop_class_uid, ident.transfer_syntax_uid, str(instance.path),
                 instance.size, instance.calling_ae, instance.received_at))
            if cur.rowcount == 0:
                return False
            db.execute(
                "INSERT INTO series (series_instance_uid, study_instance_uid, modality, "
                "instance_count, first_received_at, last_received_at) VALUES (?, ?, ?, 1, ?, ?) "
                "ON CONFLICT (series_instance_uid) DO UPDATE SET "
                "instance_count = instance_count + 1, last_received_at = excluded.last_received_at",
                (ident.series_instance_uid, ident.study_instance_uid, ident.modality,
                 instance.received_at, instance.received_at))
            return True

    def set_instance_state(self, sop_instance_uid: str, state: InstanceState | str) -> None:
        """Raises: KeyError (unknown instance), OutOfResourcesError, LedgerError."""
        with self._transaction() as db:
            cur = db.execute("UPDATE instances SET state = ? WHERE sop_instance_uid = ?",
                             (InstanceState(state).value, sop_instance_uid))
            if cur.rowcount == 0:
                raise KeyError(sop_instance_uid)

    def set_series_state(self, series_instance_uid: str, state: SeriesState | str) -> None:
        """Raises: KeyError (unknown series), OutOfResourcesError, LedgerError."""
        with self._transaction() as db:
            cur = db.execute("UPDATE series SET state = ? WHERE series_instance_uid = ?",
                             (SeriesState(state).value, series_instance_uid))
            if cur.rowcount == 0:
                raise KeyError(series_instance_uid)

    def instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        rows = self._select("i.sop_instance_uid = ?", (sop_instance_uid,))
        return rows[0] if rows else None

    def series_instances(self, series_instance_uid: str) -> list[InstanceRecord]:
        return self._select("i.series_instance_uid = ? ORDER BY i.received_at",
                            (series_instance_uid,))

    def unfinished(self) -> list[InstanceRecord]:
        """Instances acknowledged but not done (state != done), oldest first: resume these."""
        return self._select("i.state != 'done' ORDER BY i.received_at", ())

    def series_count(self, series_instance_uid: str) -> int:
        """Instances recorded for a series (0 if unknown)."""
        with self._lock:
            row = self._db.execute("SELECT instance_count FROM series "
                                   "WHERE series_instance_uid = ?",
                                   (series_instance_uid,)).fetchone()
        return int(row[0]) if row else 0

    def instance_paths(self) -> set[str]:
        """The spool path of every recorded instance (for start-up reconciliation)."""
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT path FROM instances")}

    def query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Rows of a read-only statement (the typed queries in :mod:`edge.jobs.queries`).

        Raises: LedgerError.
        """
        with self._lock:
            try:
                return list(self._db.execute(sql, tuple(args)).fetchall())
            except sqlite3.DatabaseError as exc:
                raise LedgerError(f"ledger: {exc}") from exc

    def _select(self, where: str, args: tuple[object, ...]) -> list[InstanceRecord]:
        sql = ("SELECT i.sop_instance_uid, i.series_instance_uid, i.study_instance_uid, "
               "i.sop_class_uid, i.transfer_syntax_uid, i.path, i.size, i.calling_ae, "
               "i.received_at, i.state, COALESCE(s.modality, '') FROM instances i "
               f"LEFT JOIN series s USING (series_instance_uid) WHERE {where}")
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [InstanceRecord(
            identity=InstanceIdentity(study_instance_uid=r[2], series_instance_uid=r[1],
                                      sop_instance_uid=r[0], sop_class_uid=r[3],
                                      transfer_syntax_uid=r[4], modality=r[10]),
            path=Path(r[5]), size=int(r[6]), calling_ae=r[7], received_at=float(r[8]),
            state=InstanceState(r[9])) for r in rows]

    # -- runs, results, deliveries (filled in by later stages) -------------------------------

    def create_run(self, series_instance_uid: str, pipeline: str, model: str,
                   sop_instance_uid: str | None = None, fingerprint: str | None = None) -> int:
        """Queue a pipeline run; return its id. Raises: OutOfResourcesError, LedgerError."""
        with self._transaction() as db:
            cur = db.execute("INSERT INTO runs (series_instance_uid, sop_instance_uid, pipeline, "
                             "model, created_at, fingerprint) VALUES (?, ?, ?, ?, ?, ?)",
                             (series_instance_uid, sop_instance_uid, pipeline, model, time.time(),
                              fingerprint))
            return int(cur.lastrowid or 0)

    def set_run_state(self, run_id: int, state: RunState | str, error: str | None = None) -> None:
        """Raises: KeyError (unknown run), OutOfResourcesError, LedgerError."""
        state = RunState(state)
        now = time.time()
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE runs SET state = ?, error = ?, "
                "started_at = CASE WHEN ? = 'running' THEN ? ELSE started_at END, "
                "finished_at = CASE WHEN ? IN ('done', 'failed', 'skipped') THEN ? "
                "ELSE finished_at END "
                "WHERE run_id = ?",
                (state.value, error, state.value, now, state.value, now, run_id))
            if cur.rowcount == 0:
                raise KeyError(run_id)

    def add_result(self, run_id: int, kind: str, path: Path,
                   sop_instance_uid: str | None = None) -> int:
        """Record a result file of a run; return its id. Raises: OutOfResourcesError,
        LedgerError (also for an unknown run or kind)."""
        with self._transaction() as db:
            cur = db.execute("INSERT INTO results (run_id, kind, sop_instance_uid, path, "
                             "created_at) VALUES (?, ?, ?, ?, ?)",
                             (run_id, kind, sop_instance_uid, str(path), time.time()))
            return int(cur.lastrowid or 0)

    def add_delivery(self, result_id: int, destination: str) -> int:
        """Queue a result for a destination; return its id. Raises: OutOfResourcesError,
        LedgerError."""
        now = time.time()
        with self._transaction() as db:
            cur = db.execute("INSERT INTO deliveries (result_id, destination, next_attempt_at, "
                             "updated_at) VALUES (?, ?, ?, ?)", (result_id, destination, now, now))
            return int(cur.lastrowid or 0)

    def set_delivery_state(self, delivery_id: int, state: DeliveryState | str,
                           error: str | None = None, next_attempt_at: float | None = None) -> None:
        """Record an attempt's outcome. Raises: KeyError, OutOfResourcesError, LedgerError."""
        state = DeliveryState(state)
        now = time.time()
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE deliveries SET state = ?, last_error = ?, updated_at = ?, "
                "attempts = attempts + CASE WHEN ? = 'sending' THEN 1 ELSE 0 END, "
                "next_attempt_at = COALESCE(?, next_attempt_at) WHERE delivery_id = ?",
                (state.value, error, now, state.value, next_attempt_at, delivery_id))
            if cur.rowcount == 0:
                raise KeyError(delivery_id)

    def result_path(self, result_id: int) -> Path | None:
        """The file of a result, None if the result is unknown."""
        with self._lock:
            row = self._db.execute("SELECT path FROM results WHERE result_id = ?",
                                   (result_id,)).fetchone()
        return Path(row[0]) if row else None

    def delivery(self, delivery_id: int) -> DeliveryRecord | None:
        rows = self._deliveries("d.delivery_id = ?", (delivery_id,))
        return rows[0] if rows else None

    def deliveries(self, *states: DeliveryState | str) -> list[DeliveryRecord]:
        """Deliveries in the given states (all if none given), oldest first."""
        if not states:
            return self._deliveries("1 ORDER BY d.delivery_id", ())
        values = tuple(DeliveryState(s).value for s in states)
        marks = ", ".join("?" * len(values))
        return self._deliveries(f"d.state IN ({marks}) ORDER BY d.delivery_id", values)

    def due_deliveries(self, now: float, limit: int = 1000,
                       destination: str | None = None) -> list[DeliveryRecord]:
        """Pending or failed deliveries whose next attempt is due, in due order; only those
        to ``destination`` when it is given."""
        if destination is None:
            return self._deliveries("d.state IN ('pending', 'failed') AND d.next_attempt_at <= ? "
                                    "ORDER BY d.next_attempt_at, d.delivery_id LIMIT ?",
                                    (now, limit))
        return self._deliveries("d.state IN ('pending', 'failed') AND d.destination = ? AND "
                                "d.next_attempt_at <= ? ORDER BY d.next_attempt_at, "
                                "d.delivery_id LIMIT ?", (destination, now, limit))

    def next_delivery_due(self, destination: str | None = None) -> float | None:
        """The earliest next_attempt_at of pending or failed deliveries (to ``destination``
        when given); None if there are none."""
        where, args = ("", ()) if destination is None else (" AND destination = ?",
                                                             (destination,))
        with self._lock:
            row = self._db.execute("SELECT MIN(next_attempt_at) FROM deliveries "
                                   f"WHERE state IN ('pending', 'failed'){where}",
                                   args).fetchone()
        return None if row[0] is None else float(row[0])

    def open_delivery_destinations(self) -> list[str]:
        """Destinations with pending or failed deliveries, earliest due first."""
        with self._lock:
            rows = self._db.execute("SELECT destination FROM deliveries WHERE state IN "
                                    "('pending', 'failed') GROUP BY destination "
                                    "ORDER BY MIN(next_attempt_at)").fetchall()
        return [str(r[0]) for r in rows]

    def mark_deliveries_sending(self, delivery_ids: Sequence[int]) -> None:
        """Start an attempt on each delivery (state sending, attempts + 1), in one transaction.

        Raises: OutOfResourcesError, LedgerError.
        """
        now = time.time()
        with self._transaction() as db:
            db.executemany("UPDATE deliveries SET state = 'sending', attempts = attempts + 1, "
                           "updated_at = ? WHERE delivery_id = ?",
                           [(now, i) for i in delivery_ids])

    def record_delivery_outcomes(self, updates: Sequence[DeliveryUpdate]) -> None:
        """Record the outcomes of a batch of attempts in one transaction.

        Raises: OutOfResourcesError, LedgerError.
        """
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "UPDATE deliveries SET state = ?, last_error = ?, updated_at = ?, "
                "next_attempt_at = COALESCE(?, next_attempt_at) WHERE delivery_id = ?",
                [(DeliveryState(u.state).value, u.error, now, u.next_attempt_at, u.delivery_id)
                 for u in updates])

    def requeue_interrupted_deliveries(self, error: str) -> int:
        """Make deliveries left in 'sending' (a crash mid-attempt) failed and due now; return
        how many. Raises: OutOfResourcesError, LedgerError."""
        now = time.time()
        with self._transaction() as db:
            cur = db.execute("UPDATE deliveries SET state = 'failed', last_error = ?, "
                             "next_attempt_at = ?, updated_at = ? WHERE state = 'sending'",
                             (error, now, now))
            return cur.rowcount

    def _deliveries(self, where: str, args: tuple[object, ...]) -> list[DeliveryRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_DELIVERY_COLUMNS} WHERE {where}", args).fetchall()
        return [DeliveryRecord(delivery_id=int(r[0]), result_id=int(r[1]), destination=r[2],
                               path=Path(r[3]), state=DeliveryState(r[4]), attempts=int(r[5]),
                               next_attempt_at=float(r[6]), last_error=r[7],
                               updated_at=float(r[8])) for r in rows]

    # -- retention ---------------------------------------------------------------------------

    def done_instances(self, received_before: float | None = None) -> list[InstanceRecord]:
        """Done instances, oldest first; only those received before the given time if set."""
        if received_before is None:
            return self._select("i.state = 'done' ORDER BY i.received_at", ())
        return self._select("i.state = 'done' AND i.received_at < ? ORDER BY i.received_at",
                            (received_before,))

    def forget_instance(self, sop_instance_uid: str) -> None:
        """Delete an instance's row (after its file was removed). Raises: LedgerError."""
        with self._transaction() as db:
            db.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))


@dataclass(frozen=True)
class CleanupReport:
    removed: int
    freed_bytes: int


def cleanup(spool: Spool, ledger: Ledger, max_age_s: float, min_free_bytes: int) -> CleanupReport:
    """Remove done instances older than ``max_age_s``, then the oldest done ones while free
    space is under ``min_free_bytes``. Unfinished instances are never removed.

    Raises:
        OutOfResourcesError, LedgerError: the ledger cannot be updated.
    """
    removed = freed = 0

    def drop(record: InstanceRecord) -> None:
        nonlocal removed, freed
        spool.remove(record.path)
        ledger.forget_instance(record.identity.sop_instance_uid)
        removed += 1
        freed += record.size

    for record in ledger.done_instances(received_before=time.time() - max_age_s):
        drop(record)
    if spool.free_bytes() < min_free_bytes:
        for record in ledger.done_instances():
            if spool.free_bytes() >= min_free_bytes:
                break
            drop(record)
    return CleanupReport(removed, freed)
