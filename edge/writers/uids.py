"""Deterministic UIDs for result objects (PS3.5 B.2: "2.25." + the integer of a UUID).

A UUID version 5 of the source series, the model and the kind of object gives the same UID
every time the same model version processes the same series, so a re-delivery replaces the
earlier object in the PACS instead of adding a duplicate; a new model version gives new UIDs.
"""

from __future__ import annotations

import uuid

from edge.core.types import ModelId

#: Fixed namespace of every mededge result UID; never change it (UIDs would change).
RESULT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:mededge:results")


def _uid(name: str) -> str:
    return f"2.25.{uuid.uuid5(RESULT_NAMESPACE, name).int}"  # at most 44 characters


def result_uid(source_series_uid: str, model: ModelId, kind: str, index: int = 0) -> str:
    """UID of result ``kind`` (e.g. "seg-series", "seg", "sr") number ``index`` of a series.

    Raises:
        ValueError: an empty series UID or kind, or a "|" in a part (the separator).
    """
    parts = (source_series_uid, model.name, str(model.version), kind, str(index))
    if not source_series_uid or not kind:
        raise ValueError("result_uid: source_series_uid and kind must not be empty")
    if any("|" in p for p in parts):
        raise ValueError(f"result_uid: '|' is not allowed in {parts}")
    return _uid("|".join(parts))


def device_uid(manufacturer: str, name: str, version: str) -> str:
    """UID of the algorithm acting as the observer device (TID 1004 Device Observer UID)."""
    return _uid(f"device|{manufacturer}|{name}|{version}")
