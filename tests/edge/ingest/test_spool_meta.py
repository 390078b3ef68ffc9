"""The listener's own File Meta Information encoding matches what pynetdicom would write."""

from io import BytesIO

from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from edge.ingest.listener import file_meta
from edge.ingest.uids import InstanceIdentity

IDENT = InstanceIdentity("1.2.3", "1.2.3.1", "1.2.3.1.15", CTImageStorage, ExplicitVRLittleEndian)


def test_file_meta_is_pynetdicoms_plus_the_source_ae() -> None:
    ours = file_meta(IDENT, "CT1")
    reference = encode_file_meta(create_file_meta(
        sop_class_uid=IDENT.sop_class_uid, sop_instance_uid=IDENT.sop_instance_uid,
        transfer_syntax=IDENT.transfer_syntax_uid))
    assert ours[:132] == b"\0" * 128 + b"DICM"
    meta = dcmread(BytesIO(ours + b"\x08\x00\x18\x00UI\x02\x001\0"), force=True).file_meta
    theirs = dcmread(BytesIO(b"\0" * 128 + b"DICM" + reference), force=True).file_meta
    assert meta.SourceApplicationEntityTitle == "CT1"
    assert meta.FileMetaInformationGroupLength == len(ours) - 132 - 12
    del meta.SourceApplicationEntityTitle, meta.FileMetaInformationGroupLength
    del theirs.FileMetaInformationGroupLength
    assert meta == theirs


def test_odd_source_ae_is_padded() -> None:
    ours = file_meta(IDENT, "MODALITY1")
    assert dcmread(BytesIO(ours), force=True).file_meta.SourceApplicationEntityTitle == "MODALITY1"
