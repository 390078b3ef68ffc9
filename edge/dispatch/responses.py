"""Waiting for a DIMSE response that may never come because the connection has ended.

pynetdicom's SCU waits for each response on its DIMSE queue for the whole ``dimse_timeout``,
even when the peer has aborted or dropped the connection meanwhile: the association thread
that would notice is paused while a request is outstanding. Measured here: a peer that dies
in the middle of a C-STORE held the sender for the full DIMSE timeout (20 s of 20 s; with the
default 60 s this is the once-seen "60 s stall" of docs/dispatch.md). The provider below
waits in short slices and stops as soon as the upper layer reports an abort (A-ABORT or a
closed connection, PS3.8 9.2 Evt16/Evt17) or its thread has ended; pynetdicom then reports
"Connection closed while waiting for DIMSE message" as it already does for that case.
"""

from __future__ import annotations

import queue
import time
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider

#: How often a waiting sender looks at the connection.
CHECK_EVERY_S = 0.05


class ConnectionAwareDIMSE(DIMSEServiceProvider):
    """A DIMSE provider whose blocking ``get_msg`` also ends when the connection has ended.

    Install it on an established requestor association before its first request
    (:func:`install`); nothing is in flight then, so no message is lost in the swap.
    """

    def get_msg(self, block: bool = False) -> Any:
        """The next message as ``(context ID, primitive)``; (None, None) when none came within
        the DIMSE timeout or the association was aborted / its connection closed first."""
        if not block:
            return super().get_msg(False)
        timeout = self.dimse_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = CHECK_EVERY_S if deadline is None else min(CHECK_EVERY_S,
                                                              deadline - time.monotonic())
            if wait <= 0:
                return None, None
            try:
                return self.msg_queue.get(timeout=wait)
            except queue.Empty:
                pass
            if self.assoc.acse.is_aborted() or not self.assoc.dul.is_alive():
                try:  # a response that arrived just before the end still counts
                    return self.msg_queue.get(block=False)
                except queue.Empty:
                    return None, None


def install(assoc: Association) -> None:
    """Give the established requestor ``assoc`` a :class:`ConnectionAwareDIMSE`."""
    assoc.dimse = ConnectionAwareDIMSE(assoc)
