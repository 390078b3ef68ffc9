"""Start-up reconciliation: the fsync'd spool is the durable record of what was acknowledged.

The ledger commits with ``synchronous=NORMAL``, so power loss may drop its last commits while
the spool files they described are on disk (each was fsync'd before its C-STORE success). Run
:func:`reconcile` at start-up, before the listener accepts: it finishes interrupted renames
(:meth:`Spool.open`) and records every spool file the ledger does not know, reading its
identity from the file itself. See docs/dicom.md, "Durability order".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from edge.ingest import ReceivedInstance
from edge.ingest.spool import Spool
from edge.ingest.uids import InstanceIdentity
from edge.jobs.ledger import Ledger

LOG = logging.getLogger(__name__)
_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"]


@dataclass(frozen=True)
class ReconcileReport:
    """What start-up reconciliation found and did."""

    spool_files: int
    promoted: int  # interrupted renames finished by the spool
    recorded: int  # spool files the ledger had lost, now recorded
    unreadable: int  # files under a final name whose identity could not be read (kept)
    missing_files: int  # ledger rows whose file is gone


def _identity(path: Path) -> tuple[InstanceIdentity, str]:
    """(identity, source AE title) read from a spooled file's meta and header.

    Raises:
        Exception: whatever pydicom or UID validation raises for a bad file.
    """
    ds = dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
    meta = ds.file_meta
    identity = InstanceIdentity.from_dataset(ds, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                             str(meta.TransferSyntaxUID))
    return identity, str(meta.get("SourceApplicationEntityTitle", "") or "").strip()


def reconcile(spool: Spool, ledger: Ledger) -> ReconcileReport:
    """Repair the spool, then record each spool file missing from the ledger.

    A recovered row gets the file's modification time as ``received_at`` and the file meta's
    Source AE Title as ``calling_ae``. Files that cannot be read are kept and logged.

    Raises:
        OSError: the spool cannot be read or repaired.
        OutOfResourcesError, LedgerError: the ledger cannot be written.
    """
    recovery = spool.open().recovered
    known = ledger.instance_paths()
    files = recorded = unreadable = 0
    seen: set[str] = set()
    for path in spool.files():
        files += 1
        seen.add(str(path))
        if str(path) in known:
            continue
        try:
            identity, calling_ae = _identity(path)
            if spool.path_for(identity) != path:
                raise ValueError("UIDs in the file do not match its spool path")
        except Exception as exc:  # a bad file must not stop start-up; it is kept for a human
            LOG.error("spool file %s cannot be recorded: %s", path.name, exc)
            unreadable += 1
            continue
        stat = path.stat()
        if ledger.record_instance(ReceivedInstance(identity, path, stat.st_size, calling_ae,
                                                   stat.st_mtime)):
            recorded += 1
    missing = len(known - seen)
    if recorded or missing or unreadable:
        LOG.warning("reconcile: %d spool files recorded again, %d unreadable, %d ledger rows "
                    "without a file", recorded, unreadable, missing)
    return ReconcileReport(files, len(recovery.promoted), recorded, unreadable, missing)
