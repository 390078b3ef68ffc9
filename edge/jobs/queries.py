"""Read-only views of the ledger by series: its runs, results and deliveries, and job listings.

What the jobs API (``GetJob``, ``ListJobs``) and the orchestrator's idempotency check read.
Every function takes the :class:`~edge.jobs.ledger.Ledger` and returns frozen records; none
writes. Raises :class:`~edge.jobs.ledger.LedgerError` when the database cannot be read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.core.errors import MededgeError
from edge.jobs.ledger import DeliveryState, Ledger, RunState, SeriesState


class SeriesNotFoundError(MededgeError):
    """No series with that Series Instance UID is in the ledger."""


@dataclass(frozen=True)
class SeriesRecord:
    """One series row."""

    series_instance_uid: str
    study_instance_uid: str
    modality: str
    instance_count: int
    state: SeriesState
    first_received_at: float
    last_received_at: float


@dataclass(frozen=True)
class RunRecord:
    """One run: series-level (``sop_instance_uid`` None) or the reason an instance has none."""

    run_id: int
    series_instance_uid: str
    sop_instance_uid: str | None
    pipeline: str
    model: str
    state: RunState
    created_at: float
    finished_at: float | None
    error: str | None


@dataclass(frozen=True)
class ResultRecord:
    """One result object of a run."""

    result_id: int
    run_id: int
    kind: str  # seg / sr / json
    sop_instance_uid: str | None
    path: Path
    created_at: float


@dataclass(frozen=True)
class SeriesDelivery:
    """One delivery of a result of the series."""

    delivery_id: int
    result_id: int
    kind: str
    destination: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_error: str | None
    updated_at: float


_SERIES = ("SELECT series_instance_uid, study_instance_uid, modality, instance_count, state, "
           "first_received_at, last_received_at FROM series")


def _series(row: tuple[Any, ...]) -> SeriesRecord:
    return SeriesRecord(str(row[0]), str(row[1]), str(row[2]), int(row[3]),
                        SeriesState(row[4]), float(row[5]), float(row[6]))


def series(ledger: Ledger, series_instance_uid: str) -> SeriesRecord:
    """The series row.

    Raises: SeriesNotFoundError, LedgerError.
    """
    rows = ledger.query(f"{_SERIES} WHERE series_instance_uid = ?", (series_instance_uid,))
    if not rows:
        raise SeriesNotFoundError(f"series_instance_uid {series_instance_uid!r} is not known")
    return _series(rows[0])


def list_series(ledger: Ledger, state: SeriesState | str | None = None,
                since: float | None = None, limit: int = 100) -> list[SeriesRecord]:
    """Series newest first (by last instance received), optionally in one state and with an
    instance received at or after ``since`` (``time.time()`` seconds).

    Raises: ValueError (an unknown state or a limit under 1), LedgerError.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    where: list[str] = []
    args: list[object] = []
    if state:
        where.append("state = ?")
        args.append(SeriesState(state).value)
    if since is not None:
        where.append("last_received_at >= ?")
        args.append(since)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    rows = ledger.query(f"{_SERIES}{clause} ORDER BY last_received_at DESC LIMIT ?",
                        (*args, limit))
    return [_series(r) for r in rows]


def series_runs(ledger: Ledger, series_instance_uid: str) -> list[RunRecord]:
    """Runs of the series, oldest first. Raises: LedgerError."""
    rows = ledger.query(
        "SELECT run_id, series_instance_uid, sop_instance_uid, pipeline, model, state, "
        "created_at, finished_at, error FROM runs WHERE series_instance_uid = ? "
        "ORDER BY run_id", (series_instance_uid,))
    return [RunRecord(int(r[0]), str(r[1]), None if r[2] is None else str(r[2]),
                      str(r[3]), str(r[4]), RunState(r[5]), float(r[6]),
                      None if r[7] is None else float(r[7]),
                      None if r[8] is None else str(r[8])) for r in rows]


def series_results(ledger: Ledger, series_instance_uid: str) -> list[ResultRecord]:
    """Result objects of the series' runs, oldest first. Raises: LedgerError."""
    rows = ledger.query(
        "SELECT s.result_id, s.run_id, s.kind, s.sop_instance_uid, s.path, s.created_at "
        "FROM results s JOIN runs r USING (run_id) WHERE r.series_instance_uid = ? "
        "ORDER BY s.result_id", (series_instance_uid,))
    return [ResultRecord(int(r[0]), int(r[1]), str(r[2]),
                         None if r[3] is None else str(r[3]), Path(str(r[4])),
                         float(r[5])) for r in rows]


def series_deliveries(ledger: Ledger, series_instance_uid: str) -> list[SeriesDelivery]:
    """Deliveries of the series' results, oldest first. Raises: LedgerError."""
    rows = ledger.query(
        "SELECT d.delivery_id, d.result_id, s.kind, d.destination, d.state, d.attempts, "
        "d.next_attempt_at, d.last_error, d.updated_at FROM deliveries d "
        "JOIN results s USING (result_id) JOIN runs r USING (run_id) "
        "WHERE r.series_instance_uid = ? ORDER BY d.delivery_id", (series_instance_uid,))
    return [SeriesDelivery(int(r[0]), int(r[1]), str(r[2]), str(r[3]),
                           DeliveryState(r[4]), int(r[5]), float(r[6]),
                           None if r[7] is None else str(r[7]), float(r[8]))
            for r in rows]


def open_deliveries(ledger: Ledger, series_instance_uid: str) -> int:
    """Deliveries of the series not yet done or dead. Raises: LedgerError."""
    rows = ledger.query(
        "SELECT COUNT(*) FROM deliveries d JOIN results s USING (result_id) "
        "JOIN runs r USING (run_id) WHERE r.series_instance_uid = ? "
        "AND d.state NOT IN ('done', 'dead')", (series_instance_uid,))
    return int(rows[0][0])


def pipeline_done(ledger: Ledger, series_instance_uid: str, pipeline: str,
                  fingerprint: str) -> bool:
    """Whether a run of ``pipeline`` on the series with this fingerprint (same models, same
    instances) finished ``done``: its results are recorded and their deliveries queued.

    Raises: LedgerError.
    """
    rows = ledger.query(
        "SELECT 1 FROM runs WHERE series_instance_uid = ? AND pipeline = ? AND fingerprint = ? "
        "AND state = 'done' AND sop_instance_uid IS NULL LIMIT 1",
        (series_instance_uid, pipeline, fingerprint))
    return bool(rows)
