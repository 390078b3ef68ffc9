"""The DICOM listener: a pynetdicom storage SCP that validates, spools, records and answers.

The C-STORE handler is thin (validate the UIDs, write the bytes as they arrived, record, return
a status); decoding and inference happen in later stages, off the association's thread. Its
dependencies (the recorder, the release callback, the counters) are passed in.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, cast

import pydicom.uid as tsuid
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    evt,
    sop_class,
)
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ASSOCIATE, A_RELEASE

from edge.core.config import Settings
from edge.core.tls import server_context
from edge.ingest import AssociationClosed, InstanceRecorder, ReceivedInstance, ReleaseCallback
from edge.ingest.header import scan_identity
from edge.ingest.peers import PeerPolicy
from edge.ingest.reactor import EventDrivenServer
from edge.ingest.spool import Spool
from edge.ingest.stats import IngestStats
from edge.ingest.statuses import (
    OUT_OF_SPACE,
    TOO_MANY_ASSOCIATIONS,
    Rejection,
    Status,
    failure_status,
)
from edge.ingest.uids import InstanceIdentity, UnreadableDatasetError

LOG = logging.getLogger(__name__)
VERIFICATION = "1.2.840.10008.1.1"  # PS3.4 Annex A

#: Image storage SOP classes accepted (PS3.4 Annex B.5).
STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(str(getattr(sop_class, name)) for name in (
    "CTImageStorage", "EnhancedCTImageStorage", "LegacyConvertedEnhancedCTImageStorage",
    "MRImageStorage", "EnhancedMRImageStorage", "EnhancedMRColorImageStorage",
    "LegacyConvertedEnhancedMRImageStorage",
    "ComputedRadiographyImageStorage", "DigitalXRayImageStorageForPresentation",
    "DigitalXRayImageStorageForProcessing", "DigitalMammographyXRayImageStorageForPresentation",
    "DigitalMammographyXRayImageStorageForProcessing", "BreastTomosynthesisImageStorage",
    "DigitalIntraOralXRayImageStorageForPresentation",
    "UltrasoundImageStorage", "UltrasoundMultiFrameImageStorage",
    "SecondaryCaptureImageStorage", "MultiFrameSingleBitSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage",
    "MultiFrameTrueColorSecondaryCaptureImageStorage",
    "PositronEmissionTomographyImageStorage", "EnhancedPETImageStorage",
    "LegacyConvertedEnhancedPETImageStorage", "NuclearMedicineImageStorage",
    "XRayAngiographicImageStorage", "EnhancedXAImageStorage",
    "XRayRadiofluoroscopicImageStorage", "RTImageStorage",
))

#: Transfer syntaxes accepted for every storage SOP class (PS3.5 Section 10 and Annex A).
TRANSFER_SYNTAXES: tuple[str, ...] = (
    tsuid.ExplicitVRLittleEndian, tsuid.ImplicitVRLittleEndian,
    tsuid.DeflatedExplicitVRLittleEndian, tsuid.ExplicitVRBigEndian,
    tsuid.JPEGBaseline8Bit, tsuid.JPEGExtended12Bit, tsuid.JPEGLossless, tsuid.JPEGLosslessSV1,
    tsuid.JPEGLSLossless, tsuid.JPEGLSNearLossless, tsuid.JPEG2000Lossless, tsuid.JPEG2000,
    tsuid.HTJ2KLossless, tsuid.HTJ2KLosslessRPCL, tsuid.HTJ2K, tsuid.RLELossless,
)


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element with a 2-byte length (PS3.5 Section 7.1.2)."""
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _sh(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def file_meta(identity: InstanceIdentity, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (PS3.10 Section 7.1) for a
    received data set stored as it arrived; what pynetdicom's ``encoded_dataset()`` writes,
    plus the Source Application Entity Title, in about a tenth of its time."""
    ae = _sh(source_ae.strip())
    body = b"".join((
        struct.pack("<HH2sHI", 2, 1, b"OB", 0, 2) + b"\0\1",  # (0002,0001) version
        _element(0x00020002, b"UI", _ui(identity.sop_class_uid)),
        _element(0x00020003, b"UI", _ui(identity.sop_instance_uid)),
        _element(0x00020010, b"UI", _ui(identity.transfer_syntax_uid)),
        _element(0x00020012, b"UI", _ui(PYNETDICOM_IMPLEMENTATION_UID)),
        _element(0x00020013, b"SH", _sh(PYNETDICOM_IMPLEMENTATION_VERSION)),
        _element(0x00020016, b"AE", ae) if ae else b"",
    ))
    return b"\0" * 128 + b"DICM" + _element(0x00020000, b"UL", struct.pack("<I", len(body))) + body


@dataclass
class _Delivered:
    """What one association has stored so far (kept until its connection closes)."""

    calling_ae: str
    series: dict[str, str] = field(default_factory=dict)  # series UID -> study UID
    instances: int = 0
    released: bool = False


class DicomListener:
    """Storage SCP on ``settings.dicom``; use :meth:`start` / :meth:`stop` or ``with``.

    With ``dicom.tls.enabled`` the port speaks TLS only (docs/security.md); the constructor
    raises ConfigError, naming the key, when a certificate or key file is missing or invalid.

    ``recorder`` records each instance after it is fsync'd and before success is answered;
    ``on_release`` is told which series an association delivered when it ends.
    """

    def __init__(self, settings: Settings, recorder: InstanceRecorder,
                 on_release: ReleaseCallback, stats: IngestStats | None = None) -> None:
        self._settings = settings.dicom
        self._bind = settings.dicom.bind or settings.server.bind
        spool_dir = settings.spool.dir or settings.server.data_dir / "spool"
        self.spool = Spool(spool_dir, settings.spool.min_free_bytes)
        self.policy = PeerPolicy(settings.dicom.ae_title, settings.dicom.peers,
                                 settings.dicom.require_called_aet)
        self.stats = stats if stats is not None else IngestStats()
        self._recorder = recorder
        self._on_release = on_release
        self._lock = threading.Lock()
        self._delivered: dict[int, _Delivered] = {}
        self._ae = self._make_ae()
        self._ssl = server_context(settings.dicom.tls, "dicom.tls",  # None: plain TCP
                                   settings.dicom.network_timeout_s)
        self._server: EventDrivenServer | None = None

    @property
    def ae(self) -> AE:
        """The pynetdicom application entity (read it; do not reconfigure it)."""
        return self._ae

    def _make_ae(self) -> AE:
        cfg = self._settings
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_pdu_size = cfg.max_pdu
        ae.maximum_associations = cfg.max_associations
        ae.acse_timeout = cfg.acse_timeout_s
        ae.dimse_timeout = cfg.dimse_timeout_s
        ae.network_timeout = cfg.network_timeout_s
        ae.require_called_aet = False  # PeerPolicy decides, so every rejection is counted
        ae.add_supported_context(VERIFICATION)
        for uid in STORAGE_SOP_CLASSES:
            ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
        return ae

    def start(self) -> int:
        """Open the spool and listen; return the bound port (an ephemeral one for port 0).

        Raises:
            OSError: the spool cannot be created or the port cannot be bound.
            RuntimeError: already started.
        """
        if self._server is not None:
            raise RuntimeError("DicomListener already started")
        self.spool.open()
        if self.policy.open_to_all:
            LOG.warning("no DICOM peer allow-list configured: any calling AE title is accepted")
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACSE_RECV, self._on_acse_recv),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        server = cast(EventDrivenServer, self._ae.make_server(
            (self._bind, self._settings.port), ssl_context=self._ssl, evt_handlers=handlers,
            server_class=EventDrivenServer))
        threading.Thread(target=server.serve_forever, name=f"dicom-listener:{self._bind}",
                         daemon=True).start()
        self._server = server
        port = int(server.server_address[1])
        LOG.info("DICOM listener %s on %s:%d%s", self._settings.ae_title, self._bind, port,
                 " (TLS)" if self._ssl is not None else "")
        return port

    def stop(self) -> None:
        """Stop listening and abort associations still open. Safe to call twice."""
        if self._server is None:
            return
        self._server.shutdown()
        self._ae.shutdown()  # aborts the associations still open
        self._server = None

    def __enter__(self) -> DicomListener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- association events ------------------------------------------------------------------

    def _on_conn_open(self, event: evt.Event) -> None:
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        request = cast(A_ASSOCIATE, assoc.requestor.primitive)
        calling, called = str(request.calling_ae_title), str(request.called_ae_title)
        rejection = self._admission(calling, called, str(assoc.requestor.address))
        if rejection is None:
            return
        LOG.warning("association from %s@%s to %s rejected: %s", calling,
                    assoc.requestor.address, called, rejection.label)
        self.stats.association_rejected(rejection.label)
        assoc.acse.send_reject(rejection.result, rejection.source, rejection.reason)
        assoc.is_rejected = True
        assoc.kill()

    def _admission(self, calling: str, called: str, host: str) -> Rejection | None:
        rejection = self.policy.check(calling, called, host)
        if rejection is not None:
            return rejection
        try:
            room = self.spool.has_room()
        except OSError:
            LOG.exception("cannot read the spool's free space")
            room = False
        if not room:
            return OUT_OF_SPACE
        active = sum(1 for a in self._ae.active_associations if a.is_acceptor)
        if active > self._settings.max_associations:
            return TOO_MANY_ASSOCIATIONS
        return None

    def _on_accepted(self, event: evt.Event) -> None:
        self.stats.association_accepted()
        with self._lock:
            self._delivered[id(event.assoc)] = _Delivered(str(event.assoc.requestor.ae_title))

    def _on_acse_recv(self, event: evt.Event) -> None:
        """Note the peer's A-RELEASE-RQ. It is read before the response goes out, whereas
        EVT_RELEASED may fire after the connection has closed (the peer closes as soon as it
        has our A-RELEASE-RP), too late for :meth:`_on_conn_close`."""
        primitive = cast(Any, event).primitive  # EVT_ACSE_RECV carries the primitive
        if not isinstance(primitive, A_RELEASE) or primitive.result is not None:
            return
        with self._lock:
            delivered = self._delivered.get(id(event.assoc))
            if delivered is not None:
                delivered.released = True

    def _on_conn_close(self, event: evt.Event) -> None:
        with self._lock:
            delivered = self._delivered.pop(id(event.assoc), None)
        if delivered is None or not delivered.instances:
            return
        closed = AssociationClosed(
            calling_ae=delivered.calling_ae,
            series_instance_uids=tuple(delivered.series),
            study_instance_uids=tuple(dict.fromkeys(delivered.series.values())),
            instances=delivered.instances,
            released=delivered.released,
        )
        try:
            self._on_release(closed)
        except Exception:  # one failing callback must not break the listener
            LOG.exception("association release callback failed")

    # -- C-STORE -----------------------------------------------------------------------------

    def _on_store(self, event: evt.Event) -> int:
        """Validate, spool (fsync), record, answer (PS3.4 Section B.2.3 statuses)."""
        calling = str(event.assoc.requestor.ae_title)
        request = cast(C_STORE, event.request)
        sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
        try:
            identity = self._identity(event, sop_instance_uid)
            data = cast(BytesIO, cast(C_STORE, event.request).DataSet).getbuffer()
            stored = self.spool.store(identity, file_meta(identity, calling), data)
            new = self._recorder.record_instance(ReceivedInstance(
                identity, stored.path, stored.size, calling, time.time(),
                int(request.Priority or 0), str(request.MoveOriginatorApplicationEntityTitle
                                                or "").strip()))
        except Exception as exc:  # every failure becomes a status, in statuses.py
            status = failure_status(exc, calling, sop_instance_uid)
            self.stats.store_failed(status)
            return int(status)
        self.stats.instance_stored(stored.size, duplicate=not new)
        with self._lock:
            delivered = self._delivered.get(id(event.assoc))
            if delivered is not None:
                delivered.series[identity.series_instance_uid] = identity.study_instance_uid
                delivered.instances += 1
        return int(Status.SUCCESS)

    @staticmethod
    def _identity(event: evt.Event, sop_instance_uid: str) -> InstanceIdentity:
        """Raises: UnreadableDatasetError, InvalidUidError, DatasetMismatchError."""
        syntax = event.context.transfer_syntax
        encoded = cast(BytesIO, cast(C_STORE, event.request).DataSet)
        dataset: Any = None
        if not syntax.is_deflated:  # read from the bytes (header.py), else by pydicom
            dataset = scan_identity(encoded.getbuffer(), syntax.is_implicit_VR,
                                    syntax.is_little_endian)
        if dataset is None:
            try:
                dataset = event.dataset  # decodes every element; values converted lazily
            except Exception as exc:
                raise UnreadableDatasetError(f"cannot decode the dataset: {exc}") from exc
        return InstanceIdentity.from_dataset(
            dataset, str(cast(C_STORE, event.request).AffectedSOPClassUID), sop_instance_uid,
            str(event.context.transfer_syntax))
