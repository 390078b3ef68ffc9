"""What a remote backend may learn besides the tensors: nothing that identifies a patient.

A remote KServe v2 call carries the input tensors, a request ``id`` and ``parameters``. Locally,
ids and parameters are free to name a study (a job id built from a Study Instance UID, a series
UID in a parameter); none of that may leave the box. :class:`Pseudonymizer`:

- replaces each request id by an opaque random one (128 bits from :mod:`secrets`) and keeps the
  mapping only until the response arrives, when :meth:`Pseudonymizer.inbound` maps the remote's
  id back to the original (re-identification happens on the box, never remotely);
- forwards only allow-listed parameters (scheduling hints: ``priority``, ``timeout``) and drops
  even those when their value looks like a DICOM UID or holds a configured identifier.

Pixel data itself (burned-in annotations) is not this module's business: that is the
``outbound`` tensor filter of :class:`edge.backends.remote_kserve.RemoteKServeBackend`.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from edge.core.errors import BackendError

#: Parameter values forwarded as they are: scalars only.
ParameterValue = bool | int | float | str

#: Shaped like a DICOM UID: dot-separated numeric components, the first 0-2 (PS3.5 9.1).
_UID = re.compile(r"(?<![\d.])[0-2](\.(0|[1-9]\d*)){2,}(?![\d.])")
#: Taken as a UID with 4 or more components, or 10 or more characters (2.25.<uuid>, PS3.5
#: B.2), so version strings ("1.2.3") and decimals pass.
_UID_MIN_COMPONENTS, _UID_MIN_LENGTH = 4, 10

#: Parameters that only steer scheduling, forwarded when their values are clean.
DEFAULT_ALLOWED_PARAMETERS: frozenset[str] = frozenset({"priority", "timeout"})


def carries_uid(value: object) -> bool:
    """Whether ``value`` (as text) contains something shaped like a DICOM UID."""
    return any(m.group().count(".") + 1 >= _UID_MIN_COMPONENTS
               or len(m.group()) >= _UID_MIN_LENGTH for m in _UID.finditer(str(value)))


@dataclass(frozen=True)
class OutboundRequest:
    """What goes to the remote: an opaque id and the parameters that survived."""

    id: str
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)


class Pseudonymizer:
    """Opaque ids out, original ids back; thread-safe (one per backend, many callers)."""

    def __init__(self, allowed_parameters: Collection[str] = DEFAULT_ALLOWED_PARAMETERS,
                 identifiers: Collection[str] = ()) -> None:
        """``identifiers``: extra strings (patient names, IDs, accession numbers) that must
        never leave in a parameter value, whatever its name."""
        self._allowed = frozenset(allowed_parameters)
        self._identifiers = tuple(i for i in identifiers if i)
        self._pending: dict[str, str] = {}
        self._lock = threading.Lock()

    def _clean(self, value: ParameterValue) -> bool:
        text = str(value)
        return not carries_uid(text) and not any(i in text for i in self._identifiers)

    def outbound(self, request_id: str,
                 parameters: Mapping[str, ParameterValue] | None = None) -> OutboundRequest:
        """The request as the remote may see it; remember ``request_id`` under the new id."""
        opaque = secrets.token_hex(16)
        with self._lock:
            self._pending[opaque] = request_id
        kept = {key: value for key, value in (parameters or {}).items()
                if key in self._allowed and self._clean(value)}
        return OutboundRequest(opaque, kept)

    def inbound(self, opaque_id: str) -> str:
        """The original id of a request sent as ``opaque_id``; forgets the mapping.

        Raises:
            BackendError: ``opaque_id`` is not a request in flight (a remote that answers
                with an id it was not given, or twice).
        """
        with self._lock:
            original = self._pending.pop(opaque_id, None)
        if original is None:
            raise BackendError("remote answered with a request id that is not in flight")
        return original

    def forget(self, opaque_id: str) -> None:
        """Drop the mapping of a request that failed (no response to map back)."""
        with self._lock:
            self._pending.pop(opaque_id, None)

    @property
    def in_flight(self) -> int:
        """Mappings held (0 when idle: nothing accumulates)."""
        with self._lock:
            return len(self._pending)
