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


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny synthetic studies (64 x 64, 8-10 slices, seed 5), made once per session for
    the tests that only read them (datasets, classifier, calibration)."""
    from edge.cli import main as cli

    out = tmp_path_factory.mktemp("small-synth") / "data"
    assert cli(["synth", "--out", str(out), "--studies", "3", "--seed", "5", "--size", "64",
                "--slices-min", "8", "--slices-max", "10", "--quiet"]) == 0
    return out
