"""scan_identity against pydicom on every data set that ships in pydicom's test files: where
it answers, pydicom decodes the same values; where it cannot be sure, it says so."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from pynetdicom.dsutils import decode

from edge.ingest.header import WANTED, scan_identity
from edge.ingest.part10 import read_part10

TEST_FILES = Path(str(get_testdata_file("CT_small.dcm"))).parent


def data_sets() -> list[tuple[str, bytes, UID]]:
    """(name, data set bytes after the file meta, transfer syntax) of each Part 10 test file."""
    found = []
    for path in sorted(p for p in TEST_FILES.rglob("*") if p.is_file()):
        try:
            syntax = UID(read_file_meta_info(path).TransferSyntaxUID)
            data = path.read_bytes()
            offset = read_part10(data).dataset_offset
        except Exception:  # no file meta, not an accepted object: not a received data set
            continue
        found.append((str(path.relative_to(TEST_FILES)), data[offset:], syntax))
    return found


DATA_SETS = data_sets()


def test_most_test_files_are_scanned() -> None:
    scanned = [name for name, data, syntax in DATA_SETS if not syntax.is_deflated
               and scan_identity(data, syntax.is_implicit_VR, syntax.is_little_endian)]
    assert len(scanned) >= len(DATA_SETS) // 2, f"only {len(scanned)} of {len(DATA_SETS)}"


@pytest.mark.parametrize(("name", "data", "syntax"), DATA_SETS, ids=[d[0] for d in DATA_SETS])
def test_scan_agrees_with_pydicom(name: str, data: bytes, syntax: UID) -> None:
    if syntax.is_deflated:
        pytest.skip("deflated data sets are left to pydicom")
    scanned = scan_identity(data, syntax.is_implicit_VR, syntax.is_little_endian)
    if scanned is None:
        return  # the listener asks pydicom
    dataset = decode(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian)
    expected = {k: None if dataset.get(k) is None else str(dataset.get(k))
                for k in WANTED.values()}
    assert {k: scanned.get(k) for k in WANTED.values()} == expected


def test_truncated_data_set_is_left_to_pydicom() -> None:
    name, data, syntax = next(d for d in DATA_SETS if d[0] == "CT_small.dcm")
    assert scan_identity(data, syntax.is_implicit_VR, syntax.is_little_endian) is not None
    assert scan_identity(data[:-10], syntax.is_implicit_VR, syntax.is_little_endian) is None


def test_sequence_of_undefined_length_is_left_to_pydicom() -> None:
    data = (b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff"
            b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    assert scan_identity(data, False, True) is None


def test_multi_valued_or_non_ascii_values_are_left_to_pydicom() -> None:
    for value in (b"CT\\MR ", b"C\xc9"):
        element = b"\x08\x00\x60\x00CS" + len(value).to_bytes(2, "little") + value
        assert scan_identity(element, False, True) is None
