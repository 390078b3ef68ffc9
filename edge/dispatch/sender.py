"""C-STORE SCU: send result files as they are, one association per batch.

Each file is proposed with its own SOP Class and its own Transfer Syntax (nothing is
transcoded); an uncompressed file also gets an Explicit VR Little Endian context as a fallback,
the one syntax every SCP must accept (PS3.5 10.1). Files go out straight from disk with
pynetdicom's chunked sending (no decode, no re-encode). ``TCP_NODELAY`` is set on the socket as
soon as it connects: without it a C-STORE waits on Nagle's algorithm (about 20 images/s).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context

from edge.core.config import DispatchSettings
from edge.core.tls import client_context
from edge.dispatch.destination import Destination
from edge.dispatch.responses import install
from edge.dispatch.retry import LocalStatus

LOG = logging.getLogger(__name__)

#: PS3.8 9.3.1: at most 128 presentation contexts (odd IDs 1-255) in one association.
MAX_CONTEXTS = 128

# Send a file given by path from disk in chunks, without decoding it. A process-wide pynetdicom
# switch; it only changes send_c_store() called with a path, which nothing else here does.
_config.STORE_SEND_CHUNKED_DATASET = True


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one file: the peer's C-STORE status, or a :class:`LocalStatus`."""

    path: Path
    sop_instance_uid: str  # "" when the file could not be read
    status: int
    error: str = ""  # empty on success; the reason otherwise (for logs and the ledger)


@dataclass(frozen=True)
class _Item:
    path: Path
    sop_class_uid: UID
    sop_instance_uid: str
    transfer_syntax_uid: UID


