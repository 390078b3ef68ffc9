"""Where results go: a DICOM storage SCP named ``AET@HOST:PORT``."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from edge.core.errors import ConfigError

#: AE title: 1-16 characters of the default repertoire, no backslash, no control characters,
#: not only spaces (PS3.5 Table 6.2-1, VR AE). Leading and trailing spaces are not significant.
_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")
#: A host name (RFC 1123 labels).
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _check_host(host: str, text: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise ConfigError(f"destination {text!r}: {host!r} is not an IPv6 address") from None
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(f"destination {text!r}: {host!r} is not a host name or IP address "
                          "(write IPv6 addresses in brackets)")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigError(f"destination {text!r}: {host!r} is not an IPv4 address") from None
    return host


@dataclass(frozen=True)
class Destination:
    """A storage SCP: its AE title (the Called AE Title), host and TCP port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AET@HOST:PORT`` (IPv6 hosts in brackets: ``PACS@[::1]:104``).

        Raises:
            ConfigError: the text, AE title, host or port is malformed; the message quotes it.
        """
        aet, at, hostport = text.rpartition("@")
        if not at:
            raise ConfigError(f"destination {text!r}: expected AET@HOST:PORT")
        if not _AE_TITLE.fullmatch(aet) or not aet.strip():
            raise ConfigError(f"destination {text!r}: AE title {aet!r} must be 1-16 characters, "
                              "not only spaces, without backslash or control characters "
                              "(PS3.5 6.2, VR AE)")
        host, colon, port_text = hostport.rpartition(":")
        if not colon or not port_text.isdigit() or not port_text.isascii():
            raise ConfigError(f"destination {text!r}: expected a numeric port after the last ':'")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ConfigError(f"destination {text!r}: port {port} is not in 1-65535")
        return cls(aet.strip(), _check_host(host, text), port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"
