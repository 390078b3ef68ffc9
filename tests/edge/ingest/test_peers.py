"""Peer policy and the dicom settings it is built from."""

import pytest

from edge.core.config import DicomPeer, load_settings
from edge.core.errors import ConfigError
from edge.ingest.peers import PeerPolicy
from edge.ingest.statuses import CALLED_AE_NOT_RECOGNIZED, CALLING_AE_NOT_RECOGNIZED


def test_defaults() -> None:
    dicom = load_settings(environ={}).dicom
    assert (dicom.port, dicom.ae_title, dicom.max_pdu, dicom.peers) == (
        11112, "MEDEDGE", 131072, ())


@pytest.mark.parametrize("bad", ["A\\B", "   ", "X" * 17, ""])
def test_bad_ae_title_names_the_key(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"dicom\.ae_title"):
        load_settings(environ={}, overrides={"dicom": {"ae_title": bad}})


def test_peers_from_environment() -> None:
    env = {"MEDEDGE_DICOM__PEERS": "[{ae_title: CT1, host: 127.0.0.1}, {ae_title: MR1}]"}
    assert load_settings(environ=env).dicom.peers == (
        DicomPeer(ae_title="CT1", host="127.0.0.1"), DicomPeer(ae_title="MR1"))


def test_policy() -> None:
    policy = PeerPolicy("MEDEDGE", [DicomPeer(ae_title="CT1", host="localhost"),
                                    DicomPeer(ae_title="MR1")])
    assert policy.check("CT1", "MEDEDGE", "127.0.0.1") is None
    assert policy.check("CT1", "MEDEDGE", "192.0.2.7") is CALLING_AE_NOT_RECOGNIZED
    assert policy.check("MR1", "MEDEDGE ", "192.0.2.7") is None
    assert policy.check("XA1", "MEDEDGE", "127.0.0.1") is CALLING_AE_NOT_RECOGNIZED
    assert policy.check("MR1", "OTHER", "127.0.0.1") is CALLED_AE_NOT_RECOGNIZED
    assert PeerPolicy("MEDEDGE", []).open_to_all
