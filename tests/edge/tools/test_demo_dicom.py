"""`mededge demo-dicom`'s push sends compressed series as they are: dcmtk's storescu proposes
each file's own transfer syntax (by default it proposes only uncompressed ones and cannot
convert RLE, JPEG-LS or JPEG 2000 itself). The receiver is dcmtk's storescp."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from edge.cli import main as cli
from edge.tools.demo_dicom import push, storescu_syntax_options

STORESCP = Path("/usr/bin/storescp")
pytestmark = pytest.mark.skipif(not STORESCP.exists(), reason="dcmtk is not installed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_compressed_series_are_pushed_in_their_own_transfer_syntax(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert cli(["synth", "--out", str(data), "--studies", "3", "--seed", "4", "--size", "64",
                "--slices-min", "3", "--slices-max", "3", "--compressed-fraction", "1",
                "--quiet"]) == 0
    port, out = _free_port(), tmp_path / "received"
    out.mkdir()
    scp = subprocess.Popen([str(STORESCP), "+xa", "-od", str(out), str(port)],
                           env={**os.environ, "TCP_NODELAY": "1"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert time.monotonic() < deadline, "storescp did not listen"
            time.sleep(0.05)
        sent: dict[str, str] = {}
        for study in sorted(data.glob("study-*/ct")):
            files = sorted(study.glob("*.dcm"))
            assert storescu_syntax_options(files), "the study is not compressed"
            push(files, port)  # raises unless every file was stored
            for f in files:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                sent[str(ds.SOPInstanceUID)] = str(ds.file_meta.TransferSyntaxUID)
    finally:
        scp.terminate()
        scp.wait(10)
    received = {str(ds.SOPInstanceUID): str(ds.file_meta.TransferSyntaxUID) for ds in (
        pydicom.dcmread(f, stop_before_pixels=True) for f in out.iterdir())}
    assert received == sent  # every file arrived, in the syntax it was written in
