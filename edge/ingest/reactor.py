"""Event-driven acceptor associations for the listener (pynetdicom 3.0).

pynetdicom's acceptor polls. Its DUL thread sleeps ``_run_loop_delay`` (1 ms) whenever it
found nothing to do, its association thread sleeps 1 ms and then looks at the DIMSE queue
without waiting, and the socket is read 4 KiB at a time. On one association, where the SCU
waits for each C-STORE response, those sleeps sit on the critical path of every image: when
the data arrives, when the request is complete, and when the response is queued (measured
here at about 2 ms of a 6.5 ms image; docs/dicom.md, "Measured here").

The classes below keep pynetdicom's state machine, event handlers and timers and change only
how the two threads wait:

- :class:`_EventDrivenDUL` waits in ``select`` on the peer's socket and on a wake-up pipe that
  :meth:`~_EventDrivenDUL.send_pdu` writes to, so incoming data and outgoing primitives are
  handled at once; after each state-machine action it tells the association thread.
- :class:`_EventDrivenDIMSE` makes the association thread's non-blocking look at the DIMSE
  queue wait (at most :data:`IDLE_WAIT_S`) for that signal instead of returning empty.
- :class:`_WholeReadSocket` reads each PDU with ``recv_into`` into one buffer of its size.

Idle associations wake every :data:`IDLE_WAIT_S` to check their timers (ARTIM, network idle),
so ACSE and network timeouts keep their meaning with that much slack. They are installed per
association by :class:`EventDrivenServer` (its request handler), never by patching the
pynetdicom module. They use pynetdicom internals (the DUL reactor's steps, its queues and
timers), so :data:`SUPPORTED` limits them to the versions they were written and tested
against; with any other version the listener uses pynetdicom's own classes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import socketserver
import ssl
import threading
import time
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from edge.ingest.commands import store_response

LOG = logging.getLogger(__name__)
#: Longest wait of an idle thread before it looks at its timers and kill flag again.
IDLE_WAIT_S = 0.05
#: pynetdicom versions whose internals these classes follow.
SUPPORTED = pynetdicom.__version__.startswith("3.0.")
#: pynetdicom's default per-PDU and per-message log handlers (INFO "Received Store Request"
#: and DEBUG dumps, about 0.15 ms an image). The listener logs its own lines; these stay bound
#: only while the ``pynetdicom`` logger is enabled for DEBUG (troubleshooting a peer).
_STANDARD_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


class _WholeReadSocket(AssociationSocket):
    """Reads ``nr_bytes`` with as few ``recv_into`` calls as the kernel allows."""

    def recv(self, nr_bytes: int) -> bytearray:
        """The next ``nr_bytes`` from the peer, fewer if it closed the connection."""
        sock = self.socket
        assert sock is not None  # the DUL only reads a connected socket
        data = bytearray(nr_bytes)
        view = memoryview(data)
        got = 0
        try:
            while got < nr_bytes:
                count = sock.recv_into(view[got:])
                if not count:
                    break
                got += count
        finally:
            view.release()
        if got < nr_bytes:
            del data[got:]
        return data


class _EventDrivenDUL(DULServiceProvider):
    """The DUL reactor, waiting on its socket and a wake-up pipe instead of sleeping."""

    def __init__(self, assoc: Association, work: threading.Event) -> None:
        super().__init__(assoc)
        self._work = work
        self._wake_lock = threading.Lock()
        self._wake_r = self._wake_w = -1  # the pipe lives while run_reactor runs
        self._send_lock = threading.Lock()  # held while the reactor waits or sends
        self._waiting = False  # in select(): nothing being read, sent or queued

    def _open_pipe(self) -> None:
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        with self._wake_lock:
            self._wake_r, self._wake_w = read, write

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w < 0:
                return
            with contextlib.suppress(BlockingIOError):  # full: a wake-up is already pending
                os.write(self._wake_w, b"\0")

    def _close_pipe(self) -> None:
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1

    def _send(self, pdu: Any) -> None:
        with self._send_lock:
            super()._send(pdu)

    def send_now(self, pdu: P_DATA_TF) -> bool:
        """Send ``pdu`` from the calling thread if the reactor is idle in an established
        association (Sta6, where sending P-DATA is DT-1 and changes no state; PS3.8 9.2) and
        nothing is queued before it; False (nothing sent) otherwise. Saves a hand-over to the
        reactor thread on every C-STORE response."""
        with self._send_lock:
            sock = self.socket.socket if self.socket is not None else None
            if (not self._waiting or sock is None or self.to_provider_queue.qsize()
                    or self.state_machine.current_state != "Sta6"):
                return False
            try:
                _, writable, _ = select.select([], [sock.fileno()], [], 0)
                if not writable:  # a full send buffer would block here, holding the lock
                    return False
                sock.sendall(pdu.encode())
            except (OSError, ValueError):  # gone: the reactor sees it when it reads
                pass
            return True

    def send_pdu(self, primitive: Any) -> None:
        """Queue ``primitive`` for the peer and wake the reactor to send it."""
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        """Stop the reactor (it wakes at once)."""
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        """Stop the reactor if the state machine is idle (Sta1); True if it stopped."""
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wake()
        return bool(super().stop_dul())

    def _wait_for_work(self) -> None:
        """Block until the socket is readable, a primitive was queued, or IDLE_WAIT_S."""
        sock: socket.socket | None = self.socket.socket if self.socket is not None else None
        if sock is None or sock.fileno() < 0:
            time.sleep(self._run_loop_delay)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered: select would not see them
        with self._send_lock:
            self._waiting = True
        try:
            readable, _, _ = select.select([sock.fileno(), self._wake_r], [], [], IDLE_WAIT_S)
        except (OSError, ValueError):  # closed meanwhile: the transport check notices
            return
        finally:
            with self._send_lock:
                self._waiting = False
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)

    def run_reactor(self) -> None:
        """pynetdicom's DUL loop (one primitive sent or one PDU read, then one state-machine
        event per turn) with :meth:`_wait_for_work` where it slept."""
        self._idle_timer.start()
        self._open_pipe()
        idle = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if idle:
                    self._wait_for_work()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception:  # as pynetdicom does: abort, stop both reactors
                    LOG.exception("DICOM upper layer failed; aborting the association")
                    self._abort_broken()
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    idle = True
                    continue
                self.state_machine.do_action(event)
                if self.to_user_queue.qsize() or self.assoc.dimse.msg_queue.qsize():
                    self._work.set()  # a message, release or abort for the association
                idle = False
        finally:
            self._work.set()
            self._close_pipe()

    def _abort_broken(self) -> None:
        pdu = A_ABORT_RQ()
        pdu.source = 0x02  # service provider
        pdu.reason_diagnostic = 0x00
        try:
            if self.socket is not None:
                self.socket.send(pdu.encode())
        finally:
            self.assoc.is_aborted = True
            self.assoc.is_established = False
            self.assoc._kill = True
            self._kill_thread = True


class _EventDrivenDIMSE(DIMSEServiceProvider):
    """DIMSE provider whose non-blocking ``get_msg`` waits for the DUL's signal."""

    def __init__(self, assoc: Association, work: threading.Event) -> None:
        super().__init__(assoc)
        self._work = work

    def get_msg(self, block: bool = False) -> Any:
        """The next complete DIMSE message as ``(context ID, primitive)``, else (None, None).

        With ``block=False`` (only the association reactor's loop asks so) it waits up to
        :data:`IDLE_WAIT_S` for the DUL to act on something (a message, a release, an abort)
        rather than returning at once; the reactor then checks all of them.
        """
        if not block and self.msg_queue.empty():
            self._work.wait(IDLE_WAIT_S)
            self._work.clear()
        return super().get_msg(block)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Send a DIMSE message; a plain C-STORE response is encoded by
        :func:`edge.ingest.commands.store_response` (one P-DATA), anything else by pynetdicom.
        """
        command = None
        if (isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None
                and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            command = store_response(primitive)
        limit = self.maximum_pdu_size
        if command is None or (limit and len(command) > limit - 6):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))  # last
        dul = self.dul  # command fragment (PS3.8 E.2)
        if isinstance(dul, _EventDrivenDUL) and not self._observed():
            pdu = P_DATA_TF()
            pdu.from_primitive(pdata)
            if dul.send_now(pdu):
                return
        dul.send_pdu(pdata)

    def _observed(self) -> bool:
        """Whether a handler watches sent PDUs (they are only announced by the reactor)."""
        return bool(self.assoc.get_handlers(evt.EVT_PDU_SENT)
                    or self.assoc.get_handlers(evt.EVT_DATA_SENT))


class _EventDrivenRequestHandler(RequestHandler):
    """Creates each association as pynetdicom does, then gives it the classes above."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        work = threading.Event()
        assoc.dul = _EventDrivenDUL(assoc, work)
        assoc.dimse = _EventDrivenDIMSE(assoc, work)
        # a new socket wrapper queues the transport indication (Evt5) on the new DUL
        assoc.dul.socket = _WholeReadSocket(assoc, client_socket=self.request)
        # the timeouts were applied to the replaced DUL's timers
        assoc.acse_timeout = assoc.acse_timeout
        assoc.network_timeout = assoc.network_timeout
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            for event, handler in _STANDARD_LOG_HANDLERS:
                assoc.unbind(event, handler)
        return assoc


class EventDrivenServer(ThreadedAssociationServer):
    """A threaded association server with event-driven associations (see the module).

    Made by ``AE.make_server(..., server_class=EventDrivenServer)``; its owner runs
    ``serve_forever`` in a thread and ends it with :meth:`shutdown`. It is not in the AE's
    list of servers, so ``AE.shutdown`` aborts its associations but does not stop it.
    """

    def __init__(self, ae: Any, address: Any, ae_title: Any, contexts: Any, ssl_context: Any,
                 evt_handlers: Any, **kwargs: Any) -> None:
        handler = _EventDrivenRequestHandler if SUPPORTED else RequestHandler
        super().__init__(ae, address, ae_title, contexts, ssl_context,
                         evt_handlers=evt_handlers, request_handler=handler)

    def shutdown(self) -> None:
        """Stop serving and close the listening socket (open associations are not touched)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()
