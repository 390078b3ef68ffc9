"""Dispatch: the last stage. Results go to DICOM destinations (C-STORE SCU), durably.

:class:`DeliveryWorker` drains the ledger's ``deliveries`` table through a :class:`DicomSender`,
retrying transient failures with a :class:`RetryPolicy` and dead-lettering permanent ones.
See ``docs/dispatch.md``.
"""

from edge.dispatch.destination import Destination
from edge.dispatch.retry import LocalStatus, RetryPolicy, Verdict, classify
from edge.dispatch.sender import DicomSender, StoreOutcome
from edge.dispatch.worker import DeliveryWorker

__all__ = ["DeliveryWorker", "Destination", "DicomSender", "LocalStatus", "RetryPolicy",
           "StoreOutcome", "Verdict", "classify"]
