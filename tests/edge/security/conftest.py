"""Fixtures of the security tests: a PKI made with ``cryptography`` (tls_material.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("cryptography", reason="the dev extra's cryptography makes the test PKI")

for _path in (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]):
    if str(_path) not in sys.path:  # tls_material here, model_factory in tests/edge
        sys.path.insert(0, str(_path))

from tls_material import Pki, make_pki  # noqa: E402


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))
