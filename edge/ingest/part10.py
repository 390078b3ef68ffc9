"""DICOM Part 10 files handed over as bytes (the gRPC submission): identity and data set.

The C-STORE path receives a data set and its transfer syntax from the association; a Part 10
file carries both itself (PS3.10 Section 7.1: preamble, ``DICM``, File Meta Information, then
the data set in the meta's Transfer Syntax). :func:`read_part10` validates what the C-STORE
path validates (UIDs, SOP class and transfer syntax accepted by the listener, the data set's
SOP Class / Instance UIDs equal to the meta's Media Storage ones) and returns where the data
set starts, so the bytes can be spooled as they are, behind our own file meta.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread

from edge.ingest.listener import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from edge.ingest.uids import DatasetMismatchError, InstanceIdentity, UnreadableDatasetError

_PREFIX = 132  # 128-byte preamble + "DICM"
_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"]


class UnsupportedObjectError(DatasetMismatchError):
    """The SOP class or transfer syntax is not one the listener accepts (a C-STORE SCU would
    have had no presentation context for it)."""


@dataclass(frozen=True)
class Part10:
    """A validated Part 10 file: its identity and the offset of its data set."""

    identity: InstanceIdentity
    dataset_offset: int


def _meta_end(data: bytes | memoryview) -> int:
    """Offset just past the File Meta Information group (from its group length).

    Raises: UnreadableDatasetError.
    """
    if len(data) < _PREFIX + 12 or bytes(data[128:132]) != b"DICM":
        raise UnreadableDatasetError("dicom_file: not a DICOM Part 10 file (no DICM prefix)")
    group, element, vr, length = struct.unpack("<HH2sH", bytes(data[_PREFIX:_PREFIX + 8]))
    if (group, element, vr, length) != (2, 0, b"UL", 4):
        raise UnreadableDatasetError(
            "dicom_file: File Meta Information Group Length (0002,0000) missing")
    end = _PREFIX + 12 + struct.unpack("<I", bytes(data[_PREFIX + 8:_PREFIX + 12]))[0]
    if end >= len(data):
        raise UnreadableDatasetError("dicom_file: no data set after the file meta")
    return end


def read_part10(data: bytes | memoryview) -> Part10:
    """Validate a Part 10 file's identity the way the C-STORE handler does.

    Raises:
        UnreadableDatasetError: not Part 10, or the meta or identifying attributes cannot be
            decoded (C000).
        InvalidUidError: a UID is missing or invalid, hostile values included (A900).
        DatasetMismatchError: the data set's SOP Class / Instance UID differ from the meta's
            (A900); :class:`UnsupportedObjectError` for a SOP class or transfer syntax the
            listener does not accept.
    """
    offset = _meta_end(data)
    try:
        ds = dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=_TAGS)
        meta = ds.file_meta
        sop_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
        sop_instance = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
        syntax = str(meta.get("TransferSyntaxUID", "") or "")
    except Exception as exc:  # pydicom raises many types for malformed input
        raise UnreadableDatasetError(f"dicom_file: cannot decode the file: {exc}") from exc
    identity = InstanceIdentity.from_dataset(ds, sop_class, sop_instance, syntax)
    if identity.sop_class_uid not in STORAGE_SOP_CLASSES:
        raise UnsupportedObjectError(f"SOP class {identity.sop_class_uid} is not accepted")
    if identity.transfer_syntax_uid not in TRANSFER_SYNTAXES:
        raise UnsupportedObjectError(
            f"transfer syntax {identity.transfer_syntax_uid} is not accepted")
    return Part10(identity, offset)
