"""The spool: final paths from validated UIDs only, one-flush durable writes, crash repair."""

from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from edge.ingest.spool import INCOMING, OutOfResourcesError, Spool, one_flush_safe
from edge.ingest.statuses import Status, status_for
from edge.ingest.uids import InstanceIdentity

IDENT = InstanceIdentity("1.2.3", "1.2.3.1", "1.2.3.1.1", CTImageStorage, ExplicitVRLittleEndian)


def test_store_is_atomic_and_idempotent(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0).open()
    first = spool.store(IDENT, b"DICM", b"-bytes")
    assert first.written and first.path == tmp_path / "spool/1.2.3/1.2.3.1/1.2.3.1.1.dcm"
    assert first.path.read_bytes() == b"DICM-bytes" and first.size == 10
    again = spool.store(IDENT, b"other bytes")
    assert not again.written and first.path.read_bytes() == b"DICM-bytes"
    assert [p.name for p in first.path.parent.iterdir()] == [first.path.name]  # no .part left


def test_missing_file_is_rewritten(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=0).open()
    spool.store(IDENT, b"a").path.unlink()
    assert spool.store(IDENT, b"a").written


def test_open_removes_legacy_incoming_files(tmp_path: Path) -> None:
    (tmp_path / INCOMING).mkdir()
    (tmp_path / INCOMING / "dead.part").write_bytes(b"half")
    Spool(tmp_path, min_free_bytes=0).open()
    assert list((tmp_path / INCOMING).iterdir()) == []


def test_open_promotes_complete_parts_and_removes_short_ones(tmp_path: Path) -> None:
    """A full-size .part was fsync'd (maybe acknowledged) before its rename was lost; a
    shorter one was cut off mid-write and never acknowledged."""
    series = tmp_path / "1.2.3" / "1.2.3.1"
    series.mkdir(parents=True)
    (series / "1.2.3.1.1.4.0a0b0c0d.part").write_bytes(b"DICM")
    (series / "1.2.3.1.2.9.0a0b0c0d.part").write_bytes(b"DIC")
    (series / "1.2.3.1.3.2.00000000.part").write_bytes(b"no")  # final exists: superseded
    (series / "1.2.3.1.3.dcm").write_bytes(b"ok")
    spool = Spool(tmp_path, min_free_bytes=0)
    spool.open()
    assert sorted(p.name for p in series.iterdir()) == ["1.2.3.1.1.dcm", "1.2.3.1.3.dcm"]
    assert (series / "1.2.3.1.1.dcm").read_bytes() == b"DICM"
    assert sorted(p.name for p in spool.files()) == ["1.2.3.1.1.dcm", "1.2.3.1.3.dcm"]


def test_this_machine_needs_one_flush(tmp_path: Path) -> None:
    """ext4 (data=ordered) here: one fsync covers data, size and the new file's name."""
    if not one_flush_safe(tmp_path):
        pytest.skip("tmp_path is not on ext4/xfs/btrfs")
    assert Spool(tmp_path, min_free_bytes=0).open().one_flush


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
