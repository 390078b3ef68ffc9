"""Destination.parse: AET@HOST:PORT, with errors that quote the text."""

from __future__ import annotations

import pytest

from edge.core.errors import ConfigError
from edge.dispatch import Destination


@pytest.mark.parametrize(("text", "expected"), [
    ("PACS@127.0.0.1:104", Destination("PACS", "127.0.0.1", 104)),
    ("ORTHANC@pacs.hospital.local:4242", Destination("ORTHANC", "pacs.hospital.local", 4242)),
    ("A B@host:1", Destination("A B", "host", 1)),
    (" PACS @host:65535", Destination("PACS", "host", 65535)),
    ("AE@WITH@AT@host:11112", Destination("AE@WITH@AT", "host", 11112)),
    ("PACS@[::1]:104", Destination("PACS", "::1", 104)),
    ("SIXTEEN_CHARS_AE@h:1", Destination("SIXTEEN_CHARS_AE", "h", 1)),
])
def test_parses(text: str, expected: Destination) -> None:
    assert Destination.parse(text) == expected


def test_round_trips_through_str() -> None:
    for text in ("PACS@127.0.0.1:104", "PACS@[::1]:104", "X@h.example:5"):
        assert str(Destination.parse(text)) == text


@pytest.mark.parametrize(("text", "why"), [
    ("127.0.0.1:104", "AET@HOST:PORT"),
    ("@127.0.0.1:104", "AE title"),
    ("   @127.0.0.1:104", "AE title"),
    ("SEVENTEEN_CHARS_A@h:1", "AE title"),
    ("BACK\\SLASH@h:1", "AE title"),
    ("TAB\tAE@h:1", "AE title"),
    ("PACS@:104", "host"),
    ("PACS@bad_host:104", "host"),
    ("PACS@-bad.host:104", "host"),
    ("PACS@999.1.1.1:104", "IPv4"),
    ("PACS@[::zz]:104", "IPv6"),
    ("PACS@::1:104", "host"),
    ("PACS@host", "port"),
    ("PACS@host:", "port"),
    ("PACS@host:abc", "port"),
    ("PACS@host:0", "1-65535"),
    ("PACS@host:65536", "1-65535"),
    ("PACS@host:-1", "port"),
])
def test_rejects_with_the_text(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        Destination.parse(text)
    assert repr(text) in str(info.value)
    assert why in str(info.value)
