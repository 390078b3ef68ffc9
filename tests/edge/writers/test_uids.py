"""Result UIDs: deterministic, valid, and different per model version and kind."""

import re

import pytest

from edge.core.types import ModelId
from edge.writers.uids import device_uid, result_uid

SERIES = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678"


def test_same_inputs_same_uid_and_valid_form() -> None:
    a = result_uid(SERIES, ModelId("lungseg", 1), "seg")
    assert a == result_uid(SERIES, ModelId("lungseg", 1), "seg")
    assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", a) and len(a) <= 64


def test_uid_differs_by_version_model_kind_index_and_series() -> None:
    base = result_uid(SERIES, ModelId("lungseg", 1), "seg")
    others = {
        result_uid(SERIES, ModelId("lungseg", 2), "seg"),
        result_uid(SERIES, ModelId("nodseg", 1), "seg"),
        result_uid(SERIES, ModelId("lungseg", 1), "sr"),
        result_uid(SERIES, ModelId("lungseg", 1), "seg", 1),
        result_uid(SERIES + "1", ModelId("lungseg", 1), "seg"),
    }
    assert base not in others and len(others) == 5


def test_separator_and_empty_parts_are_rejected() -> None:
    with pytest.raises(ValueError, match="'|'"):
        result_uid(SERIES, ModelId("a|b", 1), "seg")
    with pytest.raises(ValueError, match="empty"):
        result_uid("", ModelId("a", 1), "seg")


def test_device_uid_is_stable() -> None:
    assert device_uid("mededge", "lungseg", "1") == device_uid("mededge", "lungseg", "1")
    assert device_uid("mededge", "lungseg", "1") != device_uid("mededge", "lungseg", "2")
