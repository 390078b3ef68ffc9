"""UID validation (PS3.5 9.1) and the identity read from a dataset."""

import pytest
from pydicom import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from edge.ingest.uids import (
    DatasetMismatchError,
    InstanceIdentity,
    InvalidUidError,
    is_valid_uid,
    validate_uid,
)


@pytest.mark.parametrize("uid", ["0", "1.2.840.10008.5.1.4.1.1.2", "2.25.0", "1." + "9" * 62])
def test_valid(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize("uid", ["", "../../etc", "1.02", "1..2", ".1", "1.", "1.2a", "1/2",
                                 "1." + "9" * 63, "1.2 ", " 1.2", "00"])
def test_invalid(uid: str) -> None:
    assert not is_valid_uid(uid)


def test_error_names_attribute_not_value() -> None:
    with pytest.raises(InvalidUidError, match="StudyInstanceUID") as info:
        validate_uid("../../etc", "StudyInstanceUID")
    assert "etc" not in str(info.value)
    with pytest.raises(InvalidUidError, match="missing"):
        validate_uid(None, "SOPInstanceUID")


def _ds(**kw: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "1.2.3.4"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", "1.2.3.1", "CT"
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_identity_from_dataset() -> None:
    ident = InstanceIdentity.from_dataset(_ds(), CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian)
    assert (ident.study_instance_uid, ident.series_instance_uid, ident.modality) == (
        "1.2.3", "1.2.3.1", "CT")


def test_identity_mismatch() -> None:
    with pytest.raises(DatasetMismatchError, match="SOPClassUID"):
        InstanceIdentity.from_dataset(_ds(SOPClassUID=MRImageStorage), CTImageStorage,
                                      "1.2.3.4", ExplicitVRLittleEndian)
    with pytest.raises(DatasetMismatchError, match="SOPInstanceUID"):
        InstanceIdentity.from_dataset(_ds(), CTImageStorage, "1.2.3.5", ExplicitVRLittleEndian)


def test_identity_cannot_be_built_from_hostile_values() -> None:
    with pytest.raises(InvalidUidError):
        InstanceIdentity("../..", "1.2", "1.3", CTImageStorage, ExplicitVRLittleEndian)
