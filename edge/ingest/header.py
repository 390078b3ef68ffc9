"""The identifying attributes of a received data set, read straight from its encoded bytes.

The listener needs five attributes (SOP Class and Instance UIDs, Study and Series Instance
UIDs, Modality), all in groups 0008 and 0020. pydicom's decode of the whole data set (what
pynetdicom's ``event.dataset`` does) copies every value, pixel data included: about 0.5 ms
of the critical path for a 512x512 CT image here. :func:`scan_identity` walks the element
headers instead (PS3.5 Section 7.1), reading only those five values, and checks that every
element of the data set fits in it, so a truncated data set is still caught.

It answers None whenever it is not sure (deflated data, a sequence or other element of
undefined length outside the encapsulated pixel data, a value that is not plain ASCII or has
several values, tags out of order, trailing bytes); the listener then asks pydicom. A test
checks that wherever it answers, pydicom decodes the same values.
"""

from __future__ import annotations

import struct

#: The attributes read, by tag (PS3.6).
WANTED = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080060: "Modality",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
#: VRs with a 2-byte reserved field and a 4-byte length in explicit VR (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"))
_PIXEL_DATA = 0x7FE00010
_ITEM, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


def _skip_fragments(view: memoryview, pos: int) -> int | None:
    """Position after encapsulated pixel data's items and its delimiter (PS3.5 A.4)."""
    end = len(view)
    while pos + 8 <= end:
        group, element, length = struct.unpack_from("<HHI", view, pos)
        tag = group << 16 | element
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM or length == _UNDEFINED or pos + length > end:
            return None
        pos += length
    return None


def scan_identity(data: bytes | memoryview, implicit_vr: bool,
                  little_endian: bool) -> dict[str, str] | None:
    """The WANTED attributes present in the data set ``data`` (by keyword, values stripped as
    pydicom strips them), or None when the caller should decode with pydicom instead."""
    view = memoryview(data).cast("B")
    order = "<" if little_endian else ">"
    header, short, long_ = f"{order}HH", f"{order}H", f"{order}I"
    found: dict[str, str] = {}
    pos, end, previous = 0, len(view), -1
    while pos < end:
        if pos + 8 > end:
            return None  # trailing bytes that are no element
        group, element = struct.unpack_from(header, view, pos)
        tag = group << 16 | element
        if tag <= previous:
            return None
        previous = tag
        if implicit_vr:
            (length,) = struct.unpack_from(long_, view, pos + 4)
            pos += 8
        elif bytes(view[pos + 4:pos + 6]) in _LONG_VRS:
            if pos + 12 > end:
                return None
            (length,) = struct.unpack_from(long_, view, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from(short, view, pos + 6)
            pos += 8
        if length == _UNDEFINED:
            if tag != _PIXEL_DATA or implicit_vr or not little_endian:
                return None
            after = _skip_fragments(view, pos)
            if after is None:
                return None
            pos = after
            continue
        if pos + length > end:
            return None  # truncated
        keyword = WANTED.get(tag)
        if keyword is not None:
            value = _text(view[pos:pos + length], keyword)
            if value is None:
                return None
            found[keyword] = value
        pos += length
    return found


def _text(raw: memoryview, keyword: str) -> str | None:
    """A single ASCII value as pydicom gives it: UI without trailing NULs and spaces, CS
    without surrounding spaces (PS3.5 Section 6.2); None for anything else."""
    try:
        text = bytes(raw).decode("ascii").rstrip("\0")
    except UnicodeDecodeError:
        return None
    if "\\" in text or not text.isprintable():
        return None
    return text.strip(" ") if keyword == "Modality" else text.rstrip(" ")
