"""``mededge bench ttr`` with tiny numbers: 2 series of 8 slices at 64x64, a table and JSON."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from edge.tools import bench_command, bench_ttr

pytestmark = pytest.mark.skipif(
    not (Path("/usr/bin/storescu").exists() and Path("/usr/sbin/Orthanc").exists()),
    reason="dcmtk's storescu and Orthanc are needed")


def test_bench_ttr_reports_percentiles_and_the_last_slice_compute(tmp_path: Path,
                                                                   capsys) -> None:
    parser = argparse.ArgumentParser()
    bench_command.add_arguments(parser)
    args = parser.parse_args(["ttr", "--work", str(tmp_path), "--series", "2", "--slices", "8",
                              "--size", "64", "--quiet-period", "0.3"])
    assert bench_command.run(args) == 0
    text = (tmp_path / "bench_ttr.md").read_text()
    assert text in capsys.readouterr().out
    row = re.search(r"^\| SEG at the PACS \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", text,
                    re.MULTILINE)
    assert row, text
    p50, p99, worst = map(float, row.groups())
    assert 0 < p50 <= p99 <= worst
    assert re.search(r"Last slice's compute .*: [\d.]+ ms", text)
    timings = json.loads((tmp_path / "bench_ttr.json").read_text())
    assert len(timings) == 2 and all(t["slices"] == 8 and t["seg_s"] > 0 for t in timings)


def test_percentile_interpolates_like_numpy() -> None:
    assert bench_ttr.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert bench_ttr.percentile([1.0, 2.0], 99) == pytest.approx(1.99)
