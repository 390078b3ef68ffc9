"""The one place where errors become DIMSE statuses and association rejections.

C-STORE statuses are those of PS3.4 Section B.2.3 (Table B.2-1); the general failure
0110 (Processing failure) is from PS3.7 Annex C. A-ASSOCIATE-RJ result/source/reason codes are
those of PS3.8 Section 9.3.4 (Table 9-21).
"""

from __future__ import annotations

import enum
import errno
import logging
from dataclasses import dataclass

from edge.core.errors import QueueFullError
from edge.ingest.spool import OutOfResourcesError
from edge.ingest.uids import DatasetMismatchError, InvalidUidError, UnreadableDatasetError

LOG = logging.getLogger(__name__)


class Status(enum.IntEnum):
    """C-STORE response statuses this SCP sends."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # PS3.4 B.2.3: Refused, out of resources
    DATASET_MISMATCH = 0xA900  # PS3.4 B.2.3: Error, data set does not match SOP class
    CANNOT_UNDERSTAND = 0xC000  # PS3.4 B.2.3: Error, cannot understand
    PROCESSING_FAILURE = 0x0110  # PS3.7 Annex C: general processing failure


_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


def status_for(exc: BaseException) -> Status:
    """The C-STORE status for an exception raised while storing one instance."""
    if isinstance(exc, (OutOfResourcesError, QueueFullError, MemoryError)):
        return Status.OUT_OF_RESOURCES
    if isinstance(exc, OSError) and exc.errno in _OUT_OF_SPACE:
        return Status.OUT_OF_RESOURCES
    if isinstance(exc, (InvalidUidError, DatasetMismatchError)):
        return Status.DATASET_MISMATCH
    if isinstance(exc, UnreadableDatasetError):
        return Status.CANNOT_UNDERSTAND
    return Status.PROCESSING_FAILURE


def failure_status(exc: BaseException, calling_ae: str, sop_instance_uid: str) -> Status:
    """Map ``exc`` to a status and log one line naming the peer and UID (no patient data).

    Expected refusals log a warning; anything unexpected logs an error with its traceback.
    """
    status = status_for(exc)
    uid = sop_instance_uid if _printable_uid(sop_instance_uid) else "<invalid uid>"
    if status is Status.PROCESSING_FAILURE:
        LOG.error("C-STORE from %s of %s failed (0x%04X): %s", calling_ae, uid, status,
                  type(exc).__name__, exc_info=exc)
    else:
        LOG.warning("C-STORE from %s of %s refused (0x%04X): %s", calling_ae, uid, status, exc)
    return status


def _printable_uid(value: str) -> bool:
    return len(value) <= 64 and all(c.isdigit() or c == "." for c in value)


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ: result (1 permanent, 2 transient), source and reason (PS3.8 9.3.4)."""

    result: int
    source: int
    reason: int
    label: str  # for logs and metrics


CALLING_AE_NOT_RECOGNIZED = Rejection(0x01, 0x01, 0x03, "calling_ae_not_recognized")
CALLED_AE_NOT_RECOGNIZED = Rejection(0x01, 0x01, 0x07, "called_ae_not_recognized")
#: Spool under its watermark: transient, presentation-related, temporary congestion.
OUT_OF_SPACE = Rejection(0x02, 0x03, 0x01, "out_of_space")
TOO_MANY_ASSOCIATIONS = Rejection(0x02, 0x03, 0x02, "too_many_associations")
