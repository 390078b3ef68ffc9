"""Intake: acknowledged instances become tasks for the pipeline.

:class:`PipelineRecorder` is the listener's :class:`~edge.ingest.InstanceRecorder` (the ledger
first, then the pipeline is told, without blocking the association's thread);
:func:`submit_part10` takes a Part 10 file from the gRPC ``SubmitInstances`` stream through the
same durable path (validate, spool with fsync, ledger, queue).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edge.ingest import ReceivedInstance
from edge.ingest.listener import file_meta
from edge.ingest.part10 import read_part10
from edge.ingest.spool import Spool
from edge.ingest.statuses import Status, failure_status
from edge.jobs.ledger import Ledger
from edge.routing.series import DimsePriority


@dataclass(frozen=True)
class SubmitOutcome:
    """The answer to one submitted Part 10 file: a C-STORE status (PS3.4 B.2.3)."""

    sop_instance_uid: str  # "" when it could not be read
    series_instance_uid: str
    study_instance_uid: str
    status: int
    message: str = ""
    duplicate: bool = False


@dataclass(frozen=True)
class InstanceTask:
    """One acknowledged instance to process."""

    sop_instance_uid: str
    series_instance_uid: str
    path: Path
    calling_ae: str
    received_at: float  # time.time()
    priority: int = DimsePriority.MEDIUM  # the C-STORE request's Priority


class TaskSink(Protocol):
    """Where acknowledged instances go (the orchestrator)."""

    def received(self, task: InstanceTask, new: bool) -> None: ...


class PipelineRecorder:
    """The listener's :class:`~edge.ingest.InstanceRecorder`: the ledger first, then the
    pipeline is told (non-blocking)."""

    def __init__(self, ledger: Ledger, sink: TaskSink) -> None:
        self._ledger = ledger
        self._sink = sink

    def record_instance(self, instance: ReceivedInstance) -> bool:
        """Raises: OutOfResourcesError, LedgerError (from the ledger; nothing is queued)."""
        new = self._ledger.record_instance(instance)
        ident = instance.identity
        self._sink.received(InstanceTask(
            ident.sop_instance_uid, ident.series_instance_uid, instance.path,
            instance.calling_ae, instance.received_at, instance.priority), new)
        return new


def submit_part10(spool: Spool, recorder: PipelineRecorder, data: bytes | memoryview,
                  calling_ae: str, priority: int = DimsePriority.MEDIUM) -> SubmitOutcome:
    """Take one Part 10 file through the C-STORE path: validate, spool (fsync), record in the
    ledger, queue. A success is only returned once the file is durable and recorded; failures
    are returned as the C-STORE status the listener would send, with a message. Never raises.
    """
    uid = series = study = ""
    try:
        part = read_part10(data)
        ident = part.identity
        uid, series, study = (ident.sop_instance_uid, ident.series_instance_uid,
                              ident.study_instance_uid)
        stored = spool.store(ident, file_meta(ident, calling_ae),
                             memoryview(data)[part.dataset_offset:])
        new = recorder.record_instance(ReceivedInstance(
            ident, stored.path, stored.size, calling_ae, time.time(), priority))
    except Exception as exc:  # every failure becomes a status, in edge.ingest.statuses
        status = failure_status(exc, calling_ae, uid)
        return SubmitOutcome(uid, series, study, int(status), str(exc) or type(exc).__name__)
    return SubmitOutcome(uid, series, study, int(Status.SUCCESS),
                         "" if new else "already received", duplicate=not new)
