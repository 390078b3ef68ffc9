"""UID validation and the identity of a received instance, checked before any path is formed.

A UID is digits and dots, each component without a leading zero unless it is "0", at most 64
characters (PS3.5 Section 9.1). The spool builds paths only from an :class:`InstanceIdentity`,
which can only be made from UIDs that passed :func:`validate_uid`, so a hostile value such as
``"../../etc"`` never reaches the file system.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from edge.core.errors import DataError

#: PS3.5 Section 9.1: components of digits, no leading zero except a lone "0", dot separated.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
UID_MAX_LENGTH = 64


class InvalidUidError(DataError):
    """A UID attribute is missing or is not a valid UID; the message names the attribute."""


class DatasetMismatchError(DataError):
    """The dataset does not match the SOP class or instance named in the C-STORE request."""


class UnreadableDatasetError(DataError):
    """The received bytes cannot be parsed as a DICOM dataset."""


def is_valid_uid(value: str) -> bool:
    """Return whether ``value`` is a syntactically valid UID (PS3.5 Section 9.1)."""
    return len(value) <= UID_MAX_LENGTH and _UID.fullmatch(value) is not None


def validate_uid(value: object, keyword: str) -> str:
    """Return ``value`` as a str if it is a valid UID.

    Raises:
        InvalidUidError: ``value`` is missing, not a string, too long or badly formed; the
            message names ``keyword`` and the length, never the value itself (it may be hostile).
    """
    if value is None or value == "":
        raise InvalidUidError(f"{keyword} is missing")
    text = str(value)
    if not is_valid_uid(text):
        raise InvalidUidError(f"{keyword} is not a valid UID ({len(text)} characters)")
    return text


@dataclass(frozen=True)
class InstanceIdentity:
    """The validated UIDs of one SOP instance. Construct with :meth:`from_dataset`."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str = ""

    def __post_init__(self) -> None:
        validate_uid(self.study_instance_uid, "StudyInstanceUID")
        validate_uid(self.series_instance_uid, "SeriesInstanceUID")
        validate_uid(self.sop_instance_uid, "SOPInstanceUID")
        validate_uid(self.sop_class_uid, "SOPClassUID")
        validate_uid(self.transfer_syntax_uid, "TransferSyntaxUID")

    @classmethod
    def from_dataset(cls, dataset: Any, affected_sop_class_uid: str,
                     affected_sop_instance_uid: str, transfer_syntax_uid: str) -> InstanceIdentity:
        """Read and check the identity of ``dataset`` (a pydicom Dataset, decoded lazily).

        Only the four UIDs and Modality are read, so pixel data stays undecoded.

        Raises:
            UnreadableDatasetError: an attribute cannot be decoded.
            InvalidUidError: a required UID is missing or invalid.
            DatasetMismatchError: SOPClassUID or SOPInstanceUID differ from the request's
                Affected SOP Class / Instance UID (PS3.4 Section B.2.3, status A900).
        """
        try:
            values = {k: dataset.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                                  "SOPInstanceUID", "SOPClassUID", "Modality")}
        except Exception as exc:  # pydicom raises many types for malformed elements
            raise UnreadableDatasetError(f"cannot decode identifying attributes: {exc}") from exc
        sop_class = validate_uid(values["SOPClassUID"], "SOPClassUID")
        sop_instance = validate_uid(values["SOPInstanceUID"], "SOPInstanceUID")
        if sop_class != str(affected_sop_class_uid):
            raise DatasetMismatchError("SOPClassUID differs from the Affected SOP Class UID")
        if sop_instance != str(affected_sop_instance_uid):
            raise DatasetMismatchError("SOPInstanceUID differs from the Affected SOP Instance UID")
        modality = values["Modality"]
        return cls(
            study_instance_uid=validate_uid(values["StudyInstanceUID"], "StudyInstanceUID"),
            series_instance_uid=validate_uid(values["SeriesInstanceUID"], "SeriesInstanceUID"),
            sop_instance_uid=sop_instance,
            sop_class_uid=sop_class,
            transfer_syntax_uid=validate_uid(transfer_syntax_uid, "TransferSyntaxUID"),
            modality=str(modality)[:16] if modality else "",
        )
