"""Ingest: the first stage. A DICOM storage SCP that validates, spools (fsync), records, answers.

This package imports only :mod:`edge.core`. What it needs from later stages comes in as
arguments typed by the small protocols below (the ledger in :mod:`edge.jobs` satisfies
:class:`InstanceRecorder`), so ingest never imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edge.ingest.uids import InstanceIdentity


@dataclass(frozen=True)
class ReceivedInstance:
    """One instance safely on disk: what the recorder is given before the C-STORE answer."""

    identity: InstanceIdentity
    path: Path
    size: int
    calling_ae: str
    received_at: float  # time.time()
    priority: int = 0  # the C-STORE request's Priority (PS3.7 9.1.1.1.5): 0 MEDIUM, 1 HIGH, 2 LOW
    move_originator_ae: str = ""  # Move Originator AE Title, when a C-MOVE caused the store


@dataclass(frozen=True)
class AssociationClosed:
    """An association ended; the series it delivered instances for (series completion hook)."""

    calling_ae: str
    series_instance_uids: tuple[str, ...]
    study_instance_uids: tuple[str, ...]
    instances: int
    released: bool  # False: aborted or the connection dropped


class InstanceRecorder(Protocol):
    """Records a received instance durably (the jobs ledger)."""

    def record_instance(self, instance: ReceivedInstance) -> bool:
        """Record ``instance``; return False if its SOPInstanceUID was already recorded.

        Raises:
            OutOfResourcesError: the ledger cannot take more (full disk, busy too long).
        """
        ...


#: Called from the association's thread when it ends; must not block for long.
ReleaseCallback = Callable[[AssociationClosed], None]

__all__ = ["AssociationClosed", "InstanceIdentity", "InstanceRecorder", "ReceivedInstance",
           "ReleaseCallback"]
