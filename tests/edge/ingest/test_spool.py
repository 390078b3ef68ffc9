"""The spool: final paths from validated UIDs only, atomic durable writes, watermark."""

from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from edge.ingest.spool import INCOMING, OutOfResourcesError, Spool
from edge.ingest.statuses import Status, status_for
from edge.ingest.uids import InstanceIdentity

IDENT = InstanceIdentity("1.2.3", "1.2.3.1", "1.2.3.1.1", CTImageStorage, ExplicitVRLittleEndian)


def test_store_is_atomic_and_idempotent(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0).open()
    first = spool.store(IDENT, b"DICM-bytes")
    assert first.written and first.path == tmp_path / "spool/1.2.3/1.2.3.1/1.2.3.1.1.dcm"
    assert first.path.read_bytes() == b"DICM-bytes"
    again = spool.store(IDENT, b"other bytes")
    assert not again.written and first.path.read_bytes() == b"DICM-bytes"
    assert list((tmp_path / "spool" / INCOMING).iterdir()) == []


def test_missing_file_is_rewritten(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=0).open()
    spool.store(IDENT, b"a").path.unlink()
    assert spool.store(IDENT, b"a").written


def test_open_removes_incomplete_files(tmp_path: Path) -> None:
    (tmp_path / INCOMING).mkdir()
    (tmp_path / INCOMING / "dead.part").write_bytes(b"half")
    Spool(tmp_path, min_free_bytes=0).open()
    assert list((tmp_path / INCOMING).iterdir()) == []


def test_watermark_refuses_with_a700(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=2**62).open()
    with pytest.raises(OutOfResourcesError) as info:
        spool.store(IDENT, b"x")
    assert status_for(info.value) is Status.OUT_OF_RESOURCES
    assert not spool.path_for(IDENT).exists()


def test_remove_stays_inside_and_prunes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", min_free_bytes=0).open()
    path = spool.store(IDENT, b"x").path
    with pytest.raises(ValueError):
        spool.remove(tmp_path / "elsewhere.dcm")
    spool.remove(path)
    assert not (tmp_path / "s" / "1.2.3").exists()