def _read_item(path: Path) -> _Item | StoreOutcome:
    try:
        meta = read_file_meta_info(path)
        return _Item(path, UID(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                     UID(meta.TransferSyntaxUID))
    except (OSError, InvalidDicomError, AttributeError, ValueError) as exc:
        return StoreOutcome(path, "", LocalStatus.UNREADABLE_FILE,
                            f"cannot read file meta of {path}: {exc}")


def _contexts(items: Sequence[_Item]) -> list[PresentationContext]:
    pairs: dict[tuple[str, str], None] = {}
    for item in items:
        pairs[(item.sop_class_uid, item.transfer_syntax_uid)] = None
        if not item.transfer_syntax_uid.is_compressed:
            pairs[(item.sop_class_uid, ExplicitVRLittleEndian)] = None
    return [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]


def _batches(items: Sequence[_Item]) -> list[list[_Item]]:
    """Split so that no association needs more than MAX_CONTEXTS contexts."""
    batches: list[list[_Item]] = [[]]
    for item in items:
        if len(_contexts([*batches[-1], item])) > MAX_CONTEXTS:
            batches.append([])
        batches[-1].append(item)
    return [batch for batch in batches if batch]


def _set_nodelay(event: evt.Event) -> None:
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class DicomSender:
    """Storage SCU for :class:`Destination` peers. Safe to use from several threads at once:
    each thread gets its own pynetdicom AE (the delivery worker sends to each destination
    from its own thread)."""

    def __init__(self, settings: DispatchSettings,
                 evt_handlers: Sequence[tuple[Any, ...]] = ()) -> None:
        """``evt_handlers``: extra pynetdicom ``(event, handler[, args])`` bindings for each
        association (metrics, tests); they run after this sender's own.

        Raises:
            ConfigError: ``dispatch.tls`` names a missing or invalid file (the message names
                the key).
        """
        self.settings = settings
        self._ssl = client_context(settings.tls, "dispatch.tls")  # None: plain TCP
        self._local = threading.local()
        self._handlers: list[Any] = [(evt.EVT_CONN_OPEN, _set_nodelay), *evt_handlers]

    def _ae(self) -> AE:
        """This thread's application entity."""
        ae: AE | None = getattr(self._local, "ae", None)
        if ae is None:
            settings = self.settings
            ae = AE(ae_title=settings.ae_title)
            ae.connection_timeout = settings.connection_timeout_s
            ae.acse_timeout = settings.acse_timeout_s
            ae.dimse_timeout = settings.dimse_timeout_s
            ae.network_timeout = settings.network_timeout_s
            self._local.ae = ae
        return ae

    def send(self, paths: Sequence[Path], destination: Destination) -> tuple[StoreOutcome, ...]:
        """C-STORE each file to ``destination``; one outcome per path, in order.

        Never raises for network or peer failures: those become outcomes (a failed association
        gives every file of its batch :attr:`LocalStatus.NO_ASSOCIATION`).
        """
        read = [_read_item(Path(p)) for p in paths]
        items = [r for r in read if isinstance(r, _Item)]
        results: dict[Path, list[StoreOutcome]] = {}
        for batch in _batches(items):
            for outcome in self._send_batch(batch, destination):
                results.setdefault(outcome.path, []).append(outcome)
        return tuple(r if isinstance(r, StoreOutcome) else results[r.path].pop(0) for r in read)

    def _send_batch(self, items: list[_Item], destination: Destination) -> list[StoreOutcome]:
        assoc = self._ae().associate(destination.host, destination.port, _contexts(items),
                                   ae_title=destination.ae_title, max_pdu=self.settings.max_pdu,
                                   evt_handlers=self._handlers,
                                   tls_args=None if self._ssl is None
                                   else (self._ssl, destination.host))
        if not assoc.is_established:
            status = LocalStatus.NO_ASSOCIATION
            error = f"no association with {destination}: {_why(assoc)}"
            if assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
                status = LocalStatus.NO_CONTEXT  # pynetdicom aborts when none was accepted
                error = f"{destination} accepted none of the proposed presentation contexts"
            LOG.warning("%s", error)
            return [StoreOutcome(i.path, i.sop_instance_uid, status, error) for i in items]
        install(assoc)  # a dropped connection ends the wait for a response at once
        try:
            return [self._store(assoc, item, destination) for item in items]
        finally:
            if assoc.is_established:
                assoc.release()
            else:
                assoc.abort()

    def _store(self, assoc: Association, item: _Item, destination: Destination) -> StoreOutcome:
        def outcome(status: int, error: str) -> StoreOutcome:
            return StoreOutcome(item.path, item.sop_instance_uid, status, error)

        if not assoc.is_established:
            return outcome(LocalStatus.NO_ASSOCIATION, f"association with {destination} ended: "
                                                      f"{_why(assoc)}")
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0])
                    for cx in assoc.accepted_contexts}
        if (item.sop_class_uid, item.transfer_syntax_uid) in accepted:
            dataset: Path | Any = item.path  # as-is from disk
        elif (not item.transfer_syntax_uid.is_compressed
              and (item.sop_class_uid, ExplicitVRLittleEndian) in accepted):
            dataset = dcmread(item.path)  # pynetdicom re-encodes uncompressed data
        else:
            return outcome(LocalStatus.NO_CONTEXT,
                          f"{destination} accepted no presentation context for "
                          f"{item.sop_class_uid.name} in {item.transfer_syntax_uid.name}")
        try:
            response = assoc.send_c_store(dataset)
        except (OSError, ValueError, AttributeError, RuntimeError) as exc:
            return outcome(LocalStatus.NO_ASSOCIATION, f"C-STORE to {destination} failed: {exc}")
        status = getattr(response, "Status", None)
        if status is None:  # no response: DIMSE timeout, abort or invalid response
            return outcome(LocalStatus.NO_ASSOCIATION,
                          f"no C-STORE response from {destination}: {_why(assoc)}")
        if status == 0x0000:
            return outcome(0, "")
        comment = getattr(response, "ErrorComment", "") or ""
        return outcome(int(status), f"{destination} answered 0x{int(status):04X}"
                                   + (f": {comment}" if comment else ""))


def _why(assoc: Association) -> str:
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        if rj is None:
            return "association rejected"
        return (f"association rejected ({rj.result_str}, source {rj.source_str}, "
                f"reason {rj.reason_str}; PS3.8 9.3.4)")
    if assoc.is_aborted:
        return "association aborted"
    return "connection refused, timed out or closed"
