"""Shared fixtures. Keep this small: fixtures used by one test package live beside it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Test harnesses in tests/ (orthanc.py, dicom_models.py) and tests/edge (model_factory.py)
# import as top-level modules.
for _harnesses in (Path(__file__).resolve().parent, Path(__file__).resolve().parent / "edge"):
    if str(_harnesses) not in sys.path:
        sys.path.insert(0, str(_harnesses))

from orthanc import ORTHANC, Orthanc  # noqa: E402


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One Orthanc PACS for the whole session (it takes a second or two to start). Tests share
    it: look instances up by your own UIDs, or call ``orthanc.clear()`` first."""
    if not ORTHANC.exists():
        pytest.skip(f"{ORTHANC} is not installed (Debian package orthanc)")
    server = Orthanc.start(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        server.stop()
