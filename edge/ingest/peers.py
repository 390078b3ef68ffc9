"""Who may associate: the called AE title and an allow-list of calling AE titles (and hosts)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

from edge.core.config import DicomPeer
from edge.ingest.statuses import CALLED_AE_NOT_RECOGNIZED, CALLING_AE_NOT_RECOGNIZED, Rejection

LOG = logging.getLogger(__name__)


def _addresses(host: str) -> frozenset[str]:
    """The IP addresses ``host`` names; the name itself if it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        LOG.warning("DICOM peer host %r does not resolve; only an exact match will pass", host)
        return frozenset({host})
    return frozenset({str(info[4][0]) for info in infos} | {host})


class PeerPolicy:
    """Decides whether an association request is accepted (PS3.8 Section 9.3.4 reasons).

    Host names in the allow-list are resolved once, at construction.
    """

    def __init__(self, ae_title: str, peers: Sequence[DicomPeer],
                 require_called_aet: bool = True) -> None:
        self.ae_title = ae_title.strip()
        self.require_called_aet = require_called_aet
        self._allowed: dict[str, list[frozenset[str] | None]] = {}
        for peer in peers:
            hosts = None if peer.host is None else _addresses(peer.host)
            self._allowed.setdefault(peer.ae_title.strip(), []).append(hosts)

    @property
    def open_to_all(self) -> bool:
        """True when no allow-list is configured: any calling AE is accepted."""
        return not self._allowed

    def check(self, calling_ae: str, called_ae: str, host: str) -> Rejection | None:
        """Return why the request must be rejected, or None to accept it."""
        if self.require_called_aet and called_ae.strip() != self.ae_title:
            return CALLED_AE_NOT_RECOGNIZED
        if self.open_to_all:
            return None
        entries = self._allowed.get(calling_ae.strip())
        if entries is None:
            return CALLING_AE_NOT_RECOGNIZED
        if any(hosts is None or host in hosts for hosts in entries):
            return None
        return CALLING_AE_NOT_RECOGNIZED
