"""The ``mededge.v1.DicomJobs`` servicer: submit instances, watch results, ask about jobs.

Thin: requests are checked (``InvalidInputError`` naming the field for bad input, mapped to
INVALID_ARGUMENT by :mod:`edge.api.errors`), the work is the orchestrator's (submission takes
the C-STORE path: validate, spool with fsync, ledger) and the ledger's (job queries). An unknown
series raises :class:`~edge.jobs.queries.SeriesNotFoundError` (NOT_FOUND).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator

import grpc

from edge.core.errors import InvalidInputError
from edge.ingest import AssociationClosed
from edge.ingest.uids import is_valid_uid
from edge.jobs import queries
from edge.jobs.ledger import SeriesState
from edge.pipeline.events import ResultEvent, ResultState, WatchFilter
from edge.pipeline.orchestrator import Orchestrator
from edge.protos.mededge.v1 import jobs_pb2, jobs_pb2_grpc

LOG = logging.getLogger(__name__)
SERVICE_NAME = jobs_pb2.DESCRIPTOR.services_by_name["DicomJobs"].full_name
DEFAULT_CALLING_AE = "GRPC"
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2 VR AE: no backslash
_WATCH_POLL_S = 0.5
_STATES = {ResultState.WRITTEN: jobs_pb2.ResultEvent.WRITTEN,
           ResultState.DELIVERED: jobs_pb2.ResultEvent.DELIVERED,
           ResultState.DEAD: jobs_pb2.ResultEvent.DEAD}


def _uid_field(value: str, name: str) -> str:
    """Raises: InvalidInputError naming the field."""
    if value and not is_valid_uid(value):
        raise InvalidInputError(f"{name}: not a valid UID")
    return value


def event_proto(event: ResultEvent) -> jobs_pb2.ResultEvent:
    return jobs_pb2.ResultEvent(
        study_instance_uid=event.study_instance_uid,
        series_instance_uid=event.series_instance_uid, model=event.model,
        version=event.version, kind=event.kind, result_sop_instance_uid=event.sop_instance_uid,
        state=_STATES[event.state], destination=event.destination,
        has_classification=event.probability is not None,
        probability=event.probability or 0.0, positive=bool(event.positive),
        volumes_ml=dict(event.volumes_ml), error=event.error, time_unix_s=time.time(),
        nodules=[jobs_pb2.Nodule(label=n.label, score=n.score, diameter_mm=n.diameter_mm,
                                 center_voxel=list(n.center_voxel),
                                 center_mm=list(n.center_mm or ()),
                                 sop_instance_uid=n.sop_instance_uid, box=list(n.box))
                 for n in event.nodules])


def job_proto(ledger_record: queries.SeriesRecord, orchestrator: Orchestrator,
              details: bool) -> jobs_pb2.JobStatus:
    """A JobStatus; with ``details`` its runs, results and deliveries. Raises: LedgerError."""
    r = ledger_record
    job = jobs_pb2.JobStatus(
        series_instance_uid=r.series_instance_uid, study_instance_uid=r.study_instance_uid,
        modality=r.modality, state=r.state.value, instances_received=r.instance_count,
        first_received_unix_s=r.first_received_at, last_received_unix_s=r.last_received_at)
    if not details:
        return job
    ledger, uid = orchestrator.ledger, r.series_instance_uid
    job.runs.extend(jobs_pb2.RunStatus(
        run_id=run.run_id, sop_instance_uid=run.sop_instance_uid or "", pipeline=run.pipeline,
        model=run.model, state=run.state.value, reason=run.error or "",
        created_unix_s=run.created_at, finished_unix_s=run.finished_at or 0.0)
        for run in queries.series_runs(ledger, uid))
    job.results.extend(jobs_pb2.ResultStatus(
        result_id=res.result_id, run_id=res.run_id, kind=res.kind,
        sop_instance_uid=res.sop_instance_uid or "", created_unix_s=res.created_at)
        for res in queries.series_results(ledger, uid))
    job.deliveries.extend(jobs_pb2.DeliveryStatus(
        delivery_id=d.delivery_id, result_id=d.result_id, kind=d.kind,
        destination=d.destination, state=d.state.value, attempts=d.attempts,
        last_error=d.last_error or "", next_attempt_unix_s=d.next_attempt_at,
        updated_unix_s=d.updated_at) for d in queries.series_deliveries(ledger, uid))
    return job


class JobsServicer(jobs_pb2_grpc.DicomJobsServicer):
    """Serves ``mededge.v1.DicomJobs`` on the orchestrator ``orchestrator()`` returns (it
    exists once the service has started, before the gRPC port opens)."""

    def __init__(self, orchestrator: Callable[[], Orchestrator | None]) -> None:
        self._orchestrator = orchestrator

    def _get(self) -> Orchestrator:
        orchestrator = self._orchestrator()
        if orchestrator is None:  # the server wires this only with the DICOM path running
            raise RuntimeError("the DICOM path is not running")
        return orchestrator

    def SubmitInstances(self, request_iterator: Iterator[jobs_pb2.SubmitInstanceRequest],
                        context: grpc.ServicerContext) -> jobs_pb2.SubmitSummary:
        """Raises: InvalidInputError (empty dicom_file, bad calling_ae or priority)."""
        orchestrator = self._get()
        summary = jobs_pb2.SubmitSummary()
        series: dict[str, str] = {}  # series -> study, for the release at the stream's end
        calling_ae, released = DEFAULT_CALLING_AE, False
        try:
            for index, request in enumerate(request_iterator):
                if not request.dicom_file:
                    raise InvalidInputError(f"dicom_file: empty in message {index}")
                calling_ae = request.calling_ae.strip() or DEFAULT_CALLING_AE
                if not _AE_TITLE.match(calling_ae):
                    raise InvalidInputError("calling_ae: 1-16 characters of the default "
                                            "repertoire, no backslash (VR AE)")
                if request.priority > 2:
                    raise InvalidInputError("priority: 0 (MEDIUM), 1 (HIGH) or 2 (LOW)")
                outcome = orchestrator.submit_instance(request.dicom_file, calling_ae,
                                                       request.priority)
                summary.instances.append(jobs_pb2.InstanceOutcome(
                    index=index, sop_instance_uid=outcome.sop_instance_uid,
                    series_instance_uid=outcome.series_instance_uid, status=outcome.status,
                    message=outcome.message))
                if outcome.status == 0:
                    summary.stored += 1
                    series[outcome.series_instance_uid] = outcome.study_instance_uid
                else:
                    summary.failed += 1
            released = True
        finally:
            if series:
                orchestrator.on_release(AssociationClosed(
                    calling_ae, tuple(series), tuple(dict.fromkeys(series.values())),
                    summary.stored, released))
        return summary

    def WatchResults(self, request: jobs_pb2.WatchRequest, context: grpc.ServicerContext
                     ) -> Iterator[jobs_pb2.ResultEvent]:
        """Raises: InvalidInputError (a UID filter that is not a UID)."""
        where = WatchFilter(
            _uid_field(request.study_instance_uid, "study_instance_uid"),
            _uid_field(request.series_instance_uid, "series_instance_uid"))
        subscription = self._get().feed.subscribe(where)
        context.add_callback(subscription.close)  # the caller cancelled or the server stops
        try:
            while context.is_active() and not subscription.closed:
                event = subscription.get(timeout=_WATCH_POLL_S)
                if event is not None:
                    yield event_proto(event)
        finally:
            subscription.close()

    def GetJob(self, request: jobs_pb2.GetJobRequest, context: grpc.ServicerContext
               ) -> jobs_pb2.JobStatus:
        """Raises: InvalidInputError, SeriesNotFoundError, LedgerError."""
        uid = request.series_instance_uid
        if not uid:
            raise InvalidInputError("series_instance_uid: required")
        _uid_field(uid, "series_instance_uid")
        orchestrator = self._get()
        return job_proto(queries.series(orchestrator.ledger, uid), orchestrator, True)

    def ListJobs(self, request: jobs_pb2.ListJobsRequest, context: grpc.ServicerContext
                 ) -> jobs_pb2.ListJobsResponse:
        """Raises: InvalidInputError (unknown state), LedgerError."""
        states = [s.value for s in SeriesState]
        if request.state and request.state not in states:
            raise InvalidInputError(f"state: {request.state!r} is not one of {states}")
        orchestrator = self._get()
        records = queries.list_series(orchestrator.ledger, request.state or None,
                                      request.since_unix_s or None, request.limit or 100)
        return jobs_pb2.ListJobsResponse(
            jobs=[job_proto(r, orchestrator, request.details) for r in records])


def add_to_server(servicer: JobsServicer, server: grpc.Server) -> None:
    jobs_pb2_grpc.add_DicomJobsServicer_to_server(servicer, server)
